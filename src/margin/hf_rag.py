"""Load transformers' RAG checkpoints (facebook/rag-sequence-nq, rag-token-nq) as a margin RAG.

The paper's released models live on as directories written by transformers'
``RagSequenceForGeneration``/``RagTokenForGeneration.save_pretrained`` plus
``RagTokenizer.save_pretrained``::

    DIR/config.json                    model_type "rag", question_encoder + generator sub-configs
    DIR/model.safetensors              rag.question_encoder.* (DPR) and rag.generator.* (BART)
    DIR/question_encoder_tokenizer/    the DPR (BERT) tokenizer
    DIR/generator_tokenizer/           the BART tokenizer

:func:`load_hf_rag` turns such a directory into a :class:`margin.rag.RAG` that computes what
transformers computes with the same passages (tests/test_hf_rag.py holds it to that, end to end):

- Generator input (``RagRetriever.postprocess_docs``): ``prefix + title + title_sep + text +
  doc_sep + question``, where the question is the question tokenizer's ids decoded back to text
  (``RagRetriever.__call__``): an uncased BERT tokenizer lowercases it and drops unknown words
  ([UNK] is a special token). Rows are padded to the longest row, not to
  ``max_combined_length``: margin masks padding everywhere, so only the compute changes.
- Document prior: softmax of the inner products d(z)ᵀq(x) (``doc_score_scale=1``, the paper's).
- Decoding defaults: the generation config transformers' ``RagTokenForGeneration.generate`` uses
  (``generation_config.json``, else one made from config.json, legacy generator fields
  included): beams, length limits, length penalty, early stopping, forced BOS/EOS. Options margin
  does not implement (``no_repeat_ngram_size``, ``repetition_penalty``, ...) are reported with a
  warning and not applied. ``n_docs`` becomes ``rag.default_k``; the architecture becomes
  ``rag.default_mode`` ("sequence" or "token").

Weights load from safetensors; a checkpoint with only ``pytorch_model.bin`` is read with
``torch.load(weights_only=True)`` (tensors only, never arbitrary pickled objects) or refused.
Remote code is never trusted. The retriever searches a margin index built with the DPR context
encoder that goes with the checkpoint (``margin index build --encoder DIR``); transformers'
wiki_dpr/legacy indexes (pickles) are not read.

    >>> rag = load_hf_rag("rag-sequence-nq", index="wiki-dpr-index")   # doctest: +SKIP
    >>> rag.ask(["who wrote hamlet?"], k=rag.default_k, mode=rag.default_mode)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from margin.errors import MarginError
from margin.generation.decoding import DecodeConfig
from margin.generation.generator import GenInputs
from margin.generation.seq2seq import Seq2SeqFormat, Seq2SeqGenerator
from margin.model_config import ModelConfig
from margin.rag import RAG
from margin.retrieval.encoders import DPREncoder, EncoderSpec
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever, resolve_index

MODES = {"RagSequenceForGeneration": "sequence", "RagTokenForGeneration": "token"}
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_DIRS = ("question_encoder_tokenizer", "generator_tokenizer")
DPR_CONTEXT_ENCODER = "facebook/dpr-ctx_encoder-multiset-base"  # the encoder of wiki_dpr
_MAX_QUESTION_TOKENS = 512  # BERT's position table; longer questions are truncated
# generation options margin's decoding honours, and transformers' values for unset ones
_DECODE_DEFAULTS = {
    "num_beams": 1, "max_length": 20, "max_new_tokens": None, "min_length": 0,
    "min_new_tokens": None, "length_penalty": 1.0, "early_stopping": False,
}
_TOKEN_FIELDS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
    "forced_bos_token_id", "forced_eos_token_id",
}
# options with no effect at these values (transformers' defaults); others are warned about
_NEUTRAL = {
    "do_sample": False, "num_return_sequences": 1, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0, "use_cache": True, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "return_dict_in_generate": False, "remove_invalid_values": False,
}


# ----------------------------------------------------------------------------- the generator


class RagCheckpointGenerator(Seq2SeqGenerator):
    """A seq2seq generator that reads the question as transformers' RAG passes it on.

    ``RagRetriever.__call__`` builds the generator input from the *question encoder's* token ids
    decoded back to text, so the generator of facebook/rag-*-nq only ever saw lowercased questions
    without unknown words. This class applies that round trip, then formats as usual.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        fmt: Seq2SeqFormat,
        question_tokenizer: Any,
        max_question_length: int = _MAX_QUESTION_TOKENS,
    ):
        super().__init__(model, tokenizer, fmt)
        self.question_tokenizer = question_tokenizer
        self.max_question_length = max_question_length  # as the question encoder truncates

    def rag_questions(self, questions: Sequence[str]) -> list[str]:
        """The question strings transformers' RAG puts into the generator input."""
        ids = self.question_tokenizer(
            list(questions), truncation=True, max_length=self.max_question_length
        )["input_ids"]
        return self.question_tokenizer.batch_decode(ids, skip_special_tokens=True)

    def build_inputs(
        self, questions: Sequence[str], passages: Sequence[Sequence[Passage]] | None
    ) -> GenInputs:
        return super().build_inputs(self.rag_questions(questions), passages)


