"""Question and passage encoders: the two towers of RAG's retriever.

RAG retrieves with a DPR bi-encoder (Sec. 2): p(z|x) ∝ exp(d(z)ᵀ q(x)), where d embeds a passage and
q a question. The passage side is frozen and indexed once (Sec. 2.4), so it only needs fast,
deterministic batch encoding (``encode_passages``). The question side must do that too (retrieval
at test time) and, during fine-tuning, give a differentiable embedding (``embed_queries``) so the
document prior recomputed in the autograd graph trains q.

Three kinds of model sit behind one :class:`Encoder`:

- ``sentence-transformers``: a directory with ``modules.json`` (or a hub name); the model's own
  Transformer/Pooling/Normalize modules. A passage is embedded as ``title + " " + text`` (the BEIR
  convention for sentence-transformers retrieval; just the text when there is no title).
- ``dpr``: transformers' ``DPRContextEncoder`` (passages) / ``DPRQuestionEncoder`` (questions),
  ``pooler_output``, inner product, encoded exactly as transformers' RAG does: passages as the
  (title, text) pair, ``input_ids`` and ``attention_mask`` only (``token_type_ids`` stay zero, as in
  ``use_own_knowledge_dataset.py`` and the original DPR code).
- ``hf``: any ``AutoModel`` with CLS or mean pooling, optionally L2-normalised; passages as for
  sentence-transformers.

Speed: every call tokenizes its inputs once, sorts them by token count (tighter batches than
sorting by characters), pads each batch with numpy and runs under ``torch.inference_mode``; the
result is put back in input order. Example::

    enc = load_encoder("default", role="passage")
    vecs = enc.encode_passages([Passage("1", "Paris", "Paris is the capital of France.")])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from margin.errors import MarginError
from margin.retrieval.passages import Passage

KINDS = ("sentence-transformers", "dpr", "hf")
ROLES = ("question", "passage")
_POOLINGS = {"sentence-transformers": ("model",), "dpr": ("pooler",), "hf": ("mean", "cls")}
_SORT_WINDOW = 16_384  # texts tokenized and length-sorted together (bounds tokenizer memory)
_DEFAULT_MAX_LENGTH = 512  # cap when neither tokenizer nor config gives a smaller limit
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Beside a trained question encoder's weights: the passage encoder it was trained against
# (margin.training.contrastive), so that an index built with that one accepts it.
PAIRING_FILE = "margin_trained_for.json"
PAIRING_FORMAT = "margin-encoder-pairing"


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder; stored next to an index as JSON."""

    kind: str  # "sentence-transformers", "dpr" or "hf"
    name: str  # local directory or Hugging Face hub name the weights load from
    role: str  # "question" or "passage"
    pooling: str  # "model" (sentence-transformers' own), "pooler" (DPR), "mean" or "cls" (hf)
    max_length: int  # tokens per input after truncation (a DPR title+text pair counts as one)
    normalize: bool  # outputs L2-normalised (sentence-transformers: as the model says)


