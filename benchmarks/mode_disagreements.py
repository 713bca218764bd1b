"""Where RAG-Token and RAG-Sequence part ways: the questions one mode answered and the other not.

Reads the prediction files ``benchmarks/finetuned.py eval`` (or ``margin eval --mode
token,sequence``) wrote, per data set, and prints each question exactly one mode got right, both
answers, and whether the loser's answer is a shorter prefix of the winner's (after SQuAD
normalisation): Thorough Decoding ranks whole answers by summed log-probability, which favours an
answer that stops early (docs/training.md).

    python benchmarks/mode_disagreements.py /tmp/margin-finetuned-bench --datasets TriviaQA NQ-open
"""

from __future__ import annotations

import argparse
from pathlib import Path

from margin.evaluation.metrics import normalize_answer
from margin.evaluation.runs import read_predictions

RUNS = {"token": "dense-k5-token-greedy", "sequence": "dense-k5-sequence-greedy"}


def is_prefix(short: str, long: str) -> bool:
    """Whether ``short`` is a proper word prefix of ``long`` once both are normalised."""
    a, b = normalize_answer(short).split(), normalize_answer(long).split()
    return 0 < len(a) < len(b) and b[: len(a)] == a


def disagreements(folder: Path) -> list[tuple[str, str, str, str]]:
    """(winning mode, question, token answer, sequence answer) for each question right in one
    mode only, in file order."""
    token, seq = (read_predictions(folder / run / "predictions.jsonl") for run in RUNS.values())
    out = []
    for qid, t in token.items():
        s = seq[qid]
        right_t, right_s = t["metrics"]["exact_match"], s["metrics"]["exact_match"]
        if right_t != right_s:
            out.append(("token" if right_t else "sequence", t["question"], t["answer"],
                        s["answer"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the eval --out folder (one subfolder per data set)")
    ap.add_argument("--datasets", nargs="+", default=["NQ-open", "TriviaQA"])
    args = ap.parse_args()
    for name in args.datasets:
        rows = disagreements(args.out / name)
        print(f"## {name}: {len(rows)} questions right in one mode only")
        for winner, question, t, s in rows:
            loser, won = (s, t) if winner == "token" else (t, s)
            prefix = " (loser's answer is a prefix)" if is_prefix(loser, won) else ""
            print(f"- {winner} only: {question!r}: token {t!r}, sequence {s!r}{prefix}")
        for winner in RUNS:
            wins = [r for r in rows if r[0] == winner]
            prefixes = sum(is_prefix(r[3], r[2]) if winner == "token" else is_prefix(r[2], r[3])
                           for r in wins)
            print(f"{winner} only: {len(wins)}, of which lost by the other to a prefix: "
                  f"{prefixes}")


if __name__ == "__main__":
    main()