# ----------------------------------------------------------------------------- config


def rag_mode(config: dict[str, Any]) -> str:
    """'sequence' for a RagSequenceForGeneration checkpoint, else 'token' (RagToken, RagModel)."""
    for name in config.get("architectures") or []:
        if name in MODES:
            return MODES[name]
    return "token"


def seq2seq_format(config: dict[str, Any]) -> Seq2SeqFormat:
    """The input formatting of ``RagRetriever.postprocess_docs`` for this config.json.

    The prefix is the generator's (``RagModel`` passes ``generator.config.prefix``); the
    top-level ``prefix`` of a RagConfig never reaches the retriever, so it is ignored here too.
    """
    generator = config.get("generator") or {}
    defaults = Seq2SeqFormat()
    return Seq2SeqFormat(
        prefix=generator.get("prefix") or "",
        title_sep=config.get("title_sep", defaults.title_sep),
        doc_sep=config.get("doc_sep", defaults.doc_sep),
        max_combined_length=int(config.get("max_combined_length", 300)),
        pad_to_max_length=False,  # padding is masked: padding every row to 300 only costs time
        cut_passage=False,  # an input over max_combined_length loses its end, as in transformers
    )


def decode_defaults(generation_config: Any) -> DecodeConfig:
    """DecodeConfig from a transformers GenerationConfig, unset fields at transformers' defaults.

    An encoder-decoder's ``max_length``/``min_length`` count the decoder start token, so the
    number of new tokens is one fewer.
    """
    get = {k: getattr(generation_config, k, None) for k in _DECODE_DEFAULTS}
    opt = {k: (v if v is not None else _DECODE_DEFAULTS[k]) for k, v in get.items()}
    max_new = opt["max_new_tokens"] if opt["max_new_tokens"] is not None else opt["max_length"] - 1
    min_new = opt["min_new_tokens"] if opt["min_new_tokens"] is not None else opt["min_length"] - 1
    return DecodeConfig(
        num_beams=int(opt["num_beams"]),
        max_new_tokens=max(int(max_new), 1),
        min_new_tokens=max(int(min_new), 0),
        length_penalty=float(opt["length_penalty"]),
        early_stopping=opt["early_stopping"],
    )


def unsupported_generation_options(generation_config: Any) -> list[str]:
    """Options the checkpoint sets that margin's decoding does not apply (e.g. no_repeat_ngram)."""
    return sorted(
        k
        for k, v in generation_config.to_diff_dict().items()
        if v is not None and not k.startswith("_") and k != "transformers_version"
        and k not in _DECODE_DEFAULTS and k not in _TOKEN_FIELDS
        and not (k in _NEUTRAL and _NEUTRAL[k] == v)
    )


# ----------------------------------------------------------------------------- loading