# ----------------------------------------------------------------------------- the math


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that the attention mask keeps (Sentence-BERT's MEAN pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    summed = (hidden * weights).sum(dim=1)  # (batch, dim)
    return summed / weights.sum(dim=1).clamp(min=1e-9)  # (batch, dim)


def cls_pool(hidden: torch.Tensor) -> torch.Tensor:
    """The first token's vector ([CLS] for BERT), as DPR's retriever uses before its pooler."""
    return hidden[:, 0]  # (batch, dim)


def passage_text(passage: Passage) -> str:
    """One string for a passage, for single-sequence encoders: ``title + " " + text`` (BEIR)."""
    return f"{passage.title} {passage.text}".strip() if passage.title else passage.text


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the state dict: per tensor, in name order, its name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- encoders


class Encoder:
    """A question or passage encoder: batched ``encode_*`` to numpy, ``embed_queries`` in autograd.

    Subclasses say how a batch of token ids becomes vectors (``_forward``) and how a passage becomes
    tokenizer input (``_passage_inputs``); batching, sorting and padding live here.
    """

    dim: int  # embedding dimension
    module: torch.nn.Module  # the trainable torch module behind embed_queries
    tokenizer: Any  # the transformers tokenizer that matches module
    pass_token_type_ids: bool = True  # DPR, as RAG calls it, leaves token_type_ids at zero
    trained_for: dict[str, str] | None = None  # PAIRING_FILE's record, when the directory has one

    def __init__(self, spec: EncoderSpec, module: torch.nn.Module, tokenizer: Any, dim: int):
        self._spec = spec
        self.module = module
        self.tokenizer = tokenizer
        self.dim = dim
        self._fingerprint: tuple[tuple, str] | None = None

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description: ``load_encoder_from_spec(enc.spec)`` rebuilds this encoder."""
        return asdict(self._spec)

    @property
    def role(self) -> str:
        return self._spec.role

    @property
    def max_length(self) -> int:
        return self._spec.max_length

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights, recomputed only after a weight changed (an optimizer step)."""
        # Every in-place write (optimizer steps included) bumps a tensor's version counter.
        key = tuple(
            (name, t.data_ptr(), t._version)
            for name, t in self.module.state_dict(keep_vars=True).items()
        )
        if self._fingerprint is None or self._fingerprint[0] != key:
            self._fingerprint = (key, weights_fingerprint(self.module))
        return self._fingerprint[1]

    def save(self, directory: str | Path) -> None:
        """Write weights (safetensors) and tokenizer so ``load_encoder(directory)`` reloads it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.module.save_pretrained(directory)  # type: ignore[operator]
        self.tokenizer.save_pretrained(directory)

    def __repr__(self) -> str:
        s = self._spec
        return f"{type(self).__name__}(name={s.name!r}, role={s.role!r}, dim={self.dim})"

    # -- public API

    def encode_passages(
        self, passages: Sequence[Passage], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embed passages for the index: float32 ``(n, dim)``, in input order, deterministic."""
        firsts, seconds = self._passage_inputs(passages)
        return self._encode(firsts, seconds, batch_size, progress, "passages")

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embed questions for retrieval: float32 ``(n, dim)``, in input order, deterministic."""
        return self._encode(_as_texts(texts), None, batch_size, progress, "queries")

    def embed_queries(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed questions inside the autograd graph: ``(n, dim)`` on the module's device.

        Not under no_grad, so the document prior p(z|x) recomputed from these vectors sends gradient
        into the question encoder (Sec. 2.4). The module's train/eval mode is the caller's choice.
        """
        texts = _as_texts(texts)
        if not texts:
            return torch.zeros((0, self.dim), device=self.device)
        features = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding="longest",
            return_tensors="pt",
        )
        features = {k: v.to(self.device) for k, v in features.items() if self._keeps(k)}
        return self._forward(features)  # (n, dim)

    def embed_passages(self, passages: Sequence[Passage]) -> torch.Tensor:
        """Embed passages inside the autograd graph, as ``encode_passages`` would: ``(n, dim)``.

        For training the passage encoder (margin.training.contrastive); like ``embed_queries``,
        the module's train/eval mode is the caller's choice.
        """
        if not passages:
            return torch.zeros((0, self.dim), device=self.device)
        firsts, seconds = self._passage_inputs(passages)
        features = self.tokenizer(
            firsts, seconds, truncation=True, max_length=self.max_length, padding="longest",
            return_tensors="pt",
        )
        features = {k: v.to(self.device) for k, v in features.items() if self._keeps(k)}
        return self._forward(features)  # (n, dim)

    # -- what subclasses define

    def _passage_inputs(self, passages: Sequence[Passage]) -> tuple[list[str], list[str] | None]:
        return [passage_text(p) for p in passages], None

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- batching

    def _keeps(self, key: str) -> bool:
        return key in ("input_ids", "attention_mask") or (
            key == "token_type_ids" and self.pass_token_type_ids
        )

    def _encode(
        self, firsts: list[str], seconds: list[str] | None, batch_size: int, progress: bool,
        what: str,
    ) -> np.ndarray:
        if batch_size < 1:
            raise MarginError(f"batch_size must be at least 1, got {batch_size}; pass one >= 1")
        out = np.empty((len(firsts), self.dim), dtype=np.float32)  # (n, dim)
        bar = _progress_bar(len(firsts), what, progress)
        with torch.inference_mode(), _eval_mode(self.module):
            for start in range(0, len(firsts), _SORT_WINDOW):
                stop = start + _SORT_WINDOW
                window = self._encode_window(
                    firsts[start:stop], seconds[start:stop] if seconds is not None else None,
                    batch_size, bar,
                )
                out[start:stop] = window
        if bar is not None:
            bar.close()
        return out

    def _encode_window(
        self, firsts: list[str], seconds: list[str] | None, batch_size: int, bar: Any
    ) -> np.ndarray:
        """Tokenize once, run batches longest first, and return vectors in input order."""
        encoded = self.tokenizer(
            firsts, seconds, truncation=True, max_length=self.max_length, padding=False,
            return_attention_mask=False,
        )
        ids: list[list[int]] = encoded["input_ids"]
        types = encoded.get("token_type_ids") if self._keeps("token_type_ids") else None
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")  # longest first: the slowest batch runs first
        out = np.empty((len(ids), self.dim), dtype=np.float32)  # (n, dim)
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            features = self._pad(ids, types, rows, int(lengths[rows[0]]))
            out[rows] = self._forward(features).float().cpu().numpy()  # (batch, dim)
            if bar is not None:
                bar.update(len(rows))
        return out

    def _pad(
        self, ids: list[list[int]], types: list[list[int]] | None, rows: np.ndarray, width: int
    ) -> dict[str, torch.Tensor]:
        """Pad the selected sequences to ``width`` on the tokenizer's padding side."""
        pad_id = self.tokenizer.pad_token_id or 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (batch, seq)
        mask = np.zeros((len(rows), width), dtype=np.int64)  # (batch, seq)
        type_ids = np.zeros((len(rows), width), dtype=np.int64) if types is not None else None
        for r, i in enumerate(rows):
            seq = ids[i]
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            input_ids[r, span] = seq
            mask[r, span] = 1
            if type_ids is not None and types is not None:
                type_ids[r, span] = types[i]
        features = {"input_ids": input_ids, "attention_mask": mask}
        if type_ids is not None:
            features["token_type_ids"] = type_ids
        return {k: torch.from_numpy(v).to(self.device) for k, v in features.items()}


