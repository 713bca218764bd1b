"""``margin serve``: RAG behind an HTTP API and a web page, with live index hot-swapping.

The paper's index hot-swapping (Sec. 4.5) replaces the non-parametric memory and the model's
knowledge changes with no retraining. In a service that is an operation done live: the registry
below holds several loaded indexes over one model, and an admin switches the active one with a
single reference swap. A request reads the active index once, when it arrives, and carries it to
the end, so requests in flight finish on the index they started with and new ones use the new one;
every response names the index id and version (a hash of its manifest) that answered it.

One worker thread runs the model (margin.serving.batching), so concurrent requests are
micro-batched and
the model is never run by two threads at once. Inputs are bounded (body size, questions, their
length, k, beams, answer length) with a 4xx JSON error naming the field; a request that runs past
``timeout_s`` gets a 504; nothing returns a stack trace.

    >>> from margin.serving.server import ServeConfig, create_app, run_server    # doctest: +SKIP
    >>> rag = margin.RAG.load("default", "default")                      # doctest: +SKIP
    >>> run_server(create_app(rag, {"2018": "default"}), ServeConfig())  # doctest: +SKIP

API (JSON; full schema at /openapi.json): POST /v1/ask, POST /v1/search, GET /healthz,
GET /readyz, GET /v1/indexes, and for admins (``Authorization: Bearer $MARGIN_ADMIN_TOKEN``)
POST /v1/indexes/active and POST /v1/indexes. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from margin.errors import MarginError
from margin.generation.generator import Generator
from margin.rag import RAG, Answer, Decoding, Mode, decoding_method
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever, resolve_index
from margin.serving.batching import BatchConfig, BatcherBusy, MicroBatcher

ADMIN_TOKEN_ENV = "MARGIN_ADMIN_TOKEN"  # environment variable holding the admin bearer token
INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # registered index ids
WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
ADMIN_BEARER = HTTPBearer(  # reads the header (None if absent); _check_admin decides; in OpenAPI
    auto_error=False, scheme_name="adminBearer",
    description=f"the admin token the server was started with (${ADMIN_TOKEN_ENV})",
)
AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_BEARER)]
log = logging.getLogger("margin.serving.server")


@dataclass(frozen=True)
class ServeConfig:
    """Where the service listens and the limits it enforces."""

    host: str = "127.0.0.1"  # interface to bind; loopback only unless you mean otherwise
    port: int = 8000  # TCP port
    index_root: Path | None = None  # admins may register index directories under it; None: never
    admin_token: str | None = None  # admin bearer token ($MARGIN_ADMIN_TOKEN); None: admin off
    max_body_bytes: int = 64 * 1024  # larger request bodies get 413
    max_questions: int = 16  # questions (or search queries) per request
    max_question_chars: int = 1000  # characters per question
    max_k: int = 20  # passages retrieved per question at most
    max_beams: int = 8  # beams at most
    max_new_tokens: int = 64  # longest answer a request may ask for, in tokens
    timeout_s: float = 60.0  # per-request limit, queueing included; 504 after it
    batch: BatchConfig = field(default_factory=BatchConfig)  # micro-batching (max_batch=1: off)
    cors_origins: tuple[str, ...] = ()  # origins allowed cross-site; empty: CORS off
    device: str = "auto"  # where the networks run: auto (CUDA if any, else CPU), cpu, cuda[:N]


# ----------------------------------------------------------------------------- index registry


@dataclass(frozen=True, eq=False)
class IndexEntry:
    """One loaded index and the model view that answers over it (compared by identity)."""

    id: str  # the name it is registered under
    version: str  # sha256 of its manifest (16 hex digits): changes whenever the index does
    path: Path  # its directory
    manifest: dict[str, Any]  # its manifest.json
    rag: RAG  # the served model with this index as its retriever (generator shared)

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "version": self.version}


def manifest_version(manifest: dict[str, Any]) -> str:
    """The version of an index: a hash of its manifest (corpus checksum, files, generation)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def open_entry(rag: RAG, name: str, directory: Path, fingerprint: str | None) -> IndexEntry:
    """Load ``directory`` as an index for ``rag``'s question encoder.

    ``fingerprint``: the passage encoder every served index must share (the one the model's
    question encoder was trained against); an index built with another is refused.
    """
    loaded = open_index(directory)
    if loaded.dense is None:
        retriever = Retriever(loaded, None)
    else:
        built = loaded.manifest.encoder["fingerprint"]  # type: ignore[index]
        if fingerprint is not None and built != fingerprint:
            raise MarginError(
                f"index {directory} was built with passage encoder sha256 {built[:12]}, the "
                f"served model needs {fingerprint[:12]}; build it with the model's encoder"
            )
        retriever = Retriever(loaded, rag.question_encoder, check=fingerprint is None)
    return _entry(rag, name, retriever)