def load_hf_rag(
    path: str | Path, index: str | Path | None = None, progress: bool = True
) -> RAG:
    """A margin RAG from a transformers RAG directory, retrieving from a margin ``index``.

    index: a margin index directory built with the checkpoint's DPR context encoder (or a BM25
        index), or None for a model without a retriever (``RAG.generate`` with given passages).
    The returned RAG also carries ``default_mode`` ("sequence"/"token", from the architecture),
    ``default_k`` (the checkpoint's n_docs) and ``config`` (a margin ModelConfig).
    """
    path = Path(path)
    config = _read_config(path)
    safetensors = _check_files(path)
    if index is not None and str(index) == "default":
        raise MarginError(_wrong_index_message(path, "the default index", "sentence-transformers"))
    loaded_index = None
    if index is not None:
        loaded_index = open_index(resolve_index(index, progress=progress))
    if loaded_index is not None and loaded_index.dense is not None:
        kind = (loaded_index.manifest.encoder or {}).get("spec", {}).get("kind")
        if kind != "dpr":
            raise MarginError(_wrong_index_message(path, f"index {loaded_index.path}", kind))

    mode = rag_mode(config)
    model = _load_model(path, mode, safetensors)
    question_tokenizer, generator_tokenizer = _load_tokenizers(path)
    generation_config = _generation_config(path, config)
    ignored = unsupported_generation_options(generation_config)
    if ignored:
        warnings.warn(
            f"{path}: margin does not apply the generation options {', '.join(ignored)}; "
            "answers may differ from transformers' generate with them",
            UserWarning,
            stacklevel=2,
        )

    bart = model.rag.generator.eval()
    for name in sorted(_TOKEN_FIELDS):  # the RAG-level config speaks for the generator too
        value = getattr(generation_config, name, None)
        if value is not None:
            setattr(bart.generation_config, name, value)
    encoder = _question_encoder(model.rag.question_encoder.eval(), question_tokenizer, path)
    fmt = seq2seq_format(config)
    generator = RagCheckpointGenerator(
        bart, generator_tokenizer, fmt, question_tokenizer, encoder.max_length
    )
    retriever = None
    if loaded_index is not None:
        retriever = Retriever(loaded_index, encoder if loaded_index.dense is not None else None)

    decode = decode_defaults(generation_config)
    n_docs = int(config.get("n_docs", 5))
    model_config = ModelConfig(generator_kind="seq2seq", seq2seq=fmt, doc_score_scale=1.0,
                               decode=decode, default_mode=mode, default_k=n_docs)
    return RAG(generator, retriever, question_encoder=encoder, doc_score_scale=1.0,
               default_decode=decode, default_mode=mode, default_k=n_docs, config=model_config)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise MarginError(
            f"{file} is missing; save the model with RagSequenceForGeneration/"
            "RagTokenForGeneration.save_pretrained(DIR)"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarginError(f"{file} cannot be read ({exc}); restore or re-save the model") from None
    if not isinstance(config, dict) or config.get("model_type") != "rag":
        raise MarginError(
            f"{file} does not say model_type 'rag'; give a transformers RAG directory"
        )
    for part in ("question_encoder", "generator"):
        if not isinstance(config.get(part), dict):
            raise MarginError(
                f"{file} has no '{part}' sub-config; re-save the model with save_pretrained"
            )
    return config


def _check_files(path: Path) -> bool:
    """Raise a MarginError naming what is missing; return whether the weights are safetensors."""
    for name in TOKENIZER_DIRS:
        if not (path / name).is_dir():
            raise MarginError(
                f"{path / name}/ is missing; save the tokenizer beside the model with "
                f"RagTokenizer.from_pretrained(...).save_pretrained('{path}')"
            )
    if any((path / name).is_file() for name in SAFE_WEIGHTS):
        return True
    if any((path / name).is_file() for name in PICKLED_WEIGHTS):
        return False
    raise MarginError(
        f"{path / SAFE_WEIGHTS[0]} is missing (no model weights in {path}); save them with "
        "model.save_pretrained(DIR) or copy model.safetensors there"
    )


def _load_model(path: Path, mode: str, safetensors: bool) -> Any:
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    cls = RagSequenceForGeneration if mode == "sequence" else RagTokenForGeneration
    try:
        if safetensors:
            model = cls.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
        else:  # tensors only: torch.load(weights_only=True) refuses any other pickled object
            model = cls.from_pretrained(
                path, use_safetensors=False, weights_only=True, trust_remote_code=False
            )
    except Exception as exc:  # noqa: BLE001 - transformers raises many types; one line for all
        file = SAFE_WEIGHTS[0] if safetensors else PICKLED_WEIGHTS[0]
        fix = (
            "re-save it with save_pretrained" if safetensors
            else "it holds more than tensors; convert it to model.safetensors from a trusted copy"
        )
        raise MarginError(f"cannot load {path / file} ({_first_line(exc)}); {fix}") from exc
    return model.eval()


def _load_tokenizers(path: Path) -> tuple[Any, Any]:
    from transformers import RagTokenizer

    try:
        tok = RagTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise MarginError(
            f"cannot load the tokenizers in {path}/{{{','.join(TOKENIZER_DIRS)}}} "
            f"({_first_line(exc)}); re-save them with RagTokenizer.save_pretrained"
        ) from exc
    return tok.question_encoder, tok.generator


def _generation_config(path: Path, config: dict[str, Any]) -> Any:
    """generation_config.json, else what transformers makes of config.json when that file is
    missing: top-level generation fields, then the generator sub-config's legacy ones (BART's
    num_beams, max_length, forced_bos_token_id, ...)."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(path)
    return GenerationConfig.from_model_config(config)


def _question_encoder(module: torch.nn.Module, tokenizer: Any, path: Path) -> DPREncoder:
    """The checkpoint's DPR question encoder behind margin's Encoder interface."""
    config = module.config
    limits = [_MAX_QUESTION_TOKENS, int(min(getattr(tokenizer, "model_max_length", 10**9), 10**9))]
    limits.append(int(getattr(config, "max_position_embeddings", _MAX_QUESTION_TOKENS)))
    dim = int(config.projection_dim or config.hidden_size)
    # name: where the weights are (inside the RAG checkpoint), for messages; not a loadable dir
    spec = EncoderSpec("dpr", f"{path}#rag.question_encoder", "question", "pooler", min(limits),
                       False)
    return DPREncoder(spec, module, tokenizer, dim)


def _wrong_index_message(path: Path, what: str, kind: str | None) -> str:
    return (
        f"{what} was built with a {kind} passage encoder, but RAG checkpoint {path} retrieves "
        "with a DPR question encoder; build an index with the matching DPR context encoder "
        f"(margin index build --encoder {DPR_CONTEXT_ENCODER} --out DIR) and pass --index DIR"
    )


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its messages
    return text.splitlines()[0] if text else type(exc).__name__
