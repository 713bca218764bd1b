"""``ServeConfig``: where ``margin serve`` listens and the limits it enforces.

Its own module because every part of the service reads it (the request checks and the bounds the
OpenAPI document states, the body-size middleware, the app) and the CLI builds it from flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from margin.serving.batching import BatchConfig

ADMIN_TOKEN_ENV = "MARGIN_ADMIN_TOKEN"  # environment variable holding the admin bearer token


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
    continuous_batching: bool = True  # RAG-Token greedy joins the running decode between steps
    max_running_rows: int = 40  # (question, passage) rows decoding at once; a larger request: alone
    passage_cache_mb: float | None = 1024.0  # causal passage KV cache (MiB); 0 off; None: as built
    cors_origins: tuple[str, ...] = ()  # origins allowed cross-site; empty: CORS off
    device: str = "auto"  # where the networks run: auto (CUDA if any, else CPU), cpu, cuda[:N]
