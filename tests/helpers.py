"""What several test files share: fakes whose answers can be worked out by hand, tiny random
models built from configs written here (no downloads), and the small worlds (an index pair for the
server, a training task) that more than one file tests.

A test file imports these from here and never from another test module, so every test file can be
read and run alone. The fixtures that build them once per session or module (``bart``, ``llama``,
``st_model``, ``ray_cluster``) are in tests/conftest.py; the tiny transformers RAG checkpoints
written the way the hub lays them out are in tests/_tiny_rag.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartTokenizer,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from margin.generation.causal import CausalFormat, CausalGenerator
from margin.generation.decoding import DecodeConfig
from margin.model_config import ModelConfig
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever
from margin.serving.config import ServeConfig

# -- hand-checkable encoders and vectors ------------------------------------------------------

# One dimension per keyword. A text's vector counts its keywords and is L2-normalised, so the
# inner product of a one-keyword query with a passage is that keyword's share of the passage.
KEYWORDS = ("paris", "france", "berlin", "germany", "rome", "italy", "river", "mountain")


class KeywordEncoder:
    """Deterministic fake of margin's Encoder protocol: normalised keyword counts."""

    def __init__(self, keywords: Sequence[str] = KEYWORDS, role: str = "passage"):
        self.keywords = list(keywords)
        self.dim = len(self.keywords)
        self.spec = {"kind": "keyword", "name": "keyword-" + "-".join(self.keywords), "role": role}
        self.fingerprint = hashlib.sha256(json.dumps(self.keywords).encode()).hexdigest()
        self.passages_encoded = 0  # how many passages encode_passages has seen (resume tests)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (n, dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                if word in self.keywords:
                    out[i, self.keywords.index(word)] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)

    def encode_passages(
        self, passages: Sequence[Passage], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        self.passages_encoded += len(passages)
        return self.embed([f"{p.title} {p.text}" for p in passages])

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        return self.embed(list(texts))


class TorchKeywordEncoder(KeywordEncoder):
    """The keyword encoder plus a learnable (dim x dim) question-side map, identity at start.

    Questions embed as W·kw(x), so d(z)ᵀq(x) equals the keyword inner product at initialisation and
    the document prior sends gradient into W, like a real question encoder (Sec. 2.4).
    """

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(self.dim, self.dim, bias=False)
        with torch.no_grad():
            self.module.weight.copy_(torch.eye(self.dim))

    def embed_queries(self, texts):
        return self.module(torch.from_numpy(self.embed(list(texts))))  # (n, dim)


class TableEncoder(KeywordEncoder):
    """Looks each passage's vector up by id: lets a test index any vectors it likes."""

    def __init__(self, table: dict[str, np.ndarray]):
        super().__init__()
        self.table = table
        self.dim = len(next(iter(table.values())))

    def encode_passages(self, passages, batch_size=64, progress=False):
        self.passages_encoded += len(passages)
        return np.stack([self.table[p.id] for p in passages])


def make_pdf(pages: list[str], title: str) -> bytes:
    """A minimal PDF written by hand: one Helvetica text line per page, a metadata title."""
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        4: b"<< /Title (" + title.encode() + b") >>",
    }
    kids = []
    for i, text in enumerate(pages):
        page, content = 5 + 2 * i, 6 + 2 * i
        kids.append(f"{page} 0 R")
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects[page] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {content} 0 R >>"
        ).encode()
        objects[content] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref, size = len(out), max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 4 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        size, xref)
    return bytes(out)