class SentenceTransformerEncoder(Encoder):
    """A sentence-transformers model run through its own Transformer, Pooling, Normalize modules."""

    def save(self, directory: str | Path) -> None:
        self.module.save(str(directory))  # type: ignore[operator]  # modules.json + weights

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(dict(features))["sentence_embedding"]  # (batch, dim)


class DPREncoder(Encoder):
    """transformers' DPRContextEncoder / DPRQuestionEncoder: ``pooler_output``, inner product."""

    pass_token_type_ids = False

    def _passage_inputs(self, passages: Sequence[Passage]) -> tuple[list[str], list[str] | None]:
        return [p.title for p in passages], [p.text for p in passages]

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**features).pooler_output  # (batch, dim)


class HFEncoder(Encoder):
    """Any transformers AutoModel with CLS or mean pooling, optionally L2-normalised."""

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.module(**features).last_hidden_state  # (batch, seq, dim)
        if self._spec.pooling == "cls":
            pooled = cls_pool(hidden)  # (batch, dim)
        else:
            pooled = mean_pool(hidden, features["attention_mask"])  # (batch, dim)
        if self._spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


# ----------------------------------------------------------------------------- loading


def load_encoder(
    name: str | Path,
    role: Literal["question", "passage"] = "question",
    kind: str = "auto",
    pooling: str | None = None,
    max_length: int | None = None,
    device: str = "cpu",
    normalize: bool = False,
) -> Encoder:
    """Load a question or passage encoder from a local directory or a hub name.

    ``name="default"`` is the packaged all-MiniLM-L6-v2. ``kind="auto"`` picks sentence-transformers
    when there is a ``modules.json``, DPR when config.json says ``model_type: dpr``, else ``hf``.
    ``normalize`` applies to ``kind="hf"`` only. Remote code is never trusted.
    """
    if role not in ROLES:
        raise MarginError(f"unknown encoder role {role!r}; use one of {', '.join(ROLES)}")
    if kind != "auto" and kind not in KINDS:
        raise MarginError(f"unknown encoder kind {kind!r}; use auto or one of {', '.join(KINDS)}")
    if max_length is not None and max_length < 2:
        raise MarginError(f"max_length must be at least 2 tokens, got {max_length}")
    if str(name) == "default":
        from margin.assets import DEFAULT_ENCODER

        name = DEFAULT_ENCODER.path()
    source = _resolve_source(name)
    if kind == "auto":
        kind = _detect_kind(source)
    allowed = _POOLINGS[kind]
    pooling = pooling or allowed[0]
    if pooling not in allowed:
        raise MarginError(
            f"pooling {pooling!r} does not apply to a {kind} encoder; use {' or '.join(allowed)}"
        )
    if normalize and kind != "hf":
        raise MarginError(f"normalize applies to kind 'hf' only, not {kind}; drop it")
    with _load_errors(source):
        if kind == "sentence-transformers":
            encoder = _load_sentence_transformer(source, role, max_length, device)
        elif kind == "dpr":
            encoder = _load_dpr(source, role, max_length, device)
        else:
            encoder = _load_hf(source, role, pooling, max_length, device, normalize)
    encoder.trained_for = read_pairing(source)
    return encoder