def _entry(rag: RAG, name: str, retriever: Retriever) -> IndexEntry:
    view = copy.copy(rag)  # shares generator and question encoder; only the retriever differs
    view.retriever = retriever
    manifest = retriever.index.manifest.to_json()
    return IndexEntry(name, manifest_version(manifest), retriever.index.path, manifest, view)


class IndexRegistry:
    """Registered indexes and which one is active; switching is one reference swap."""

    def __init__(self) -> None:
        self._entries: dict[str, IndexEntry] = {}
        self._active: IndexEntry | None = None
        self._lock = threading.Lock()

    def add(self, entry: IndexEntry) -> None:
        with self._lock:
            if entry.id in self._entries:
                raise ApiError(409, f"index {entry.id!r} is already registered", "name")
            self._entries[entry.id] = entry
            if self._active is None:
                self._active = entry

    @property
    def active(self) -> IndexEntry:
        entry = self._active  # one read: a request keeps this entry to its end
        assert entry is not None, "the registry is empty"
        return entry

    def switch(self, name: str) -> IndexEntry:
        with self._lock:
            if name not in self._entries:
                raise ApiError(404, f"unknown index {name!r}; see GET /v1/indexes", "index")
            self._active = self._entries[name]
            return self._active

    def entries(self) -> list[IndexEntry]:
        with self._lock:
            return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries


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