# A tiny corpus: the keyword in each title is the hand-obvious answer to a one-word query.
DOCS = [
    {"title": "Paris", "text": "Paris is the capital of France and sits on a river."},
    {"title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"title": "Rome", "text": "Rome is the capital of Italy, near a mountain."},
    {"title": "Alps", "text": "A mountain range."},
    {"title": "Seine", "text": "The Seine is a river in France."},
    {"title": "Rhine", "text": "The Rhine is a river in Germany."},
]


def clustered(n: int, dim: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (realistic for ANN recall; uniform noise is not)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # (n, dim)


# -- a tiny random BERT (the encoders' tests, the CLI's sentence-transformers model) -----------

_BERT_WORDS = (
    "the a of is in and to was on for by with capital city france paris germany berlin river "
    "seine photosynthesis plants light energy cat dog sat mat who what where when painted mona "
    "lisa leonardo museum louvre"
).split()
_BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", *_BERT_WORDS]
TINY_BERT = dict(
    vocab_size=len(_BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.3,
    attention_probs_dropout_prob=0.3,
)


def bert_tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(_BERT_VOCAB)}, model_max_length=64)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one torch thread (and leave the machine's other cores alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- tiny random generators: a 2-layer BART and a 2-layer Llama -------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "o n", "Ġ a", "Ġ w", "Ġ /"]

PASSAGES = [
    [Passage("p1", '"Eiffel Tower"', "a tower in paris."), Passage("p2", "Paris", "the  capital.")],
    [Passage("p3", "Seine", "a river in  france."), Passage("p4", "Louvre", "an art museum.")],
]
QUESTIONS = ["where is the tower?", "what is the seine?"]


def bart_tokenizer() -> BartTokenizer:
    """A byte-level BPE BartTokenizer from a vocab.json + merges.txt written to a tmp dir."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for tok in list(_LETTERS + "/.?,:'\"-") + ["Ġ"] + ["Ġ" + c for c in _LETTERS + "/"]:
        vocab[tok] = len(vocab)
    for merge in _MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<mask>"] = len(vocab)
    tmp = tempfile.mkdtemp()
    try:
        with open(f"{tmp}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{tmp}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
        return BartTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp)


def bart_config(vocab_size: int, **kw) -> BartConfig:
    base = dict(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=0.3,  # large init: generations differ across passages, so parity can fail
    )
    base.update(kw)
    return BartConfig(**base)


def build_tiny_bart(
    tokenizer: BartTokenizer, seed: int = 0, eos_bias: float = 5.0, **config
) -> BartForConditionalGeneration:
    """The one tiny random BART builder: :func:`bart_config` (``config`` overrides) over
    ``tokenizer``'s vocabulary, seeded, never generating <pad>.

    ``eos_bias`` is added to </s>'s logit so that hypotheses end at mixed lengths; the tests that
    rely on it (beams finishing early, groups dropped) were written against these exact weights.
    """
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(bart_config(len(tokenizer), **config)).eval()
    with torch.no_grad():
        model.final_logits_bias[0, tokenizer.pad_token_id] = -1e4  # never generate <pad>
        model.final_logits_bias[0, tokenizer.eos_token_id] = eos_bias  # mixed-length hypotheses
    return model


@cache
def tiny_bart(seed: int = 0) -> tuple[BartForConditionalGeneration, BartTokenizer]:
    """The generator tests' BART and its tokenizer, built once per seed."""
    tok = bart_tokenizer()
    model = build_tiny_bart(tok, seed)
    model.generation_config.forced_bos_token_id = 0  # as facebook/bart-large's generation config
    return model, tok


_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@cache
def tiny_llama(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer Llama with a word-level tokenizer whose chat template wraps the user turn."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<pad> <unk> <s> </s> <|user|> <|assistant|> context question paris tower river".split()
    words += "where what is the a in of eiffel seine louvre art museum capital france".split()
    words += list(_LETTERS) + list(":?./")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=_CHAT,
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


# A few-shot-like preamble every prompt starts with, so the rows share a long token prefix.
PREAMBLE = "the louvre is an art museum in paris . the seine is a river in france . "


def preamble_prompt(tokenizer, question, passage):
    context = "" if passage is None else passage.text
    return f"{PREAMBLE}{context} question : {question} :"


def bare_prompt(tokenizer, question, passage):
    """Question first: prompts of different questions share no token."""
    return f"{question} {'' if passage is None else passage.text} :"


def causal(prompt_fn=preamble_prompt, share_prefix=True, suffix_padding=0.25) -> CausalGenerator:
    model, tok = tiny_llama()
    fmt = CausalFormat(prompt_fn, share_prefix=share_prefix, suffix_padding=suffix_padding)
    return CausalGenerator(model, tok, fmt)


# -- the server's world: two indexes over corpora that differ in two facts (Sec. 4.5) ---------

ADMIN_TOKEN = "s3cret-admin-token"
SERVER_KEYWORDS = ("capital", "germany", "france", "italy", "river", "mountain")
CORPUS_2016 = [
    ("Berlin", "Berlin is the capital of Germany."),
    ("Paris", "Paris is the capital of France."),
    ("Rome", "Rome is the capital of Italy."),
    ("Rhine", "The Rhine is a river in Germany."),
    ("Seine", "The Seine is a river in France."),
    ("Alps", "The Alps are a mountain range in Italy."),
]
# the same corpus with two facts changed
CORPUS_2018 = [("Bonn", "Bonn is the capital of Germany."), CORPUS_2016[1],
               ("Florence", "Florence is the capital of Italy."), *CORPUS_2016[3:]]
# keyword vectors: "capital of germany" scores 1 on the capital passage, at most 1/2 on the others
SERVER_QUESTIONS = ["capital of germany?", "capital of italy?", "capital of france?"]
SERVER_TOP = {"2016": ["Berlin", "Rome", "Paris"], "2018": ["Bonn", "Florence", "Paris"]}


class QuestionKeywords(KeywordEncoder):
    """The keyword encoder as a question encoder: RAG recomputes d(z)ᵀq(x) in torch."""

    def embed_queries(self, texts):
        return torch.from_numpy(self.embed(list(texts)))  # (n, dim)


def build_world(root, bart) -> tuple:
    """Index root with the 2016 and 2018 indexes, the model, and a reference RAG per index."""
    for year, docs in (("2016", CORPUS_2016), ("2018", CORPUS_2018)):
        passages = [Passage(f"{year}-{i}", t, x) for i, (t, x) in enumerate(docs)]
        build_index(
            passages, QuestionKeywords(SERVER_KEYWORDS), root / year, kind="flat", progress=False
        )
    build_index([Passage("x", "Alps", "mountain")], QuestionKeywords(SERVER_KEYWORDS),
                root / "extra", kind="flat", progress=False)
    refs = {
        year: RAG(bart, Retriever(open_index(root / year), QuestionKeywords(SERVER_KEYWORDS)),
                  doc_score_scale=5.0, default_decode=DecodeConfig(max_new_tokens=8), default_k=3)
        for year in ("2016", "2018")
    }
    return root, refs


def make_app(world, **config):
    from margin.serving.server import create_app  # FastAPI (the serve extra): only these tests

    root, refs = world
    config.setdefault("admin_token", ADMIN_TOKEN)
    config.setdefault("index_root", root)
    indexes = {"2016": root / "2016", "2018": root / "2018"}
    return create_app(refs["2016"], indexes, ServeConfig(**config))


# -- the fine-tuning task: 8 questions whose one-word answers are in a 6-passage corpus -------

TRAIN_DOCS = [
    ("paris", "paris is the capital of france ."),
    ("seine", "the seine is a river in france ."),
    ("louvre", "the louvre is a museum in paris ."),
    ("berlin", "berlin is the capital of germany ."),
    ("plants", "plants use light energy in photosynthesis ."),
    ("mona lisa", "the mona lisa was painted by leonardo ."),
]
TRAIN_TASK = [  # (question, answer): every answer is a word of a passage
    ("what is the capital of france ?", "paris"),
    ("where is the seine ?", "france"),
    ("what is the seine ?", "river"),
    ("where is the louvre ?", "paris"),
    ("what is the louvre ?", "museum"),
    ("what is paris ?", "capital"),
    ("where is paris ?", "france"),
    ("what is in paris ?", "louvre"),
]
TRAIN_CONFIG = ModelConfig(generator_kind="causal", prompt="chat", doc_score_scale=5.0,
                           decode=DecodeConfig(max_new_tokens=3),
                           stop_at_newline=False)


def kill_after_shards(script: str, args: Sequence[str], work: Path, shards: int = 3) -> bytes:
    """Run ``python -c script *args`` and ``kill -9`` it once ``work`` holds ``shards`` embedding
    shards (a crash mid-build); returns what it printed. It must not have finished by then."""
    with subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 60
        while len(list((work / "embeddings").glob("shard-*.npy"))) < shards:
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, f"the build never wrote {shards} shards"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"finished" not in stdout
    return stdout



class FakeClock:
    """A training loop's time (``module._clock``) that passes only in its loss: each call of
    ``module._batch_loss`` takes ``tick`` seconds, the rest none (margin.training.train and
    margin.training.contrastive both keep these two names for this)."""

    def __init__(self, monkeypatch, module, tick: float = 30.0):
        self.now, self.tick = 0.0, tick
        real = module._batch_loss

        def timed(*args, **kwargs):
            self.now += self.tick
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "_clock", lambda: self.now)
        monkeypatch.setattr(module, "_batch_loss", timed)
