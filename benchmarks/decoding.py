"""RAG decoding, margin vs transformers' RAG, against the compute floor (issue 9).

Random fixed-seed models, no downloads: a DPR question encoder of BERT-base shape (only built: the
document scores are given) and a generator of BART-base shape (6+6 layers, d_model 768, vocab
50,265, forced BOS/EOS as BART's). Both implementations get the SAME explicit inputs: B x k
context rows of 128 tokens (``context_input_ids``, unpadded, so transformers' RAG-Sequence beam
search, which ignores the attention mask, sees what margin sees) and the same document scores.
Beams 4, at most 24 new tokens, torch threads fixed, median of ``--runs`` runs after a warm-up.
Sides, per k:

- margin RAG-Sequence Thorough (``decode_rag_sequence(thorough=True)``) vs
  ``RagSequenceForGeneration.generate`` (the same procedure: every distinct hypothesis scored
  under every passage); margin RAG-Sequence Fast (``thorough=False``);
- margin RAG-Token beam search (``decode_rag_token``) vs ``RagTokenForGeneration.generate``;
- the floor of each: the unavoidable model work alone, the same kernels called directly. One
  encoder pass per (question, passage); the cross-attention keys/values once per row; the beam
  search's decoder steps on all (question, passage, beam) rows, as many steps as margin's search
  ran, each with its log-softmax (RAG-Token: and the marginal over passages); for Thorough, one
  teacher-forced pass over exactly the (hypothesis, passage) pairs no beam had scored.

Outputs must be identical token for token; the section says how many questions agree. Peak memory
is sampled from the process's resident set during each run (a thread reads /proc/self/statm every
5 ms; freed memory is handed back to the OS with malloc_trim before each run), as the growth over
the resident set before the run; on a GPU, torch's peak allocation.

    nice -n 10 .venv/bin/python benchmarks/decoding.py                 # print the section
    nice -n 10 .venv/bin/python benchmarks/decoding.py --write         # and put it in BENCHMARKS.md
    .venv/bin/python benchmarks/decoding.py --batch 2 --k 5 --runs 1   # a quick look
    .venv/bin/python benchmarks/decoding.py --device cuda              # on a GPU (fp32)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from _report import load_average, provenance, write_section
from margin.generation.decoding import DecodeConfig, Decoded, decode_rag_sequence, decode_rag_token
from margin.generation.generator import SCORE_CHUNK, GenInputs
from margin.generation.seq2seq import Seq2SeqGenerator

SECTION = "## Decoding vs transformers"
GPU_SECTION = "## Decoding vs transformers on a GPU"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
PASSAGE_TOKENS = 128  # tokens per (question, passage) context row
VOCAB = 50265  # BART's


# ----------------------------------------------------------------------------- models and inputs


class IdTokenizer:
    """Stands in for BART's tokenizer: the inputs are token ids already; text is the ids."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i < 4))


class CountingGenerator(Seq2SeqGenerator):
    """margin's seq2seq generator, recording its decoder steps and scoring calls (for the floor)."""

    steps: int = 0
    scored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def _forward_step(self, state):  # type: ignore[no-untyped-def]
        self.steps += 1
        return super()._forward_step(state)

    def score(self, enc, rows, target_ids, target_mask):  # type: ignore[no-untyped-def]
        self.scored.append((rows, target_ids, target_mask))
        return super().score(enc, rows, target_ids, target_mask)