def save_pairing(directory: str | Path, question: str, passage: str) -> None:
    """Record beside a question encoder's weights (fingerprint ``question``) the fingerprint of
    the passage encoder it was trained against: an index built with that passage encoder accepts
    it (margin.retrieval.reader.ensure_query_encoder_matches), other indexes refuse it."""
    from margin._io import write_json_atomic

    write_json_atomic(Path(directory) / PAIRING_FILE, {
        "format": PAIRING_FORMAT, "version": 1, "question_fingerprint": question,
        "passage_fingerprint": passage,
    })


def read_pairing(source: str) -> dict[str, str] | None:
    """The record :func:`save_pairing` wrote in a local model directory, or None."""
    path = Path(source) / PAIRING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ok = record.get("format") == PAIRING_FORMAT and all(
            isinstance(record.get(k), str) for k in ("question_fingerprint", "passage_fingerprint"))
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise MarginError(f"{path} is not a {PAIRING_FORMAT} record; delete it or re-save the "
                          "encoder")
    return {k: record[k] for k in ("question_fingerprint", "passage_fingerprint")}


def load_encoder_from_spec(spec: dict[str, Any], device: str = "cpu") -> Encoder:
    """Rebuild the encoder an ``Encoder.spec`` describes (e.g. the one stored with an index)."""
    missing = [f for f in ("kind", "name", "role") if f not in spec]
    if missing:
        raise MarginError(f"encoder spec lacks {', '.join(missing)}; use a spec from Encoder.spec")
    return load_encoder(
        spec["name"], role=spec["role"], kind=spec["kind"], pooling=spec.get("pooling"),
        max_length=spec.get("max_length"), device=device,
        normalize=bool(spec.get("normalize", False)) and spec["kind"] == "hf",
    )


def _load_sentence_transformer(
    source: str, role: str, max_length: int | None, device: str
) -> Encoder:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(source, device=device, trust_remote_code=False)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        raise MarginError(f"'{source}' has no text tokenizer; use a text embedding model")
    limit = max_length or model.max_seq_length or _tokenizer_limit(tokenizer, None)
    model.max_seq_length = limit
    # sentence-transformers >= 6 renamed get_sentence_embedding_dimension.
    get_dim = getattr(model, "get_embedding_dimension", None) or getattr(
        model, "get_sentence_embedding_dimension", None
    )
    normalized = any(type(m).__name__ == "Normalize" for m in model.children())
    spec = EncoderSpec("sentence-transformers", source, role, "model", limit, normalized)
    return SentenceTransformerEncoder(spec, model.eval(), tokenizer, int(get_dim()))


