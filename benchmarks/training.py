"""One RAG training step, margin vs transformers' RAG: same loss, time and peak memory (issue 9).

The models and inputs of benchmarks/decoding.py (random fixed-seed BERT-base-shaped DPR question
encoder, BART-base-shaped generator, 128-token context rows given to both sides), batch 8, k 5,
answers of 4-16 tokens (``<s> ... </s>``, right-padded). A step is forward + backward of the
summed negative marginal log-likelihood (Sec. 2.4), with the document prior recomputed from the
question encoder so that it receives gradient on both sides: p(z|x) = softmax(d(z)ᵀq(x)) from the
same passage vectors. Models in eval mode (no dropout), so both sides compute the same numbers.

- margin: ``doc_log_prior`` + ``Seq2SeqGenerator.token_logprobs`` + ``nll_loss`` (what
  ``RAG.loss`` runs once passages are retrieved);
- transformers: ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` forward with
  ``context_input_ids``, ``doc_scores`` and ``labels``, ``.loss.sum()``.

    nice -n 10 .venv/bin/python benchmarks/training.py            # print the section
    nice -n 10 .venv/bin/python benchmarks/training.py --write    # and put it in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from _report import load_average, provenance, write_section
from decoding import Timing, build_models, make_inputs, measure, secs
from margin.marginalize import doc_log_prior, nll_loss

SECTION = "## Training step vs transformers"
GPU_SECTION = "## Training step vs transformers on a GPU"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def make_batch(batch: int, k: int, device: str, seed: int = 3):
    """Question ids (B, 16), passage vectors (B, k, 768), targets (B, T) and mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    q_ids = torch.randint(1000, 30000, (batch, 16), generator=g)
    q_ids[:, 0], q_ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    doc_embs = 0.05 * torch.randn(batch, k, 768, generator=g)
    lengths = torch.randint(4, 17, (batch,), generator=g)
    T = int(lengths.max())
    target = torch.randint(4, 50265, (batch, T), generator=g)
    target[:, 0] = 0
    target[torch.arange(batch), lengths - 1] = 2
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    target = target.masked_fill(~mask, 1)
    return [t.to(device) for t in (q_ids, doc_embs, target, mask)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="questions per step")
    parser.add_argument("--k", type=int, default=5, help="passages per question")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32)")
    parser.add_argument("--write", action="store_true", help=f"put the section in {BENCHMARKS_MD}")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = load_average()
    B, k, dev = args.batch, args.k, args.device
    m = build_models(k, device=dev)
    inputs, _ = make_inputs(B, k, device=dev)
    q_ids, doc_embs, target, mask = make_batch(B, k, dev)
    labels = torch.cat([torch.full_like(target[:, :1], 2), target], 1)  # decoder start + target

    def margin_step(mode: str):
        def step() -> float:
            m.bart.zero_grad(set_to_none=True)
            m.qenc.zero_grad(set_to_none=True)
            prior = doc_log_prior(m.qenc(q_ids).pooler_output, doc_embs)  # (B, k)
            tok = m.gen.token_logprobs(inputs, target, mask.long())  # (B, k, T)
            loss = nll_loss(mode, prior, tok, mask, "sum")  # type: ignore[arg-type]
            loss.backward()
            return float(loss.detach())
        return step

    def hf_step(mode: str):
        model = m.seq if mode == "sequence" else m.tok

        def step() -> float:
            m.bart.zero_grad(set_to_none=True)
            m.qenc.zero_grad(set_to_none=True)
            q = m.qenc(q_ids).pooler_output  # (B, d)
            scores = torch.einsum("bd,bkd->bk", q, doc_embs)  # (B, k)
            loss = model(context_input_ids=inputs.input_ids,
                         context_attention_mask=inputs.attention_mask, doc_scores=scores,
                         labels=labels, n_docs=k).loss.sum()
            loss.backward()
            return float(loss.detach())
        return step

    sides = {
        ("sequence", "margin"): Timing("margin RAG-Sequence", margin_step("sequence")),
        ("sequence", "hf"): Timing("transformers `RagSequenceForGeneration`", hf_step("sequence")),
        ("token", "margin"): Timing("margin RAG-Token", margin_step("token")),
        ("token", "hf"): Timing("transformers `RagTokenForGeneration`", hf_step("token")),
    }
    measure(list(sides.values()), args.runs, dev, [s.fn for s in sides.values()])

    gpu = dev.startswith("cuda")
    lines = [
        GPU_SECTION if gpu else SECTION,
        "",
        f"Forward + backward of the summed RAG loss: batch {B}, k {k}, the decoding benchmark's "
        f"random BART-base-shaped generator and BERT-base-shaped DPR question encoder, "
        f"128-token context rows, answers of 4-{int(mask.sum(-1).max())} tokens, eval mode, "
        f"{args.threads} torch thread(s), device {dev}, median of {args.runs} runs after a "
        "warm-up, sides alternating in one process. Peak memory: "
        + ("torch's peak GPU allocation during the step." if gpu
           else "growth of the resident set during the step (sampled)."),
        "",
        "| mode | side | loss | seconds (median) | speed-up vs transformers | peak MiB "
        "| runs (s) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for mode in ("sequence", "token"):
        ours, ref = sides[(mode, "margin")], sides[(mode, "hf")]
        for side in (ours, ref):
            runs = ", ".join(secs(t) for t in side.times)
            speed = f"{ref.median / side.median:.2f}x" if side is ours else "1.00x"
            lines.append(f"| {mode} | {side.label} | {side.result:.4f} | {secs(side.median)} | "
                         f"{speed} | {max(side.peaks) / 2**20:,.0f} | {runs} |")
        diff = abs(float(ours.result) - float(ref.result))  # type: ignore[arg-type]
        ok = diff <= 1e-4 * max(1.0, abs(float(ref.result)))  # type: ignore[arg-type]
        fast = ref.median / ours.median >= 1.0
        verdicts.append(f"- RAG-{mode.capitalize()}: |loss difference| {diff:.1e} (target "
                        f"<= 1e-4 relative: {'met' if ok else 'NOT met'}); "
                        f"{ref.median / ours.median:.2f}x transformers' speed (target >= 1: "
                        f"{'met' if fast else 'NOT met'}).")
    lines += ["", *verdicts, "", *provenance("training.py", load_before, dev)]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(BENCHMARKS_MD, section)
        print(f"wrote {section.splitlines()[0]!r} to {BENCHMARKS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
