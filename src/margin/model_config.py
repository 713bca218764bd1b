"""What a margin model records besides its weights: :class:`ModelConfig`, and its file's name.

It sits below the RAG model and its loaders (margin.rag, margin.models, margin.hf_rag), which all
read it, so that none of them has to import another to know the shape of a model's settings.
``DIR/margin_model.json`` of a checkpoint is ``asdict(config)`` plus a format and a version
(margin.models writes and reads it). A model may carry the index it was trained against in
``DIR/index`` (:data:`MODEL_INDEX`); ``index="auto"`` (:data:`AUTO_INDEX`) means that one, else
the default index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from margin.generation.decoding import DecodeConfig
from margin.generation.seq2seq import Seq2SeqFormat

MODEL_FILE = "margin_model.json"
MODEL_FORMAT = "margin-rag"
MODEL_VERSION = 1
MODEL_INDEX = "index"  # the folder, inside a model directory, of the index the model carries
AUTO_INDEX = "auto"  # index name meaning: the model's own index if it carries one, else "default"
DEFAULT_COSINE_SCALE = 20.0  # doc score scale for unit-norm (cosine) encoders; see margin.rag


@dataclass
class ModelConfig:
    """What a margin checkpoint records besides the weights."""

    generator_kind: str = "causal"  # "causal" (decoder-only) or "seq2seq" (BART/T5, the paper's)
    prompt: str = "qa-default"  # causal prompt template name (margin.generation.prompting)
    seq2seq: Seq2SeqFormat = field(default_factory=Seq2SeqFormat)  # seq2seq input formatting
    doc_score_scale: float = 1.0  # s in p(z|x) ∝ exp(s · d(z)ᵀq(x))
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # decoding defaults
    question_encoder: dict[str, Any] = field(default_factory=dict)  # Encoder.spec, minus "name"
    index_encoder_fingerprint: str | None = None  # passage encoder of compatible indexes
    stop_at_newline: bool = True  # causal: a newline ends the answer (few-shot QA prompts)
    default_mode: str = "token"  # the mode the model was trained for (`margin ask` default)
    default_k: int = 5  # passages per question it was trained with (`margin ask` default)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ModelConfig:
        """The config of a ``margin_model.json`` record (other keys, e.g. its format, ignored;
        ``seq2seq`` and ``decode`` may list only the fields that differ from the defaults)."""
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        fields["seq2seq"] = Seq2SeqFormat(**(fields.get("seq2seq") or {}))
        fields["decode"] = DecodeConfig(**(fields.get("decode") or {}))
        return cls(**fields)
