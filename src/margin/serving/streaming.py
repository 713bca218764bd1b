"""Streaming answers: token ids as RAG-Token greedy decides them, sent as server-sent events.

The model worker calls ``TokenStream.push`` with each question's next token id (the ``on_token``
hook of ``RAG.ask``); the stream turns the ids into text pieces, holding back half a UTF-8
character, and hands each piece to the request's event loop. ``stream_answers`` is the SSE
response: ``token`` events while decoding, then one ``answer`` event (the JSON ``/v1/ask`` gives
without streaming) or an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from margin.errors import MarginError
from margin.generation.generator import Generator
from margin.serving.batching import BatcherBusy, MicroBatcher
from margin.serving.http_errors import ApiError
from margin.serving.registry import IndexEntry
from margin.serving.schemas import AskKey, answers_json

if TYPE_CHECKING:
    from margin.serving.continuous import ContinuousBatcher

log = logging.getLogger("margin.serving.server")  # the service's one log, whichever module writes


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
class Question:
    """One question queued for the model worker (an ask or a search query)."""

    text: str  # the question
    stream: TokenStream | None = None  # where its tokens go as they are decided, if streamed


async def stream_answers(
    batcher: MicroBatcher | ContinuousBatcher, entry: IndexEntry, key: AskKey,
    questions: list[str], timeout: float,
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
    items = [Question(q, TokenStream(gen, emitter(i)) if streams else None)
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
                yield _sse("answer", answers_json(entry, done.result()))
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
