"""What a request to ``margin serve`` may carry, the checks it must pass and the JSON it gets back.

The request models are strict pydantic models (no extra fields, no coercion); the limits of
``ServeConfig`` are checked here with a 4xx ``ApiError`` naming the field, and the same bounds are
written into the OpenAPI document so a generated client knows them. A valid ``/v1/ask`` request
resolves to an ``AskKey``: what requests must share to be answered by one micro-batched model call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from margin.errors import MarginError
from margin.rag import Answer, Decoding, Mode, decoding_method
from margin.serving.config import ServeConfig
from margin.serving.http_errors import ApiError
from margin.serving.registry import IndexEntry

# ----------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AskRequest(_Strict):
    """POST /v1/ask: give ``question`` or ``questions``; unset options use the model's defaults."""

    question: str | None = None  # one question
    questions: list[str] | None = None  # or several
    k: int | None = None  # passages per question (model default)
    mode: Mode | None = None  # "token" or "sequence" (model default)
    decoding: Decoding = "greedy"  # greedy, beam, thorough or fast
    beams: int | None = None  # beams for beam/thorough/fast (model default)
    max_new_tokens: int | None = None  # longest answer (model default)
    stream: bool = False  # server-sent events: tokens as decided (RAG-Token greedy), then answers


class SearchRequest(_Strict):
    """POST /v1/search: give ``query`` or ``queries``."""

    query: str | None = None
    queries: list[str] | None = None
    k: int = 5


class SwitchRequest(_Strict):
    """POST /v1/indexes/active (admin)."""

    index: str  # a registered index id


class RegisterRequest(_Strict):
    """POST /v1/indexes (admin): an index directory under the server's index root."""

    name: str  # the id to register it under
    directory: str  # relative to the index root (or absolute, inside it)
    activate: bool = False  # also make it the active index


# ----------------------------------------------------------------------------- batch keys


@dataclass(frozen=True)
class AskKey:
    """What requests must share to be answered by one model call."""

    entry: IndexEntry
    mode: str
    decoding: str
    k: int
    beams: int | None
    max_new_tokens: int | None


@dataclass(frozen=True)
class SearchKey:
    entry: IndexEntry
    k: int


# ----------------------------------------------------------------------------- checks


def openapi_with_bounds(app: FastAPI, config: ServeConfig) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with the bounds that the checks below enforce written into the request
    schemas, so generated clients know them (tests/test_server.py probes each one)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _state_bounds(generate()["components"]["schemas"], config)
        return app.openapi_schema  # type: ignore[return-value]

    return openapi


def _state_bounds(schemas: dict[str, Any], config: ServeConfig) -> None:
    one = {"minLength": 1, "maxLength": config.max_question_chars, "pattern": r"\S"}  # not blank
    many = {"minItems": 1, "maxItems": config.max_questions, "items": {"type": "string", **one}}
    bounds = {
        "question": one, "query": one, "questions": many, "queries": many,
        "k": {"minimum": 1, "maximum": config.max_k,
              "description": f"1 to {config.max_k}, and at most the index's passage count"},
        "beams": {"minimum": 1, "maximum": config.max_beams},
        "max_new_tokens": {"minimum": 1, "maximum": config.max_new_tokens},
    }
    for model in ("AskRequest", "SearchRequest"):
        for name, prop in schemas[model]["properties"].items():
            if name in bounds:  # the bound goes on the non-null choice of an optional field
                choice = next(c for c in prop.get("anyOf", [prop]) if c.get("type") != "null")
                choice.update(bounds[name])


def check_questions(
    one: str | None, many: list[str] | None, names: tuple[str, str], config: ServeConfig
) -> list[str]:
    """The request's questions: exactly one of the two fields, each non-blank and not too long."""
    if (one is None) == (many is None):
        raise ApiError(422, f"give either {names[0]!r} or {names[1]!r}", names[1])
    items, label = ([one], names[0]) if one is not None else (many, names[1])
    assert items is not None
    if not items:
        raise ApiError(422, f"{label}: give at least one", label)
    if len(items) > config.max_questions:
        raise ApiError(
            422, f"{label}: {len(items)} given, at most {config.max_questions} per request", label
        )
    for i, q in enumerate(items):
        where = label if one is not None else f"{label}[{i}]"
        if not q.strip():
            raise ApiError(422, f"{where}: empty; give a non-blank question", where)
        if any(0xD800 <= ord(c) <= 0xDFFF for c in q):  # JSON's "\ud800": the tokenizer fails
            raise ApiError(422, f"{where}: a lone surrogate is not text; send valid Unicode", where)
        if len(q) > config.max_question_chars:
            raise ApiError(
                422, f"{where}: {len(q)} characters, at most {config.max_question_chars}", where
            )
    return items  # type: ignore[return-value]


def check_k(k: int, entry: IndexEntry, config: ServeConfig) -> int:
    size = entry.manifest["passages"]
    top = min(config.max_k, size)
    if not 1 <= k <= top:
        raise ApiError(422, f"k: {k} is out of range; use 1 to {top}", "k")
    return k


def ask_key(body: AskRequest, entry: IndexEntry, config: ServeConfig) -> AskKey:
    rag = entry.rag
    mode = body.mode or rag.default_mode
    try:
        decoding_method(mode, body.decoding)
    except MarginError as exc:
        raise ApiError(422, f"decoding: {exc}", "decoding") from None
    if body.k is None:  # the model's own k, within the limits
        k = max(1, min(rag.default_k, config.max_k, entry.manifest["passages"]))
    else:
        k = check_k(body.k, entry, config)
    if body.beams is not None and not 1 <= body.beams <= config.max_beams:
        raise ApiError(422, f"beams: {body.beams} is out of range; use 1 to {config.max_beams}",
                       "beams")
    top = config.max_new_tokens
    if body.max_new_tokens is not None and not 1 <= body.max_new_tokens <= top:
        raise ApiError(422, f"max_new_tokens: {body.max_new_tokens} is out of range; use 1 to "
                       f"{top}", "max_new_tokens")
    max_new = body.max_new_tokens or min(rag.default_decode.max_new_tokens, top)
    beams = None if body.decoding == "greedy" else body.beams
    return AskKey(entry, mode, body.decoding, k, beams, max_new)


# ----------------------------------------------------------------------------- responses


def answers_json(entry: IndexEntry, answers: Sequence[Answer]) -> dict[str, Any]:
    tag = {"index": entry.id, "index_version": entry.version}
    return {"index": entry.describe(), "answers": [{**a.to_json(), **tag} for a in answers]}