def _load_dpr(source: str, role: str, max_length: int | None, device: str) -> Encoder:
    from transformers import AutoConfig, AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    architectures = config.architectures or []
    expected = "DPRContextEncoder" if role == "passage" else "DPRQuestionEncoder"
    if architectures and expected not in architectures:
        raise MarginError(
            f"'{source}' is a {architectures[0]}, not a {expected}; "
            f"load it with the other role or pass the {expected} checkpoint"
        )
    cls = DPRContextEncoder if role == "passage" else DPRQuestionEncoder
    model = cls.from_pretrained(source, trust_remote_code=False).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    limit = max_length or _tokenizer_limit(tokenizer, config)
    dim = config.projection_dim or config.hidden_size
    spec = EncoderSpec("dpr", source, role, "pooler", limit, False)
    return DPREncoder(spec, model, tokenizer, dim)


def _load_hf(
    source: str, role: str, pooling: str, max_length: int | None, device: str, normalize: bool
) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(source, trust_remote_code=False).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    limit = max_length or _tokenizer_limit(tokenizer, model.config)
    spec = EncoderSpec("hf", source, role, pooling, limit, normalize)
    return HFEncoder(spec, model, tokenizer, int(model.config.hidden_size))


def _resolve_source(name: str | Path) -> str:
    """A local model directory as an absolute path string, or a plausible hub name as given."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (
            (path / "config.json").is_file() or (path / "modules.json").is_file()
        ):
            raise MarginError(
                f"'{name}' is not a model directory (no config.json or modules.json); "
                "pass a sentence-transformers or Hugging Face model directory"
            )
        return str(path.resolve())
    if isinstance(name, Path) or not _HUB_NAME.match(str(name)) or ".." in str(name):
        raise MarginError(
            f"no such model directory: '{name}'; pass an existing directory or a hub name "
            "like 'org/model'"
        )
    return str(name)


def _detect_kind(source: str) -> str:
    """modules.json -> sentence-transformers; config.json model_type dpr -> dpr; else hf."""
    if _model_file(source, "modules.json") is not None:
        return "sentence-transformers"
    config_path = _model_file(source, "config.json")
    if config_path is None:
        raise MarginError(f"'{source}' has no config.json or modules.json; it is not a model")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MarginError(f"{config_path}: not valid JSON ({exc}); fix or replace it") from exc
    architectures = config.get("architectures") or []
    if config.get("model_type") == "dpr" or any(str(a).startswith("DPR") for a in architectures):
        return "dpr"
    return "hf"


def _model_file(source: str, filename: str) -> Path | None:
    """``filename`` inside a local model directory, or fetched from the hub; None if absent."""
    local = Path(source)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename))
    except LocalEntryNotFoundError as exc:  # subclass of EntryNotFoundError: check it first
        raise MarginError(_hub_message(source, exc)) from exc
    except EntryNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MarginError(_hub_message(source, exc)) from exc


@contextlib.contextmanager
def _load_errors(source: str) -> Iterator[None]:
    """Turn a failed from_pretrained into a one-line MarginError."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise MarginError(
                f"cannot load the model in '{source}' ({_first_line(exc)}); "
                "check that the directory holds a complete transformers model"
            ) from exc
        raise MarginError(_hub_message(source, exc)) from exc


def _hub_message(source: str, exc: BaseException) -> str:
    return (
        f"'{source}' is not a local directory and could not be fetched from the Hugging Face hub "
        f"({type(exc).__name__}); check the name, or download the model and pass its directory"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tokenizer_limit(tokenizer: Any, config: Any) -> int:
    """The longest input the model takes: tokenizer and position-table limits, at most 512."""
    limits = [_DEFAULT_MAX_LENGTH, int(min(getattr(tokenizer, "model_max_length", 10**9), 10**9))]
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    return min(limits)


def _as_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise MarginError("expected a list of texts, got a single string; wrap it: [text]")
    return list(texts)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then every submodule's previous mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _progress_bar(total: int, what: str, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"encoding {what}", unit="text")
