"""Tiny random transformers RAG checkpoints, written to disk the way the hub's are laid out.

``save_tiny_rag`` writes what ``RagSequenceForGeneration``/``RagTokenForGeneration.save_pretrained``
and ``RagTokenizer.save_pretrained`` write for facebook/rag-sequence-nq: config.json (model_type
"rag"), model.safetensors, question_encoder_tokenizer/ and generator_tokenizer/. Everything is
built from configs and vocabularies written here: no downloads.

The tokenizers survive a save/load round trip (every vocabulary entry has its own id), which
transformers' RagTokenizer.from_pretrained needs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    BartTokenizer,
    DPRConfig,
    DPRContextEncoder,
    DPRContextEncoderTokenizer,
    DPRQuestionEncoder,
    DPRQuestionEncoderTokenizer,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

from helpers import build_tiny_bart

# A corpus whose passages the tiny models tell apart; one title is quoted (postprocess_docs strips
# one leading and one trailing double quote) and one text has a double space (collapsed).
DOCS = [
    {"id": "p0", "title": "Eiffel Tower", "text": "the eiffel tower is a tower in paris."},
    {"id": "p1", "title": "Paris", "text": "paris is the capital of  france."},
    {"id": "p2", "title": "Seine", "text": "the seine is a river in france."},
    {"id": "p3", "title": "Louvre", "text": "the louvre is an art museum in paris."},
    {"id": "p4", "title": "Berlin", "text": "berlin is the capital of germany."},
    {"id": "p5", "title": "Rhine", "text": "the rhine is a river in germany."},
    {"id": "p6", "title": "Alps", "text": "the alps are a mountain range."},
    {"id": "p7", "title": '"Rome"', "text": "rome is the capital of italy."},
]
# Capitals and a word outside the DPR vocabulary ("made"): the generator sees the question as the
# question tokenizer decodes it, lowercased and without [UNK].
QUESTIONS = ["Where is the Eiffel tower?", "what is the seine?", "who made the Louvre museum?"]
ANSWERS = ["paris", "a river in france", "an art museum"]

_DPR_WORDS = (
    "where what who is the a an in of are eiffel tower paris capital france seine river louvre "
    "art museum berlin germany rhine alps mountain range rome italy"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "o n", "Ġ a", "Ġ i", "Ġ /"]


def bart_tokenizer() -> BartTokenizer:
    """A byte-level BPE BartTokenizer whose vocabulary ids are all distinct and run without gaps
    (tests/helpers.py's generator-test tokenizer is another vocabulary, with gaps)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for tok in list(_CHARS + "/.?,:'\"-") + ["Ġ"] + ["Ġ" + c for c in _CHARS + "/\"'"]:
        vocab.setdefault(tok, len(vocab))
    for merge in _MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<mask>"] = len(vocab)
    tmp = tempfile.mkdtemp()
    try:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in _MERGES))
        return BartTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp)


def dpr_tokenizer(cls=DPRQuestionEncoderTokenizer):
    """An uncased WordPiece tokenizer over the corpus words (BERT's, as DPR's)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ".", *_DPR_WORDS]
    tmp = tempfile.mkdtemp()
    try:
        Path(tmp, "vocab.txt").write_text("\n".join(words) + "\n")
        return cls.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp)


def dpr_config(vocab_size: int) -> DPRConfig:
    return DPRConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        initializer_range=0.5,  # large init: passages and questions get distinct vectors
    )


def tiny_dpr_question_encoder(vocab_size: int, seed: int = 3) -> DPRQuestionEncoder:
    torch.manual_seed(seed)
    return DPRQuestionEncoder(dpr_config(vocab_size)).eval()


def tiny_dpr_context_encoder(vocab_size: int, seed: int = 6) -> DPRContextEncoder:
    torch.manual_seed(seed)
    return DPRContextEncoder(dpr_config(vocab_size)).eval()


def save_dpr_encoders(out: Path) -> tuple[Path, Path]:
    """Save a tiny DPRQuestionEncoder and DPRContextEncoder (+ tokenizers); return both dirs."""
    qtok, ctok = dpr_tokenizer(), dpr_tokenizer(DPRContextEncoderTokenizer)
    qdir, cdir = out / "dpr-question", out / "dpr-context"
    tiny_dpr_question_encoder(len(qtok)).save_pretrained(qdir)
    qtok.save_pretrained(qdir)
    tiny_dpr_context_encoder(len(ctok)).save_pretrained(cdir)
    ctok.save_pretrained(cdir)
    return qdir, cdir


def save_tiny_rag(
    out: Path, mode: str, n_docs: int = 3, max_combined_length: int = 300, **generator_extra
) -> Path:
    """Write a tiny RagSequenceForGeneration ("sequence") or RagTokenForGeneration ("token") dir.

    Its question encoder is the one :func:`save_dpr_encoders` saves (same seed, same weights).
    ``generator_extra`` lands in config.json's generator sub-config (legacy generation options,
    as in 2020 checkpoints, which also have no generation_config.json).
    """
    qtok, gtok = dpr_tokenizer(), bart_tokenizer()
    # tests/helpers.py's one BART builder over this file's vocabulary, with a longer position table
    # and a smaller </s> bias: the weights the checkpoint tests were written against
    bart = build_tiny_bart(gtok, eos_bias=2.5, max_position_embeddings=256)
    qenc = tiny_dpr_question_encoder(len(qtok))
    config = RagConfig.from_question_encoder_generator_configs(
        qenc.config,
        bart.config,
        n_docs=n_docs,
        max_combined_length=max_combined_length,
        retrieval_vector_size=qenc.config.hidden_size,
    )
    cls = RagSequenceForGeneration if mode == "sequence" else RagTokenForGeneration
    model = cls(config=config, question_encoder=qenc, generator=bart).eval()
    model.save_pretrained(out)
    RagTokenizer(question_encoder=qtok, generator=gtok).save_pretrained(out)
    if generator_extra:
        path = out / "config.json"
        raw = json.loads(path.read_text())
        raw["generator"].update(generator_extra)
        path.write_text(json.dumps(raw, indent=2))
        (out / "generation_config.json").unlink(missing_ok=True)
    return out


def write_corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path
