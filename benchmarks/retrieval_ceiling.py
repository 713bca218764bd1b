"""Where retrieval caps answer quality: answer recall of the default corpus, at every depth.

Issue "Answer quality" asks zero-shot RAG for 3x the closed-book EM. Its section in BENCHMARKS.md
showed that on TriviaQA even a perfect reader of the top 5 passages could not reach it, and named
retrieval as the lever. This script measures how far that lever reaches, on the held-out questions
(the first 500 of each development file) and, beside them, the next 1000 (the training slice's
first questions, where a retrieval setting could be chosen without touching the held-out ones):

- answer recall@k of the dense retriever (the default question encoder, and the fine-tuned one
  named by ``--model`` when it is installed) for k = 1 ... 100, and of the whole corpus (the
  answer occurs in some passage at all: no retriever over this corpus can do better);
- recall@5 of BM25 and of two fusions of BM25 with dense over their top 50s: reciprocal rank
  fusion (1 / (60 + rank), summed) and a weighted sum of each list's z-scored scores.

    MARGIN_HOME=/tmp/mh nice -n 5 .venv/bin/python benchmarks/retrieval_ceiling.py --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from margin.evaluation import metrics as M
from margin.evaluation.evaluate import bm25_retriever
from margin.evaluation.examples import Example, read_examples
from margin.evaluation.report import retrieval_recall
from margin.retrieval.retriever import Retriever

sys.path.insert(0, str(Path(__file__).parent))
from _report import load_average, provenance, write_section  # noqa: E402
from evaluation import DATASETS  # noqa: E402

SLICES = {"held-out (1-500)": (0, 500), "training slice (501-1500)": (500, 1500)}
DEPTHS = (1, 5, 10, 20, 50, 100)
FUSION_DEPTH = 50  # each retriever's list that a fusion re-ranks
RRF_C = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)
Z_WEIGHTS = (0.5, 0.7)  # weight of the dense z-score; BM25's is 1 - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="finetuned",
                    help="an installed fine-tuned model whose question encoder gets rows too")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load_average()

    dense = {"dense (default)": Retriever.load("default", progress=False)}
    tuned = _finetuned_retriever(args.model)
    if tuned is not None:
        dense[f"dense ({args.model})"] = tuned
    bm25 = bm25_retriever("default", progress=False)
    corpus = _normalised_corpus(dense["dense (default)"])

    rows = []
    for name, path in DATASETS.items():
        examples = read_examples(path, limit=max(hi for _, hi in SLICES.values()))
        for label, (lo, hi) in SLICES.items():
            rows.append(measure(name, label, examples[lo:hi], dense, bm25, corpus))
            print(rows[-1], flush=True)
    section = render(rows, sorted(dense), args, load_start)
    print(section)
    if args.write:
        write_section(Path(__file__).parent.parent / "BENCHMARKS.md", section)


def measure(name, label, examples, dense, bm25, corpus) -> dict:
    """Every recall of one slice, as percentages."""
    questions = [ex.input for ex in examples]
    row = {"data": name, "slice": label, "n": len(examples)}
    for key, retriever in dense.items():
        recall = retrieval_recall(retriever, examples, DEPTHS)
        row.update({f"{key}@{k}": _pct(recall[f"answer_recall@{k}"]) for k in DEPTHS})
    row["corpus"] = _pct(np.mean([_in_corpus(ex, corpus) for ex in examples]))
    sparse = bm25.retrieve(questions, k=FUSION_DEPTH)
    row["bm25@5"] = _recall(examples, [[p.text for p in ps[:5]] for ps in sparse.passages])
    d = dense["dense (default)"].retrieve(questions, k=FUSION_DEPTH)
    pairs = list(zip(d.passages, sparse.passages, strict=True))
    row["rrf@5"] = _recall(examples, [rrf(dp, bp)[:5] for dp, bp in pairs])
    lists = [(d.passages[i], np.asarray(d.scores[i]), sparse.passages[i],
              np.asarray(sparse.scores[i])) for i in range(len(examples))]
    for w in Z_WEIGHTS:
        row[f"z{w}@5"] = _recall(examples, [z_fusion(*lst, w)[:5] for lst in lists])
    return row


def rrf(dense_passages, bm25_passages) -> list[str]:
    """Texts of the union of two ranked lists, by summed 1 / (RRF_C + rank)."""
    fused: dict[str, float] = {}
    texts: dict[str, str] = {}
    for passages in (dense_passages, bm25_passages):
        for rank, p in enumerate(passages, start=1):
            fused[p.id] = fused.get(p.id, 0.0) + 1.0 / (RRF_C + rank)
            texts[p.id] = p.text
    return [texts[pid] for pid in sorted(fused, key=fused.__getitem__, reverse=True)]


def z_fusion(dense_passages, dense_scores, bm25_passages, bm25_scores, w: float) -> list[str]:
    """Texts of the union by w * z(dense) + (1 - w) * z(BM25); a list's floor where it is absent."""
    def z(scores):
        return (scores - scores.mean()) / (scores.std() + 1e-6)

    zd, zb = z(dense_scores), z(bm25_scores)
    by_id = {p.id: [p.text, zd.min(), zb.min()] for p in (*dense_passages, *bm25_passages)}
    for p, s in zip(dense_passages, zd, strict=True):
        by_id[p.id][1] = s
    for p, s in zip(bm25_passages, zb, strict=True):
        by_id[p.id][2] = s
    ranked = sorted(by_id.values(), key=lambda v: w * v[1] + (1 - w) * v[2], reverse=True)
    return [text for text, _, _ in ranked]