class ApiError(Exception):
    """An error answered as ``{"error": message, "field": field}`` with an HTTP status."""

    def __init__(self, status: int, message: str, field: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


# ----------------------------------------------------------------------------- model work


@dataclass(frozen=True)
class _AskKey:
    """What requests must share to be answered by one model call."""

    entry: IndexEntry
    mode: str
    decoding: str
    k: int
    beams: int | None
    max_new_tokens: int | None


@dataclass(frozen=True)
class _SearchKey:
    entry: IndexEntry
    k: int


class TokenStream:
    """Turns one question's streamed token ids into text pieces, until its answer ends."""

    def __init__(self, gen: Generator, emit: Callable[[str], None]):
        self.gen, self.emit = gen, emit
        self.ids: list[int] = []
        self.text = ""
        self.done = False

    def restart(self) -> None:
        """Decoding starts over (a batch that failed is run again without the request that
        failed it): take the tokens anew, emitting only text beyond what was already sent."""
        self.ids, self.done = [], False

    def push(self, token_id: int) -> None:
        if self.done:
            return
        if token_id in self.gen.eos_token_ids:
            self.done = True  # decoding goes on for other questions; this answer is over
            return
        self.ids.append(token_id)
        text = self.gen.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return  # half a UTF-8 character, or the tokenizer re-spaced: wait for more
        if len(text) > len(self.text):
            self.emit(text[len(self.text) :])
            self.text = text


@dataclass(eq=False)
class _Question:
    text: str  # the question
    stream: TokenStream | None = None  # where its tokens go as they are decided, if streamed


def run_batch(key: _AskKey | _SearchKey, items: list[_Question]) -> list[Any]:
    """The batcher's model call: answers (or search hits) for questions sharing ``key``."""
    questions = [q.text for q in items]
    rag = key.entry.rag
    if isinstance(key, _SearchKey):
        hits = rag.retriever.retrieve(questions, k=key.k)  # type: ignore[union-attr]
        pairs = zip(hits.passages, hits.scores.tolist(), strict=True)
        return [list(zip(ps, ss, strict=True)) for ps, ss in pairs]
    streams = [q.stream for q in items]
    for stream in streams:
        if stream is not None:
            stream.restart()

    def on_token(tokens: list[int]) -> None:  # one token per question, per decoding step
        for stream, token in zip(streams, tokens, strict=True):
            if stream is not None:
                stream.push(token)

    return rag.ask(
        questions, k=key.k, mode=key.mode, decoding=key.decoding, num_beams=key.beams,
        max_new_tokens=key.max_new_tokens, on_token=on_token if any(streams) else None,
    )


# ----------------------------------------------------------------------------- the app


def create_app(
    rag: RAG,
    indexes: Mapping[str, str | Path] | None = None,
    config: ServeConfig | None = None,
) -> FastAPI:
    """The service: ``rag`` answering over ``indexes`` (id -> directory or "default"; the first
    is active), or over ``rag``'s own index, registered as "default", when ``indexes`` is None."""
    config = config or ServeConfig()
    registry = _start_registry(rag, indexes)
    batcher = MicroBatcher(run_batch, config.batch, name="margin-model")
    fingerprint = _encoder_fingerprint(rag)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(
        title="margin", summary="Retrieval-Augmented Generation with provenance",
        docs_url=None, redoc_url=None, lifespan=lifespan,  # the docs UIs load a CDN
    )
    app.state.registry, app.state.batcher, app.state.config = registry, batcher, config
    app.openapi = _openapi_with_bounds(app, config)  # type: ignore[method-assign]
    _install_errors(app)
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    def admin(credentials: AdminCredentials) -> None:
        _check_admin(credentials, config.admin_token)

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: the model and an active index are loaded and the model worker runs."""
        ready = batcher.alive
        body = {"ready": ready, "index": registry.active.describe()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/indexes", openapi_extra={"security": [{}]})  # the token is optional here
    def list_indexes(credentials: AdminCredentials) -> dict:
        """Registered indexes (id, version) and which is active; to the admin (bearer token)
        also their directories and manifests, which name files on the server."""
        if credentials is not None:
            _check_admin(credentials, config.admin_token)  # a wrong token is refused, not ignored
        active = registry.active

        def row(e: IndexEntry) -> dict[str, Any]:
            out = {**e.describe(), "active": e is active}
            if credentials is not None:  # the admin's
                out |= {"path": str(e.path), "manifest": e.manifest}
            return out

        return {"active": active.describe(), "indexes": [row(e) for e in registry.entries()]}

    @app.post("/v1/indexes/active", dependencies=[Depends(admin)])
    def switch_index(body: SwitchRequest) -> dict:
        """Admin: make another registered index the active one, atomically."""
        previous = registry.active
        entry = registry.switch(body.index)
        log.info("active index %s@%s -> %s@%s", previous.id, previous.version, entry.id,
                 entry.version)
        return {"active": entry.describe(), "previous": previous.describe()}

    @app.post("/v1/indexes", dependencies=[Depends(admin)], status_code=201)
    async def register_index(body: RegisterRequest) -> dict:
        """Admin: register an index directory found under the configured index root."""
        if not INDEX_NAME.match(body.name):
            raise ApiError(422, "name: use 1-64 letters, digits, '.', '_' or '-'", "name")
        if body.name in registry:
            raise ApiError(409, f"index {body.name!r} is already registered", "name")
        directory = _inside_root(config.index_root, body.directory)
        try:
            entry = await asyncio.to_thread(open_entry, rag, body.name, directory, fingerprint)
        except MarginError as exc:
            raise ApiError(400, f"directory: {exc}", "directory") from None
        registry.add(entry)
        if body.activate:
            registry.switch(entry.id)
        return {**entry.describe(), "active": registry.active is entry}

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> JSONResponse:
        """Top-k passages for each query, from the active index."""
        queries = _questions(body.query, body.queries, ("query", "queries"), config)
        entry = registry.active
        k = _check_k(body.k, entry, config)
        results = await _wait(batcher, _SearchKey(entry, k), [_Question(q) for q in queries],
                              config.timeout_s)
        out = [
            {
                "query": q,
                "passages": [
                    {"id": p.id, "title": p.title, "text": p.text, "score": float(s)}
                    for p, s in hits
                ],
            }
            for q, hits in zip(queries, results, strict=True)
        ]
        return _named(entry, {"index": entry.describe(), "results": out})

    @app.post("/v1/ask", response_model=None)
    async def ask(body: AskRequest) -> Response:
        """Answers with provenance (as ``margin ask --json``), and the index that gave them."""
        questions = _questions(body.question, body.questions, ("question", "questions"), config)
        entry = registry.active  # this request's index, whatever is switched meanwhile
        key = _ask_key(body, entry, config)
        if body.stream:
            return await _stream(batcher, entry, key, questions, config.timeout_s)
        answers = await _wait(batcher, key, [_Question(q) for q in questions], config.timeout_s)
        return _named(entry, _answers_json(entry, answers))

    @app.get("/", response_class=HTMLResponse)
    def page() -> Response:
        """The web page: ask, see the passages and which of them supported each token."""
        return _web_file("index.html")

    @app.get("/web/{name}")
    def web(name: str) -> Response:
        if name not in WEB_FILES or name == "index.html":
            raise ApiError(404, f"no such file {name!r}", "name")
        return _web_file(name)

    return app


def _start_registry(rag: RAG, indexes: Mapping[str, str | Path] | None) -> IndexRegistry:
    registry = IndexRegistry()
    if not indexes:
        if rag.retriever is None:
            raise MarginError("the model has no index; give indexes to serve (--index DIR)")
        registry.add(_entry(rag, "default", rag.retriever))
        return registry
    fingerprint = _encoder_fingerprint(rag)
    own = rag.retriever.index.path.resolve() if rag.retriever is not None else None
    for name, directory in indexes.items():
        if not INDEX_NAME.match(name):
            raise MarginError(f"index name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        path = resolve_index(directory)
        if own is not None and path.resolve() == own:
            registry.add(_entry(rag, name, rag.retriever))  # type: ignore[arg-type]
        else:
            registry.add(open_entry(rag, name, path, fingerprint))
    return registry


def _encoder_fingerprint(rag: RAG) -> str | None:
    """The passage encoder the model's indexes must be built with, if known."""
    if rag.retriever is not None and rag.retriever.index.manifest.encoder:
        return rag.retriever.index.manifest.encoder["fingerprint"]
    config = getattr(rag, "config", None)
    return getattr(config, "index_encoder_fingerprint", None)


# ----------------------------------------------------------------------------- checks


def _openapi_with_bounds(app: FastAPI, config: ServeConfig) -> Callable[[], dict[str, Any]]:
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


def _questions(
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
        if len(q) > config.max_question_chars:
            raise ApiError(
                422, f"{where}: {len(q)} characters, at most {config.max_question_chars}", where
            )
    return items  # type: ignore[return-value]


def _check_k(k: int, entry: IndexEntry, config: ServeConfig) -> int:
    size = entry.manifest["passages"]
    top = min(config.max_k, size)
    if not 1 <= k <= top:
        raise ApiError(422, f"k: {k} is out of range; use 1 to {top}", "k")
    return k


def _ask_key(body: AskRequest, entry: IndexEntry, config: ServeConfig) -> _AskKey:
    rag = entry.rag
    mode = body.mode or rag.default_mode
    try:
        decoding_method(mode, body.decoding)
    except MarginError as exc:
        raise ApiError(422, f"decoding: {exc}", "decoding") from None
    if body.k is None:  # the model's own k, within the limits
        k = max(1, min(rag.default_k, config.max_k, entry.manifest["passages"]))
    else:
        k = _check_k(body.k, entry, config)
    if body.beams is not None and not 1 <= body.beams <= config.max_beams:
        raise ApiError(422, f"beams: {body.beams} is out of range; use 1 to {config.max_beams}",
                       "beams")
    top = config.max_new_tokens
    if body.max_new_tokens is not None and not 1 <= body.max_new_tokens <= top:
        raise ApiError(422, f"max_new_tokens: {body.max_new_tokens} is out of range; use 1 to "
                       f"{top}", "max_new_tokens")
    max_new = body.max_new_tokens or min(rag.default_decode.max_new_tokens, top)
    beams = None if body.decoding == "greedy" else body.beams
    return _AskKey(entry, mode, body.decoding, k, beams, max_new)


def _check_admin(credentials: HTTPAuthorizationCredentials | None, token: str | None) -> None:
    """Bearer-token check in constant time; admin is off when no token is configured.

    ``credentials``: what ADMIN_BEARER read, None without an ``Authorization: Bearer`` header.
    """
    if not token:
        raise ApiError(403, f"admin endpoints are off; start the server with {ADMIN_TOKEN_ENV} set",
                       "authorization")
    if credentials is None:
        raise ApiError(401, "admin endpoint: send 'Authorization: Bearer <token>'",
                       "authorization", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise ApiError(403, "wrong admin token", "authorization")


def _inside_root(root: Path | None, directory: str) -> Path:
    """``directory`` resolved (symlinks followed) and checked to lie under ``root``."""
    if root is None:
        raise ApiError(403, "registering indexes is off; start the server with --index-root",
                       "directory")
    base = Path(root).resolve()
    try:
        path = (base / directory).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ApiError(422, f"directory: cannot resolve ({exc})", "directory") from None
    if path == base or not path.is_relative_to(base):
        raise ApiError(403, "directory: must be a directory inside the server's index root",
                       "directory")
    return path


# ----------------------------------------------------------------------------- responses


def _answers_json(entry: IndexEntry, answers: Sequence[Answer]) -> dict[str, Any]:
    tag = {"index": entry.id, "index_version": entry.version}
    return {"index": entry.describe(), "answers": [{**a.to_json(), **tag} for a in answers]}


def _named(entry: IndexEntry, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers={"X-Margin-Index": f"{entry.id}@{entry.version}"})


async def _wait(batcher: MicroBatcher, key, items: list[_Question], timeout: float) -> list:
    """Queue the work for the model worker and wait for it, within the request timeout."""
    try:
        future = batcher.submit(key, items)
    except BatcherBusy as exc:
        raise ApiError(503, str(exc), None, {"Retry-After": "1"}) from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        raise ApiError(504, f"the request took longer than {timeout:g} s; retry later") from None
    except MarginError as exc:
        raise ApiError(400, str(exc)) from None
    except Exception:
        log.exception("request failed")
        raise ApiError(500, "internal error") from None


async def _stream(
    batcher: MicroBatcher, entry: IndexEntry, key: _AskKey, questions: list[str], timeout: float
) -> StreamingResponse:
    """Server-sent events: ``token`` events as RAG-Token greedy decides them, then ``answer``
    (the same JSON as without streaming) or ``error``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emitter(qi: int) -> Callable[[str], None]:
        def emit(text: str) -> None:  # called on the model thread
            loop.call_soon_threadsafe(events.put_nowait, ("token", {"question": qi, "text": text}))

        return emit

    streams = key.mode == "token" and key.decoding == "greedy"
    gen = entry.rag.generator
    items = [_Question(q, TokenStream(gen, emitter(i)) if streams else None)
             for i, q in enumerate(questions)]
    try:
        done = asyncio.wrap_future(batcher.submit(key, items))
    except BatcherBusy as exc:
        raise ApiError(503, str(exc), None, {"Retry-After": "1"}) from None
    done.add_done_callback(lambda _: events.put_nowait(None))

    async def body():
        deadline = loop.time() + timeout
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), max(deadline - loop.time(), 0))
                except TimeoutError:
                    yield _sse("error", {"error": f"the request took longer than {timeout:g} s",
                                         "field": None, "status": 504})
                    return
                if event is None:
                    break
                yield _sse(*event)
            try:
                yield _sse("answer", _answers_json(entry, done.result()))
            except MarginError as exc:
                yield _sse("error", {"error": str(exc), "field": None, "status": 400})
            except Exception:
                log.exception("streamed request failed")
                yield _sse("error", {"error": "internal error", "field": None, "status": 500})
        finally:
            done.cancel()

    headers = {"Cache-Control": "no-cache", "X-Margin-Index": f"{entry.id}@{entry.version}"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _web_file(name: str) -> Response:
    text = (resources.files("margin") / "web" / name).read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(text, media_type=WEB_FILES[name], headers=headers)


def _error(status: int, message: str, field: str | None, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    """Every error is ``{"error", "field"}`` JSON; none carries a stack trace."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            name, message = "body", f"body: not valid JSON ({first.get('ctx', {}).get('error')})"
        else:
            name = ".".join(loc) or "body"
            message = f"{name}: {first.get('msg', 'invalid')}"
        return _error(422, message, name)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {
            404: f"no such endpoint {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        message = messages.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, None, exc.headers)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return _error(500, "internal error", None)


class _BodyLimit:
    """ASGI middleware: read at most ``max_bytes`` of a request body, else answer 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        response = _error(413, f"body: larger than {self.max_bytes} bytes", "body")
        await response(scope, receive, send)


# ----------------------------------------------------------------------------- running


def parse_index_options(values: Sequence[str]) -> dict[str, str]:
    """``--index`` values -> {id: directory}: ``default``, ``DIR`` (id = its name), ``NAME=DIR``."""
    out: dict[str, str] = {}
    for value in values or ["default"]:
        name, sep, directory = value.partition("=")
        if not sep:
            directory = value
            name = "default" if value == "default" else Path(value).resolve().name
        if not INDEX_NAME.match(name) or not directory:
            raise MarginError(
                f"--index {value!r}: give default, DIR or NAME=DIR with a NAME of letters, "
                "digits, '.', '_' or '-'"
            )
        if name in out:
            raise MarginError(f"--index {value!r}: index name {name!r} given twice")
        out[name] = directory
    return out


def run_server(app: FastAPI, config: ServeConfig) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, server_header=False, log_level="info")


def serve(model: str, indexes: Sequence[str], config: ServeConfig) -> None:
    """Load ``model`` over the first of ``indexes`` (``--index`` values), register the others,
    and serve (what ``margin serve`` runs)."""
    named = parse_index_options(indexes)
    rag = RAG.load(model=model, index=next(iter(named.values())), device=config.device)
    run_server(create_app(rag, named, config), config)