def bart_base_config(**overrides: object) -> BartConfig:
    """BART-base's shape: 6+6 layers, d_model 768, 12 heads, FFN 3072, vocab 50,265."""
    cfg: dict[str, object] = dict(
        vocab_size=VOCAB, d_model=768, encoder_layers=6, decoder_layers=6,
        encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
        decoder_ffn_dim=3072, max_position_embeddings=1024,
        forced_eos_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    cfg.update(overrides)
    return BartConfig(**cfg)


@dataclass
class Models:
    bart: BartForConditionalGeneration
    seq: RagSequenceForGeneration  # transformers' RAG-Sequence over the same BART
    tok: RagTokenForGeneration  # transformers' RAG-Token over the same BART
    qenc: DPRQuestionEncoder
    gen: CountingGenerator = field(init=False)

    def __post_init__(self) -> None:
        self.gen = CountingGenerator(self.bart, IdTokenizer())
        self.gen.scored = []


def build_models(k: int, seed: int = 0, device: str = "cpu", **bart: object) -> Models:
    """Random fixed-seed BERT-base-shaped DPR question encoder and BART-base-shaped generator."""
    torch.manual_seed(seed)
    qcfg = DPRConfig()  # BERT-base: 12 layers, 768, vocab 30,522
    qenc = DPRQuestionEncoder(qcfg).eval()
    model = BartForConditionalGeneration(bart_base_config(**bart)).eval()
    model.generation_config.forced_bos_token_id = 0  # as BART's checkpoints set it
    cfg = RagConfig.from_question_encoder_generator_configs(qcfg, model.config, n_docs=k)
    seq = RagSequenceForGeneration(config=cfg, question_encoder=qenc, generator=model).eval()
    tokm = RagTokenForGeneration(config=cfg, question_encoder=qenc, generator=model).eval()
    for m in (qenc, model, seq, tokm):
        m.to(device)
    return Models(model, seq, tokm, qenc)


def make_inputs(
    batch: int, k: int, seed: int = 1, length: int = PASSAGE_TOKENS, vocab: int = VOCAB,
    device: str = "cpu",
) -> tuple[GenInputs, torch.Tensor]:
    """B x k context rows ``<s> ... </s>`` of ``length`` random tokens, and doc scores (B, k)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch * k, length), generator=g)  # (B*k, S) no specials
    ids[:, 0], ids[:, -1] = 0, 2
    scores = torch.randn(batch, k, generator=g)  # (B, k)
    mask = torch.ones_like(ids)
    return GenInputs.from_ids(ids.to(device), mask.to(device), k), scores.to(device)


# ----------------------------------------------------------------------------- the sides


def margin_sequence(m: Models, inputs: GenInputs, scores: torch.Tensor, cfg: DecodeConfig,
                    thorough: bool) -> list[Decoded]:
    return decode_rag_sequence(m.gen, inputs, scores, cfg, thorough=thorough)


def margin_token(m: Models, inputs: GenInputs, scores: torch.Tensor,
                 cfg: DecodeConfig) -> list[Decoded]:
    return decode_rag_token(m.gen, inputs, scores, cfg)


@torch.no_grad()
def hf_sequence(m: Models, inputs: GenInputs, scores: torch.Tensor,
                cfg: DecodeConfig) -> torch.Tensor:
    return m.seq.generate(
        context_input_ids=inputs.input_ids, context_attention_mask=inputs.attention_mask,
        doc_scores=scores, n_docs=inputs.n_docs, num_beams=cfg.num_beams,
        num_return_sequences=1, max_new_tokens=cfg.max_new_tokens,
    )


@torch.no_grad()
def hf_token(m: Models, inputs: GenInputs, scores: torch.Tensor,
             cfg: DecodeConfig) -> torch.Tensor:
    gc = m.bart.generation_config
    return m.tok.generate(
        context_input_ids=inputs.input_ids, context_attention_mask=inputs.attention_mask,
        doc_scores=scores, n_docs=inputs.n_docs, num_beams=cfg.num_beams,
        max_length=1 + cfg.max_new_tokens,  # RagToken ignores max_new_tokens; counts the start
        forced_bos_token_id=gc.forced_bos_token_id, forced_eos_token_id=gc.forced_eos_token_id,
    )


def as_rows(decoded: list[Decoded], start: int) -> list[tuple[int, ...]]:
    """Best hypotheses as transformers returns them: decoder start first, padding stripped."""
    return [(start, *d.best.token_ids) for d in decoded]


def hf_rows(out: torch.Tensor, pad: int) -> list[tuple[int, ...]]:
    return [tuple(t for t in row if t != pad) for row in out.tolist()]


# ----------------------------------------------------------------------------- the floor


@torch.no_grad()
def floor(m: Models, inputs: GenInputs, scores: torch.Tensor, beams: int, steps: int,
          scored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], marginal: bool) -> None:
    """The work no implementation can skip with identical outputs, the same kernels run directly.

    The encoder on every row; the decoder-start step once per row (it yields the cross-attention
    keys/values, which depend on the row only); ``steps`` more decoder steps over (rows x beams)
    with their log-softmax (``marginal``: and RAG-Token's sum over passages, renormalised); then
    teacher-forced passes over exactly the pairs in ``scored`` (Thorough's missing pairs), in
    chunks of at most SCORE_CHUNK logits, each on the cached cross-attention of its row.
    """
    bart, k = m.bart, inputs.n_docs
    start = bart.config.decoder_start_token_id
    hidden = bart.get_encoder()(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask
    ).last_hidden_state  # (R, S, d)
    R = hidden.shape[0]
    first = bart(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                 attention_mask=inputs.attention_mask,
                 decoder_input_ids=torch.full((R, 1), start, device=hidden.device),
                 cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), use_cache=True)
    F.log_softmax(first.logits[:, -1].float(), -1)
    cross = [(lay.keys, lay.values) for lay in first.cache.cross_attention_cache.layers]
    own = [(lay.keys, lay.values) for lay in first.cache.self_attention_cache.layers]

    def pick(kv: list, rows: torch.Tensor) -> list:
        return [(a.index_select(0, rows), b.index_select(0, rows)) for a, b in kv]

    rows = torch.arange(R, device=hidden.device).repeat_interleave(beams)  # (N,)
    cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=pick(own, rows)),
                                DynamicCache(ddp_cache_data=pick(cross, rows)))
    enc = BaseModelOutput(last_hidden_state=hidden.index_select(0, rows))
    mask = inputs.attention_mask.index_select(0, rows)
    prior = F.log_softmax(scores.float(), -1).repeat_interleave(beams, 0)[:, :, None]
    tok = torch.full((rows.numel(), 1), 4, device=hidden.device)  # any token: the same work
    for _ in range(steps):
        out = bart(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=tok,
                   cache=cache, use_cache=True)
        cache = out.cache
        lp = F.log_softmax(out.logits[:, -1].float(), -1)  # (N, V)
        if marginal:  # RAG-Token: (B*nb, k, V) -> (B*nb, V)
            V = lp.shape[-1]
            lp = lp.view(-1, k, beams, V).transpose(1, 2).reshape(prior.shape[0], k, V)
            F.log_softmax(torch.logsumexp(prior + lp, 1), -1)
    for rows, tgt, _ in scored:  # teacher-forced on exactly the missing pairs
        dec_in = torch.cat([torch.full_like(tgt[:, :1], start), tgt[:, :-1]], 1)  # (M, T)
        per = max(1, SCORE_CHUNK // (tgt.shape[1] * bart.config.vocab_size))
        for lo in range(0, rows.numel(), per):
            r = rows[lo : lo + per]
            out = bart(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[r]),
                       attention_mask=inputs.attention_mask[r],
                       decoder_input_ids=dec_in[lo : lo + per],
                       cache=EncoderDecoderCache(DynamicCache(),
                                                 DynamicCache(ddp_cache_data=pick(cross, r))),
                       use_cache=True)
            F.log_softmax(out.logits.float(), -1).gather(-1, tgt[lo : lo + per, :, None])


# ----------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak growth of resident memory during a block (CPU: sampled; CUDA: torch's counter)."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss() - self.base)

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


@dataclass
class Timing:
    label: str
    fn: Callable[[], object]
    scale: float = 1.0  # run at a smaller batch and scaled up to the full one
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    result: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) * self.scale

    def run(self, device: str) -> None:
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            self.result = self.fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - start)
        self.peaks.append(mem.peak)


def measure(sides: list[Timing], runs: int, device: str, warmups: list[Callable[[], object]]
            ) -> None:
    """A warm-up of each side, then ``runs`` rounds alternating the sides (fair under load)."""
    for w in warmups:
        w()
    for r in range(runs):
        for s in sides:
            s.run(device)
            print(f"  run {r + 1} {s.label}: {secs(s.times[-1])} s "
                  f"(peak +{s.peaks[-1] / 2**20:.0f} MiB)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- one configuration


@dataclass
class Result:
    k: int
    batch: int
    rows: dict[str, Timing]
    agree_seq: int  # questions whose Thorough answer equals transformers'
    agree_tok: int
    fast_differs: int  # questions whose Fast answer differs from Thorough's
    n: int  # questions compared
    hf_seq_batch: int
    missing_pairs: int
    steps: tuple[int, int]  # decoder steps of the RAG-Sequence and RAG-Token searches


def run_config(args: argparse.Namespace, k: int) -> Result:
    dev = args.device
    m = build_models(k, device=dev)
    cfg = DecodeConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    inputs, scores = make_inputs(args.batch, k, device=dev)
    hf_b = min(args.hf_seq_batch or args.batch, args.batch)
    small, small_scores = _first(inputs, scores, hf_b)
    warm, warm_scores = _first(inputs, scores, 1)
    start = m.bart.config.decoder_start_token_id
    pad = m.bart.config.pad_token_id

    # one untimed margin run of each search gives the floor its step count and missing pairs
    with torch.no_grad():
        m.gen.steps, m.gen.scored = 0, []
        margin_sequence(m, inputs, scores, cfg, thorough=True)
        seq_steps, seq_scored = m.gen.steps, list(m.gen.scored)
        m.gen.steps, m.gen.scored = 0, []
        margin_token(m, inputs, scores, cfg)
        tok_steps = m.gen.steps
    missing = sum(int(r.numel()) for r, _, _ in seq_scored)

    sides = {
        "thorough": Timing("margin RAG-Sequence, Thorough",
                           lambda: margin_sequence(m, inputs, scores, cfg, True)),
        "fast": Timing("margin RAG-Sequence, Fast",
                       lambda: margin_sequence(m, inputs, scores, cfg, False)),
        "hf_seq": Timing("transformers `RagSequenceForGeneration.generate`",
                         lambda: hf_sequence(m, small, small_scores, cfg), args.batch / hf_b),
        "floor_seq": Timing("floor, RAG-Sequence Thorough",
                            lambda: floor(m, inputs, scores, args.beams, seq_steps, seq_scored,
                                          False)),
        "token": Timing("margin RAG-Token", lambda: margin_token(m, inputs, scores, cfg)),
        "hf_tok": Timing("transformers `RagTokenForGeneration.generate`",
                         lambda: hf_token(m, inputs, scores, cfg)),
        "floor_tok": Timing("floor, RAG-Token",
                            lambda: floor(m, inputs, scores, args.beams, tok_steps, [], True)),
    }
    if args.sides:
        sides = {n: s for n, s in sides.items() if n in args.sides}
    warm_sides = {
        "thorough": lambda: margin_sequence(m, warm, warm_scores, cfg, True),
        "token": lambda: margin_token(m, warm, warm_scores, cfg),
        "hf_seq": lambda: hf_sequence(m, warm, warm_scores, cfg),
        "hf_tok": lambda: hf_token(m, warm, warm_scores, cfg),
    }
    warmups = [fn for name, fn in warm_sides.items() if name in sides]
    print(f"k={k}: B={args.batch}, {seq_steps} RAG-Sequence steps, {tok_steps} RAG-Token steps, "
          f"{missing} missing pairs", file=sys.stderr, flush=True)
    with torch.no_grad():
        measure(list(sides.values()), args.runs, dev, warmups)
        if args.profile:
            for name in ("token", "floor_tok", "hf_tok", "thorough"):
                if name in sides:
                    print(profile(sides[name], dev), file=sys.stderr, flush=True)

    def best(name: str) -> list[tuple[int, ...]] | None:
        s = sides.get(name)
        if s is None:
            return None
        if name.startswith("hf"):
            return hf_rows(s.result, pad)  # type: ignore[arg-type]
        return as_rows(s.result, start)  # type: ignore[arg-type]

    thorough, fast, token = best("thorough"), best("fast"), best("token")
    hf_s, hf_t = best("hf_seq"), best("hf_tok")
    agree_seq = sum(a == b for a, b in zip(thorough or [], hf_s or [], strict=False))
    agree_tok = sum(a == b for a, b in zip(token or [], hf_t or [], strict=False))
    differs = sum(a != b for a, b in zip(thorough or [], fast or [], strict=False))
    return Result(k, args.batch, sides, agree_seq, agree_tok, differs, args.batch, hf_b,
                  missing, (seq_steps, tok_steps))


def profile(side: Timing, device: str, rows: int = 12) -> str:
    """Where one run of ``side`` spends its time (torch.profiler): the ops by host time and, on a
    GPU, how busy the device was (kernel time over wall time: low means launch-bound)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=acts) as prof:
        start = time.perf_counter()
        side.fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # not the ops that ran them
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    table = events.table(sort_by="self_cpu_time_total", row_limit=rows)
    if kernels:  # and the kernels by device time: where the GPU's own time goes
        table += "\n" + events.table(sort_by="self_device_time_total", row_limit=rows)
    syncs = sum(e.count for e in events if e.key == "cudaStreamSynchronize")
    return (f"profile of {side.label}: wall {wall:.3f} s, kernels {busy:.3f} s "
            f"({busy / wall:.0%} of the wall), {syncs} stream synchronisations, "
            f"{sum(e.count for e in kernels)} kernels\n{table}")


def _first(inputs: GenInputs, scores: torch.Tensor, b: int) -> tuple[GenInputs, torch.Tensor]:
    k = inputs.n_docs
    return (GenInputs(inputs.input_ids[: b * k], inputs.attention_mask[: b * k], k), scores[:b])


def latency(args: argparse.Namespace) -> dict[str, Timing]:
    """Batch-1 latency, k=5: margin's three decodings and transformers' two generates."""
    dev = args.device
    m = build_models(5, device=dev)
    cfg = DecodeConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    inputs, scores = make_inputs(1, 5, seed=2, device=dev)
    sides = {
        "thorough": Timing("margin RAG-Sequence, Thorough",
                           lambda: margin_sequence(m, inputs, scores, cfg, True)),
        "fast": Timing("margin RAG-Sequence, Fast",
                       lambda: margin_sequence(m, inputs, scores, cfg, False)),
        "hf_seq": Timing("transformers RAG-Sequence", lambda: hf_sequence(m, inputs, scores, cfg)),
        "token": Timing("margin RAG-Token", lambda: margin_token(m, inputs, scores, cfg)),
        "hf_tok": Timing("transformers RAG-Token", lambda: hf_token(m, inputs, scores, cfg)),
    }
    with torch.no_grad():
        measure(list(sides.values()), args.runs, dev, [s.fn for s in sides.values()])
    return sides


# ----------------------------------------------------------------------------- default model

QUESTIONS = [
    "Who painted the Mona Lisa?", "What is the capital of Australia?",
    "Who wrote Pride and Prejudice?", "What is the largest planet in the Solar System?",
    "Who developed the theory of relativity?", "What is the longest river in Africa?",
    "Who was the first president of the United States?", "What is the chemical symbol for gold?",
    "In which country is the Taj Mahal?", "Who composed the Magic Flute?",
    "What is the capital of Canada?", "Who discovered penicillin?",
    "What language is spoken in Brazil?", "Who wrote Hamlet?",
    "What is the tallest mountain on Earth?", "Which planet is known as the Red Planet?",
]


def default_model_section(args: argparse.Namespace) -> str:
    """``margin ask`` on the default model and corpus, in a warm process: what ``rag.ask`` takes
    per question at batch 1 (p50 over the questions, after a warm-up) and questions/s at 16."""
    from margin.rag import RAG

    rag = RAG.load()
    rag.ask(QUESTIONS[:1])  # warm-up
    one = []
    for q in QUESTIONS:
        start = time.perf_counter()
        rag.ask([q])
        one.append(time.perf_counter() - start)
    whole = []
    for _ in range(args.runs):
        start = time.perf_counter()
        answers = rag.ask(QUESTIONS)
        whole.append(time.perf_counter() - start)
    p50 = statistics.median(one)
    rate = len(QUESTIONS) / statistics.median(whole)
    sample = "; ".join(f"{q} → {a.answer}" for q, a in zip(QUESTIONS[:4], answers, strict=False))
    return (
        f"Default model (`margin ask`: SmolLM2-135M-Instruct, default corpus and index, k="
        f"{rag.default_k}, RAG-{rag.default_mode.capitalize()} greedy), {args.threads} torch "
        f"thread(s), warm process (imports and model load excluded): p50 {p50:.2f} s per "
        f"question at batch 1 (p90 {sorted(one)[int(0.9 * len(one))]:.2f} s, "
        f"{len(one)} questions); batch {len(QUESTIONS)}: {rate:.2f} questions/s (median of "
        f"{args.runs}: {', '.join(f'{t:.1f}' for t in whole)} s). Answers: {sample}."
    )


# ----------------------------------------------------------------------------- the report


def secs(x: float) -> str:
    """Seconds to three significant figures below 10 (GPU runs take milliseconds), else 0.1 s."""
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def _mib(t: Timing) -> str:
    return f"{max(t.peaks) / 2**20:,.0f}" if t.peaks else "-"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(args: argparse.Namespace, results: list[Result], lat: dict[str, Timing] | None,
           load_before: str) -> str:
    gpu = args.device.startswith("cuda")
    lines = [
        GPU_SECTION if gpu else SECTION,
        "",
        f"Random fixed-seed BART-base-shaped generator (6+6 layers, d_model 768, vocab 50,265; "
        f"forced BOS/EOS), {PASSAGE_TOKENS}-token context rows and document scores given to both "
        f"implementations, batch {args.batch}, beams {args.beams}, at most "
        f"{args.max_new_tokens} new tokens, {args.threads} torch thread(s), device "
        f"{args.device}, median of {args.runs} runs after a warm-up (batch 1), sides alternating "
        "in one process. Peak memory: "
        + ("torch's peak GPU allocation during the run, above what was allocated before it."
           if gpu else "growth of the resident set during the run, sampled every 5 ms."),
        "",
        "| k | decoding | seconds (median) | vs transformers | vs floor | peak MiB | runs (s) |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        s = r.rows
        for name in ("thorough", "fast", "hf_seq", "floor_seq", "token", "hf_tok", "floor_tok"):
            if name not in s:
                continue
            t = s[name]
            ref = s.get("hf_tok" if name in ("token", "hf_tok", "floor_tok") else "hf_seq")
            fl = s.get("floor_tok" if name in ("token", "hf_tok", "floor_tok") else "floor_seq")
            vs_ref = f"{ref.median / t.median:.2f}x faster" if ref and ref is not t else ""
            vs_floor = f"{t.median / fl.median:.2f}x" if fl and name in ("thorough", "token") \
                else ""
            label = t.label
            if name == "hf_seq" and t.scale != 1:
                label += f" (run at batch {r.hf_seq_batch}, scaled x{t.scale:g})"
            runs = ", ".join(secs(x) for x in t.times)
            lines.append(f"| {r.k} | {label} | {secs(t.median)} | {vs_ref} | {vs_floor} | "
                         f"{_mib(t)} | {runs} |")
    lines += ["", "Outputs and targets:", ""]
    for r in results:
        s = r.rows
        lines.append(
            f"- k={r.k}: RAG-Sequence Thorough best answers identical to transformers' for "
            f"{r.agree_seq}/{r.hf_seq_batch if 'hf_seq' in s else 0} questions; RAG-Token "
            f"{r.agree_tok}/{r.n if 'hf_tok' in s else 0}; Fast's answer differs from "
            f"Thorough's for {r.fast_differs}/{r.n if 'fast' in s else 0}. The searches ran "
            f"{r.steps[0]} and "
            f"{r.steps[1]} decoder steps; Thorough scored {r.missing_pairs} (hypothesis, "
            "passage) pairs that no beam had."
        )
        if {"thorough", "hf_seq", "floor_seq"} <= s.keys():
            th, hf, fl = s["thorough"].median, s["hf_seq"].median, s["floor_seq"].median
            lines.append(f"  Thorough: {hf / th:.2f}x faster than transformers (target >= 2: "
                         f"{_met(hf / th >= 2)}), {th / fl:.2f}x its floor (target <= 1.25: "
                         f"{_met(th / fl <= 1.25)}).")
        if {"fast", "hf_seq"} <= s.keys():
            ratio = s["hf_seq"].median / s["fast"].median
            lines.append(f"  Fast: {ratio:.2f}x faster than transformers' Thorough (target >= "
                         f"3.5: {_met(ratio >= 3.5)}).")
        if {"token", "hf_tok", "floor_tok"} <= s.keys():
            tk, hf, fl = s["token"].median, s["hf_tok"].median, s["floor_tok"].median
            lines.append(f"  RAG-Token: {hf / tk:.2f}x faster than transformers (target >= 1.5: "
                         f"{_met(hf / tk >= 1.5)}), {tk / fl:.2f}x its floor (target <= 1.25: "
                         f"{_met(tk / fl <= 1.25)}).")
    if lat:
        lines += ["", "Batch 1 (k=5), seconds per question (median) and peak MiB: "
                  + "; ".join(f"{t.label} {secs(t.median)} s, {_mib(t)} MiB" for t in lat.values())
                  + "."]
    lines += ["", *provenance("decoding.py", load_before, args.device)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="questions per call")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10], help="passages per question")
    parser.add_argument("--beams", type=int, default=4, help="beams")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="generated tokens at most")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    parser.add_argument("--hf-seq-batch", type=int, default=0,
                        help="run transformers' RAG-Sequence on the first N questions only and "
                        "scale its time to the batch (it loops over questions); 0 = full batch")
    parser.add_argument("--sides", nargs="*", default=None,
                        help="only these: thorough fast hf_seq floor_seq token hf_tok floor_tok")
    parser.add_argument("--no-latency", action="store_true", help="skip the batch-1 latencies")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one run each of margin RAG-Token, its floor, "
                        "transformers' RAG-Token and Thorough (torch.profiler; to stderr)")
    parser.add_argument("--default-model", action="store_true",
                        help="only time `margin ask` on the default model (set MARGIN_HOME)")
    parser.add_argument("--write", action="store_true", help=f"put the section in {BENCHMARKS_MD}")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = load_average()
    if args.default_model:
        print(default_model_section(args) + f" Load average {load_before} at the start, "
              f"{load_average()} at the end.")
        return 0
    results = [run_config(args, k) for k in args.k]
    lat = None if args.no_latency else latency(args)
    section = report(args, results, lat, load_before)
    print(section)
    if args.write:
        write_section(BENCHMARKS_MD, section)
        print(f"wrote {section.splitlines()[0]!r} to {BENCHMARKS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