def _finetuned_retriever(name: str) -> Retriever | None:
    from margin.models import load_model

    try:
        return load_model(name, "default", progress=False).retriever
    except Exception as err:  # not installed: the table leaves its rows out
        print(f"no finetuned model ({err}); its rows are left out", file=sys.stderr)
        return None


def _normalised_corpus(retriever: Retriever) -> str:
    """Every passage's normalised text, each between spaces, one per line (answers never span)."""
    store = retriever.index.store
    passages = store.get(np.arange(len(store)))
    return "\n".join(f" {M.normalize_answer(p.text)} " for p in passages)


def _in_corpus(ex: Example, corpus: str) -> bool:
    if ex.regex:
        raise SystemExit("regex answers are not supported here")
    return any(f" {g} " in corpus for g in map(M.normalize_answer, ex.answers) if g)


def _recall(examples, texts_per_question) -> float:
    hits = [M.has_answer(texts, ex.answers, ex.regex)
            for ex, texts in zip(examples, texts_per_question, strict=True)]
    return _pct(np.mean(hits))


def _pct(x) -> float:
    return round(100 * float(x), 1)


def render(rows, dense_keys, args, load_before) -> str:
    out = [
        "## Answer quality: the retrieval ceiling of the default corpus", "",
        "Answer recall (x100: a SQuAD-normalised gold answer occurs in one of the passages, whole "
        "words) over the default corpus (12,324 passages of 10,033 Wikipedia lead sections), on "
        "the held-out questions of the answer-quality report and on the next 1000 of each file. "
        "\"corpus\" is the answer occurring in any passage at all: the most any retriever over "
        "this corpus can reach. A fine-tuned question encoder's rows on the training slice are "
        "on questions it may have been trained on (`margin finetune` trains on the first "
        "grounded ones after the held-out 500).", "",
        "| data set | questions | n | retriever | @1 | @5 | @10 | @20 | @50 | @100 | corpus |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for key in dense_keys:
            cells = " | ".join(f"{r[f'{key}@{k}']:.1f}" for k in DEPTHS)
            out.append(f"| {r['data']} | {r['slice']} | {r['n']} | {key} | {cells} | "
                       f"{r['corpus']:.1f} |")
    out += [
        "", f"Recall@5 of BM25 and of fusions of BM25 with the default dense retriever (each "
        f"list's top {FUSION_DEPTH}): reciprocal rank fusion (c = {RRF_C}) and w · z(dense) + "
        "(1 − w) · z(BM25) of the scores z-scored within each list.", "",
        "| data set | questions | dense | BM25 | RRF | "
        + " | ".join(f"z, w = {w}" for w in Z_WEIGHTS) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(Z_WEIGHTS),
    ]
    for r in rows:
        zs = " | ".join(f"{r[f'z{w}@5']:.1f}" for w in Z_WEIGHTS)
        out.append(f"| {r['data']} | {r['slice']} | {r['dense (default)@5']:.1f} | "
                   f"{r['bm25@5']:.1f} | {r['rrf@5']:.1f} | {zs} |")
    out.append("")
    return "\n".join(out + provenance("retrieval_ceiling.py", load_before))


if __name__ == "__main__":
    main()
