"""Where `margin ask`'s time goes on the default model, and how far each part is from its floor.

One warm process, the default model and index, batch 1, the model's own k and mode (RAG-Token
greedy), 16 questions (benchmarks/decoding.py's QUESTIONS), each asked alone after a warm-up.
Timers wrap the phases of ``rag.ask`` (nothing in margin changes):

- question encoding (``question_encoder.embed_queries``) and the search (the rest of retrieval);
- tokenising the prompts (``generator.build_inputs``);
- the prefill (``generator.encode``): the shared prompt prefix run once, then each row's own
  suffix (passage + question) on top of it (``CausalGenerator._extend``), and, with the passage
  cache, the passages and questions run on cached heads;
- the decoding steps (``generator._forward_step``: one model forward over every row);
- Python: what ``decode`` spends outside the model (the RAG-Token marginal, bookkeeping), and
  what ``ask`` spends outside retrieval and decoding (provenance, the answer).

The floor of each model phase is the same work at this machine's measured rates: a large fp32
matmul at the same torch threads (FLOP/s) and a large tensor copy (bytes/s). A forward of n new
tokens over c cached ones costs 2 x (non-embedding parameters) x n FLOPs, plus attention
4 x layers x n x (c + n/2) x (heads x head_dim), plus the output layer 2 x d x V per position
whose logits are computed; it reads every weight once and the KV cache it attends to. Its floor
is max(FLOPs / rate, bytes / bandwidth). Phases are reported as medians over the questions, and
as each one's share of the whole and its ratio to its floor (shares and ratios move less than
seconds with the shared machine's load).

    python benchmarks/ask_profile.py                       # print the table
    python benchmarks/ask_profile.py --passage-cache-mb 256  # the same with the passage cache
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from _report import load_average, machine
from decoding import QUESTIONS  # the 16 of the default-model run there


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an (n x n) @ (n x n) fp32 matmul, the best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of copying a ``mib`` MiB fp32 tensor (read + write), the best of ``repeats``."""
    src = torch.randn(mib * 2**18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Phases:
    """Seconds and model work per phase for the question being asked."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.floor: dict[str, float] = defaultdict(float)
        self.tokens: dict[str, float] = defaultdict(float)  # new tokens run, all rows

    def add(self, name: str, seconds: float, floor: float = 0.0, tokens: float = 0.0) -> None:
        self.seconds[name] += seconds
        self.floor[name] += floor
        self.tokens[name] += tokens


class ForwardCost:
    """The work of one forward of a causal model: FLOPs and bytes moved (see the top)."""

    def __init__(self, model) -> None:
        cfg = model.config
        self.layers, self.d_attn = cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim
        self.kv_token = self.layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # bytes
        emb = model.get_input_embeddings().weight
        self.body = sum(p.numel() for p in model.parameters()) - emb.numel()  # non-embedding
        self.head = emb.numel()  # the output layer (tied to the embedding on SmolLM2)

    def flops(self, rows: int, new: int, past: int, logits: int) -> float:
        """A forward of ``new`` tokens on each of ``rows`` rows over ``past`` cached positions,
        ``logits`` positions per row through the output layer."""
        per_row = 2 * self.body * new + 4 * self.layers * new * (past + new / 2) * self.d_attn
        return rows * (per_row + logits * 2 * self.head)

    def bytes(self, rows: int, new: int, past: int) -> float:
        """Every weight read once, and the rows' KV."""
        return 4 * (self.body + self.head) + rows * (past + new) * self.kv_token


def install(rag, phases: list[Phases], rate: float, bandwidth: float) -> None:
    """Wrap the phases of ``rag.ask`` with timers (instance attributes only; margin unchanged)."""
    import margin.rag as rag_module

    gen = rag.generator
    cost = ForwardCost(gen.model)

    def floor(rows: int, new: int, past: int, logits: int) -> float:
        """Seconds of that forward (``ForwardCost``) at the measured rates."""
        return max(cost.flops(rows, new, past, logits) / rate,
                   cost.bytes(rows, new, past) / bandwidth)

    def timed(obj, name: str, phase):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            phase(time.perf_counter() - start, args, kwargs, out)
            return out

        setattr(obj, name, wrapper)

    def now() -> Phases:
        return phases[-1]

    timed(rag.question_encoder, "embed_queries", lambda s, *_: now().add("encode question", s))
    timed(rag, "_retrieve_scored", lambda s, *_: now().add("retrieve (total)", s))
    timed(gen, "build_inputs", lambda s, *_: now().add("tokenise prompts", s))
    timed(gen, "encode", lambda s, *_: now().add("prefill (total)", s))

    def extend(s, args, kwargs, out):
        ids, mask = args[0], args[1]
        n, w = ids.shape
        past = mask.shape[1] - w
        real = int(mask[:, past:].sum()) / n  # real new tokens per row
        name = "prefill: shared prefix" if past == 0 and n == 1 else "prefill: rows on top"
        now().add(name, s, floor(n, int(real), past, 1), n * real)

    timed(gen, "_extend", extend)

    def step(s, args, kwargs, out):
        state = args[0]
        rows, ctx = state.attention_mask.shape
        now().add("decode: model forwards", s, floor(rows, 1, ctx, 1), rows)
        now().add("decode steps (count)", 1.0)

    timed(gen, "_forward_step", step)
    decode = rag_module.decode

    def decode_timed(*args, **kwargs):
        start = time.perf_counter()
        out = decode(*args, **kwargs)
        now().add("decode (total)", time.perf_counter() - start)
        return out

    rag_module.decode = decode_timed


ORDER = [
    "encode question", "search", "tokenise prompts", "prefill: shared prefix",
    "prefill: rows on top", "decode: model forwards", "decode: python", "answer + provenance",
]


def derived(p: Phases, total: float) -> dict[str, float]:
    s = dict(p.seconds)
    s["search"] = s.get("retrieve (total)", 0.0) - s.get("encode question", 0.0)
    inside = s.get("prefill (total)", 0.0) + s.get("decode: model forwards", 0.0)
    s["decode: python"] = s.get("decode (total)", 0.0) - inside
    s["answer + provenance"] = total - s.get("retrieve (total)", 0.0) - s.get(
        "tokenise prompts", 0.0) - s.get("decode (total)", 0.0)
    s["total"] = total
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passage-cache-mb", type=float, default=None,
                        help="the generator's passage KV cache (MiB); default: the model's own")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from margin.rag import RAG

    rate, bandwidth = matmul_rate(), copy_bandwidth()
    rag = RAG.load(model="default", index="default", progress=False)
    if args.passage_cache_mb is not None and hasattr(rag.generator, "set_passage_cache"):
        rag.generator.set_passage_cache(int(args.passage_cache_mb * 2**20))
    phases: list[Phases] = [Phases()]
    install(rag, phases, rate, bandwidth)
    rag.ask(QUESTIONS[:1])  # warm-up
    rows: list[dict[str, float]] = []
    floors: list[dict[str, float]] = []
    tokens: list[dict[str, float]] = []
    for q in QUESTIONS:
        phases.append(Phases())
        start = time.perf_counter()
        rag.ask([q])
        rows.append(derived(phases[-1], time.perf_counter() - start))
        floors.append(dict(phases[-1].floor))
        tokens.append(dict(phases[-1].tokens))
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in [*ORDER, "total"]}
    fl = {k: statistics.median(f.get(k, 0.0) for f in floors) for k in ORDER}
    tok = {k: statistics.median(t.get(k, 0.0) for t in tokens) for k in ORDER}
    steps = statistics.median(r.get("decode steps (count)", 0.0) for r in rows)
    print(f"machine: {machine()}; load average {load_average()}; torch threads {args.threads}")
    print(f"measured: matmul {rate / 1e9:.1f} GFLOP/s (2048^3 fp32), copy "
          f"{bandwidth / 1e9:.1f} GB/s (512 MiB, read + write)")
    print(f"k={rag.default_k}, RAG-{rag.default_mode.capitalize()} greedy, batch 1, "
          f"{len(QUESTIONS)} questions, median decode steps {steps:.0f}")
    print("| phase | tokens run | median ms | share of ask | floor ms | ratio to floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in ORDER:
        ratio = f"{med[k] / fl[k]:.1f}x" if fl[k] else ""
        flo = f"{fl[k] * 1e3:.1f}" if fl[k] else ""
        t = f"{tok[k]:.0f}" if tok[k] else ""
        print(f"| {k} | {t} | {med[k] * 1e3:.1f} | {med[k] / med['total']:.0%} | {flo} | {ratio} |")
    model_floor = sum(fl.values())
    print(f"| **ask (p50)** | | **{med['total'] * 1e3:.0f}** | 100% | {model_floor * 1e3:.0f} | "
          f"{med['total'] / model_floor:.1f}x |")


if __name__ == "__main__":
    main()
