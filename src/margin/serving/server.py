"""``margin serve``: RAG behind an HTTP API and a web page, with live index hot-swapping.

The paper's index hot-swapping (Sec. 4.5) replaces the non-parametric memory and the model's
knowledge changes with no retraining. In a service that is an operation done live: the registry
(margin.serving.registry) holds several loaded indexes over one model, and an admin switches the
active one with a single reference swap. A request reads the active index once, when it arrives,
and carries it to the end, so requests in flight finish on the index they started with and new
ones use the new one; every response names the index id and version (a hash of its manifest) that
answered it.

Two worker threads run the model. RAG-Token greedy requests on a causal model decode in one
running batch that new requests join between steps (margin.serving.continuous, on by default:
``ServeConfig.continuous_batching``); every other request (beam search, RAG-Sequence, search, and
all of a seq2seq model's) is micro-batched on the other (margin.serving.batching), so a slow
RAG-Sequence request never holds a token request behind it. Inputs are bounded (body size,
questions, their length, k, beams, answer length) with a 4xx JSON error naming the field
(margin.serving.schemas, margin.serving.http_errors); a request that runs past ``timeout_s`` gets
a 504; nothing returns a stack trace. Answers can be streamed token by token
(margin.serving.streaming).

This module is the app: its routes, the model call the batcher runs, the admin checks, and
``serve`` (what ``margin serve`` runs).

    >>> from margin.serving.config import ServeConfig                    # doctest: +SKIP
    >>> from margin.serving.server import create_app, run_server         # doctest: +SKIP
    >>> rag = margin.RAG.load("default", "default")                      # doctest: +SKIP
    >>> run_server(create_app(rag, {"2018": "default"}), ServeConfig())  # doctest: +SKIP

API (JSON; full schema at /openapi.json): POST /v1/ask, POST /v1/search, GET /healthz,
GET /readyz, GET /v1/indexes, and for admins (``Authorization: Bearer $MARGIN_ADMIN_TOKEN``)
POST /v1/indexes/active and POST /v1/indexes. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Security
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from margin.errors import MarginError
from margin.model_config import AUTO_INDEX
from margin.rag import RAG
from margin.serving.batching import BatcherBusy, MicroBatcher
from margin.serving.config import ADMIN_TOKEN_ENV, ServeConfig
from margin.serving.continuous import (
    ContinuousBatcher,
    decodes_continuously,
    joins_running_batch,
)
from margin.serving.http_errors import ApiError, BodyLimit, install_errors
from margin.serving.registry import (
    INDEX_NAME,
    IndexEntry,
    encoder_fingerprint,
    open_entry,
    start_registry,
)
from margin.serving.schemas import (
    AskKey,
    AskRequest,
    RegisterRequest,
    SearchKey,
    SearchRequest,
    SwitchRequest,
    answers_json,
    ask_key,
    check_k,
    check_questions,
    openapi_with_bounds,
)
from margin.serving.streaming import Question, stream_answers

WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
ADMIN_BEARER = HTTPBearer(  # reads the header (None if absent); _check_admin decides; in OpenAPI
    auto_error=False, scheme_name="adminBearer",
    description=f"the admin token the server was started with (${ADMIN_TOKEN_ENV})",
)
AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_BEARER)]
log = logging.getLogger("margin.serving.server")


# ----------------------------------------------------------------------------- the app


def create_app(
    rag: RAG,
    indexes: Mapping[str, str | Path] | None = None,
    config: ServeConfig | None = None,
) -> FastAPI:
    """The service: ``rag`` answering over ``indexes`` (id -> directory or "default"; the first
    is active), or over ``rag``'s own index, registered as "default", when ``indexes`` is None."""
    config = config or ServeConfig()
    _set_passage_cache(rag, config.passage_cache_mb)
    registry = start_registry(rag, indexes)
    batcher = MicroBatcher(run_batch, config.batch, name="margin-model")
    continuous = None  # the running batch of RAG-Token greedy requests, when it applies
    if config.continuous_batching and decodes_continuously(rag.generator):
        continuous = ContinuousBatcher(rag.generator, run_batch, config.max_running_rows,
                                       config.batch.max_pending)
    fingerprint = encoder_fingerprint(rag)

    def worker(key: AskKey | SearchKey) -> MicroBatcher | ContinuousBatcher:
        """Where a request waits: the running batch, or the micro-batcher."""
        if continuous is not None and joins_running_batch(key):
            return continuous
        return batcher

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()
        if continuous is not None:
            continuous.close()

    app = FastAPI(
        title="margin", summary="Retrieval-Augmented Generation with provenance",
        docs_url=None, redoc_url=None, lifespan=lifespan,  # the docs UIs load a CDN
    )
    app.state.registry, app.state.batcher, app.state.config = registry, batcher, config
    app.state.continuous = continuous
    app.openapi = openapi_with_bounds(app, config)  # type: ignore[method-assign]
    install_errors(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
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
        ready = batcher.alive and (continuous is None or continuous.alive)
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
        queries = check_questions(body.query, body.queries, ("query", "queries"), config)
        entry = registry.active
        k = check_k(body.k, entry, config)
        results = await _wait(batcher, SearchKey(entry, k), [Question(q) for q in queries],
                              config.timeout_s)
        out = [
            {
                "query": q,
                "passages": [p.to_json(s) for p, s in hits],
            }
            for q, hits in zip(queries, results, strict=True)
        ]
        return _named(entry, {"index": entry.describe(), "results": out})

    @app.post("/v1/ask", response_model=None)
    async def ask(body: AskRequest) -> Response:
        """Answers with provenance (as ``margin ask --json``), and the index that gave them."""
        questions = check_questions(body.question, body.questions, ("question", "questions"),
                                    config)
        entry = registry.active  # this request's index, whatever is switched meanwhile
        key = ask_key(body, entry, config)
        if body.stream:
            return await stream_answers(worker(key), entry, key, questions, config.timeout_s)
        answers = await _wait(worker(key), key, [Question(q) for q in questions],
                              config.timeout_s)
        return _named(entry, answers_json(entry, answers))

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


# ----------------------------------------------------------------------------- model work


def run_batch(key: AskKey | SearchKey, items: list[Question]) -> list[Any]:
    """The batcher's model call: answers (or search hits) for questions sharing ``key``."""
    questions = [q.text for q in items]
    rag = key.entry.rag
    if isinstance(key, SearchKey):
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


async def _wait(
    batcher: MicroBatcher | ContinuousBatcher, key, items: list[Question], timeout: float
) -> list:
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


def _set_passage_cache(rag: RAG, mb: float | None) -> None:
    """``ServeConfig.passage_cache_mb`` onto a causal generator (None: leave it as built)."""
    from margin.cli_options import check_passage_cache_mb

    check_passage_cache_mb(mb)  # the flag's own check: negative, nan or infinite refused
    if mb is None:
        return
    if hasattr(rag.generator, "set_passage_cache"):
        rag.generator.set_passage_cache(int(mb * 2**20))


# ----------------------------------------------------------------------------- admin


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
        path.exists()  # a name too long for the file system fails here, not later as a 500
    except (OSError, RuntimeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc  # not the (perhaps very long) path
        raise ApiError(422, f"directory: cannot resolve ({reason})", "directory") from None
    if path == base or not path.is_relative_to(base):
        raise ApiError(403, "directory: must be a directory inside the server's index root",
                       "directory")
    return path


# ----------------------------------------------------------------------------- responses


def _named(entry: IndexEntry, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers={"X-Margin-Index": f"{entry.id}@{entry.version}"})


def _web_file(name: str) -> Response:
    text = (resources.files("margin") / "web" / name).read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(text, media_type=WEB_FILES[name], headers=headers)


# ----------------------------------------------------------------------------- running


def parse_index_options(values: Sequence[str]) -> dict[str, str]:
    """``--index`` values -> {id: directory}: ``default`` and ``auto`` (the model's own index, else
    the default one; see margin.models.resolve_model_index), both with id "default", ``DIR`` (id =
    its name), ``NAME=DIR``."""
    out: dict[str, str] = {}
    for value in values or ["default"]:
        name, sep, directory = value.partition("=")
        if not sep:
            directory = value
            name = "default" if value in ("default", AUTO_INDEX) else Path(value).resolve().name
        if not INDEX_NAME.match(name) or not directory:
            raise MarginError(
                f"--index {value!r}: give default, DIR or NAME=DIR with a NAME of letters, "
                "digits, '.', '_' or '-'"
            )
        if name in out:
            raise MarginError(f"--index {value!r}: index name {name!r} given twice")
        out[name] = directory
    return out


def check_listen(host: str, port: int) -> None:
    """Refuse, before the model loads, an address the server could not listen on: a port out of
    range, a host this machine cannot bind, a port another process holds."""
    if not 1 <= port <= 65535:
        raise MarginError(f"--port {port} is not a TCP port; give one from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise MarginError(f"--host {host!r} is not an address here ({exc.strerror}); "
                          "give e.g. 127.0.0.1") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise MarginError(f"cannot listen on {host}:{port} ({exc.strerror}); give another "
                              "--port or stop what holds it") from None


def run_server(app: FastAPI, config: ServeConfig) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, server_header=False, log_level="info")


def serve(model: str, indexes: Sequence[str], config: ServeConfig) -> None:
    """Load ``model`` over the first of ``indexes`` (``--index`` values; none: "auto", the index
    the model carries, else the default one), register the others, and serve (what ``margin
    serve`` runs)."""
    from margin.models import resolve_model_index

    check_listen(config.host, config.port)
    admin = "on" if config.admin_token else "off"
    print(f"margin: serving on http://{config.host}:{config.port}/ (admin {admin})",
          file=sys.stderr)
    named = {name: str(resolve_model_index(model, directory))
             for name, directory in parse_index_options(indexes or [AUTO_INDEX]).items()}
    rag = RAG.load(model=model, index=next(iter(named.values())), device=config.device)
    run_server(create_app(rag, named, config), config)
