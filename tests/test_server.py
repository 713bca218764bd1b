"""The HTTP service: API contract, streaming, micro-batching, hot-swapping, limits and security.

Two tiny indexes over corpora that differ in two facts (Germany's and Italy's capitals), searched
by a keyword encoder (tests/helpers.py) so that which passage a question retrieves is obvious by
hand, and the tiny random BART of tests/helpers.py as the generator: the paper's
hot-swapping experiment (Sec. 4.5) in miniature. Its answers are gibberish, but deterministic,
so "the answer follows the index" is checked against the same model asked directly over each index.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from helpers import ADMIN_TOKEN as TOKEN
from helpers import SERVER_KEYWORDS as KEYWORDS
from helpers import SERVER_QUESTIONS as QUESTIONS
from helpers import SERVER_TOP as TOP
from helpers import QuestionKeywords, build_world, make_app
from margin.errors import MarginError
from margin.generation.causal import CausalFormat, CausalGenerator
from margin.generation.decoding import DecodeConfig
from margin.rag import RAG
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever
from margin.serving.batching import BatchConfig, BatcherBusy, MicroBatcher
from margin.serving.config import ServeConfig
from margin.serving.registry import manifest_version
from margin.serving.server import create_app, parse_index_options

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, bart):
    return build_world(tmp_path_factory.mktemp("indexes"), bart)


@pytest.fixture(scope="module")
def client(world):
    with TestClient(make_app(world, batch=BatchConfig(max_batch=8, max_wait_ms=5))) as c:
        yield c


def activate(client, name: str) -> dict:
    r = client.post("/v1/indexes/active", json={"index": name}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["active"]


def top(body: dict) -> str:
    """The title of the first answer's best passage."""
    return body["answers"][0]["passages"][0]["title"]


def sse(text: str) -> list[tuple[str, dict]]:
    """Parse a server-sent-event stream into (event, data) pairs."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# ----------------------------------------------------------------------------- contract


def test_health_readiness_and_the_registered_indexes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    activate(client, "2016")
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    body = client.get("/v1/indexes", headers=ADMIN).json()
    assert [e["id"] for e in body["indexes"]] == ["2016", "2018"]
    assert body["active"]["id"] == "2016"
    for entry in body["indexes"]:
        assert entry["manifest"]["passages"] == 6
        assert entry["version"] == manifest_version(entry["manifest"])
        assert entry["active"] == (entry["id"] == "2016")
    versions = {e["version"] for e in body["indexes"]}
    assert len(versions) == 2  # different corpora, different versions
    assert "/v1/ask" in client.get("/openapi.json").json()["paths"]


def test_the_index_list_shows_server_paths_only_to_the_admin(client, world):
    root, _ = world
    public = client.get("/v1/indexes")
    assert public.status_code == 200
    assert [set(e) for e in public.json()["indexes"]] == [{"id", "version", "active"}] * 2
    assert str(root) not in public.text and "manifest" not in public.text
    admin = client.get("/v1/indexes", headers=ADMIN).json()
    assert [e["path"] for e in admin["indexes"]] == [str(root / "2016"), str(root / "2018")]
    assert all(e["manifest"]["passages"] == 6 for e in admin["indexes"])
    wrong = client.get("/v1/indexes", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 403 and str(root) not in wrong.text


def schema_bounds(prop: dict) -> dict:
    """A property's bounds, whether it is optional (anyOf [..., null]) or not."""
    for option in [prop, *prop.get("anyOf", [])]:
        found = {k: v for k, v in option.items()
                 if k in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems")}
        if option.get("type") == "array":
            found["items"] = schema_bounds(option["items"])
        if found:
            return found
    return {}


def test_the_openapi_document_states_the_bounds_the_server_enforces(world):
    limits = {"max_k": 4, "max_beams": 3, "max_new_tokens": 5, "max_questions": 3,
              "max_question_chars": 40}
    app = make_app(world, **limits)
    doc = app.openapi()
    schemas = doc["components"]["schemas"]
    ask, search = schemas["AskRequest"]["properties"], schemas["SearchRequest"]["properties"]
    one = {"minLength": 1, "maxLength": 40}
    assert schema_bounds(ask["question"]) == schema_bounds(search["query"]) == one
    many = {"minItems": 1, "maxItems": 3, "items": one}
    assert schema_bounds(ask["questions"]) == schema_bounds(search["queries"]) == many
    k = {"minimum": 1, "maximum": 4}
    assert schema_bounds(ask["k"]) == schema_bounds(search["k"]) == k
    assert schema_bounds(ask["beams"]) == {"minimum": 1, "maximum": 3}
    assert schema_bounds(ask["max_new_tokens"]) == {"minimum": 1, "maximum": 5}
    # the admin bearer scheme, on the admin endpoints (optional on the index list)
    [(scheme, spec)] = doc["components"]["securitySchemes"].items()
    assert spec["type"] == "http" and spec["scheme"] == "bearer"
    paths = doc["paths"]
    for path in ("/v1/indexes/active", "/v1/indexes"):
        assert paths[path]["post"]["security"] == [{scheme: []}]
    assert {scheme: []} in paths["/v1/indexes"]["get"]["security"]
    assert {} in paths["/v1/indexes"]["get"]["security"]  # anyone may list the names
    assert "security" not in paths["/v1/ask"]["post"]
    # what the document states is what the server does: at the bounds 200, past them 422
    with TestClient(app) as c:
        edge = {"questions": ["capital " * 4 + "x" * 8] * 3, "k": 4, "decoding": "beam",
                "beams": 3, "max_new_tokens": 5}
        assert c.post("/v1/ask", json=edge).status_code == 200
        for name, value in (("questions", ["a"] * 4), ("questions", ["x" * 41]), ("k", 5),
                            ("k", 0), ("beams", 4), ("beams", 0), ("max_new_tokens", 6),
                            ("max_new_tokens", 0)):
            r = c.post("/v1/ask", json={**edge, name: value})
            assert r.status_code == 422 and r.json()["field"].startswith(name), (name, r.text)


def test_ask_returns_margin_ask_json_plus_the_index_that_answered(client, world):
    _, refs = world
    activate(client, "2016")
    r = client.post("/v1/ask", json={"questions": QUESTIONS, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    version = body["index"]["version"]
    assert body["index"]["id"] == "2016" and r.headers["x-margin-index"] == f"2016@{version}"
    expected = refs["2016"].ask(QUESTIONS, k=3, mode="token", decoding="greedy")
    for got, want in zip(body["answers"], expected, strict=True):
        assert got == {**want.to_json(), "index": "2016", "index_version": version}
    assert [a["passages"][0]["title"] for a in body["answers"]] == TOP["2016"]


def test_ask_rag_sequence_with_beams_and_a_single_question(client, world):
    _, refs = world
    activate(client, "2016")
    r = client.post("/v1/ask", json={"question": QUESTIONS[0], "mode": "sequence",
                                     "decoding": "beam", "beams": 2, "k": 2})
    assert r.status_code == 200, r.text
    [got] = r.json()["answers"]
    [want] = refs["2016"].ask(QUESTIONS[:1], k=2, mode="sequence", decoding="beam", num_beams=2)
    assert got["answer"] == want.answer and got["mode"] == "sequence"
    assert got["logprob"] == pytest.approx(want.logprob, abs=1e-5)
    assert "token_docs" not in got


def test_search_returns_the_hand_obvious_passages(client):
    activate(client, "2018")
    r = client.post("/v1/search", json={"queries": ["capital germany", "river france"], "k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index"]["id"] == "2018"
    assert [res["passages"][0]["title"] for res in body["results"]] == ["Bonn", "Seine"]
    assert [p["score"] for p in body["results"][0]["passages"]] == pytest.approx([1, 0.5])


def test_the_web_page_and_its_files_are_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="question"' in page.text and "http" not in page.text.replace("http-equiv", "")
    for name in ("app.js", "app.css"):
        r = client.get(f"/web/{name}")
        assert r.status_code == 200 and "https://" not in r.text
    assert client.get("/web/../server.py").status_code == 404
    assert client.get("/web/secret.txt").status_code == 404


# ----------------------------------------------------------------------------- streaming


def test_streaming_sends_rag_token_greedy_tokens_then_the_answer(client):
    activate(client, "2016")
    plain = client.post("/v1/ask", json={"question": QUESTIONS[0]}).json()
    with client.stream("POST", "/v1/ask", json={"question": QUESTIONS[0], "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.read().decode())
    names = [name for name, _ in events]
    assert names[-1] == "answer" and set(names[:-1]) == {"token"} and len(names) > 2
    streamed = "".join(data["text"] for name, data in events if name == "token")
    final = events[-1][1]
    assert final == plain  # the final event is the non-streamed response
    assert streamed.strip() == final["answers"][0]["answer"].strip() != ""


def test_streaming_other_modes_sends_only_the_final_answer(client):
    body = {"questions": QUESTIONS[:2], "mode": "sequence", "stream": True, "k": 2}
    with client.stream("POST", "/v1/ask", json=body) as r:
        events = sse(r.read().decode())
    assert [name for name, _ in events] == ["answer"]
    assert len(events[0][1]["answers"]) == 2


def test_streaming_several_questions_tags_tokens_by_question(client):
    activate(client, "2016")
    plain = client.post("/v1/ask", json={"questions": QUESTIONS[:2]}).json()
    with client.stream("POST", "/v1/ask", json={"questions": QUESTIONS[:2], "stream": True}) as r:
        events = sse(r.read().decode())
    for qi in range(2):
        text = "".join(d["text"] for n, d in events if n == "token" and d["question"] == qi)
        assert text.strip() == plain["answers"][qi]["answer"].strip()


# ----------------------------------------------------------------------------- hot-swapping


def test_the_same_questions_follow_the_active_index(client, world):
    """Sec. 4.5 in miniature: swap the memory, the provenance and the answers change with it."""
    _, refs = world
    answers = {}
    for year in ("2016", "2018", "2016"):
        activate(client, year)
        body = client.post("/v1/ask", json={"questions": QUESTIONS, "k": 3}).json()
        assert body["index"]["id"] == year
        assert [a["passages"][0]["title"] for a in body["answers"]] == TOP[year]
        expected = refs[year].ask(QUESTIONS, k=3)
        assert [a["answer"] for a in body["answers"]] == [e.answer for e in expected]
        answers[year] = [a["answer"] for a in body["answers"]]
    # the changed facts change the answers; the unchanged one (France) does not
    assert answers["2016"][:2] != answers["2018"][:2]
    assert answers["2016"][2] == answers["2018"][2]


def test_a_request_in_flight_finishes_on_the_index_it_started_with(world, monkeypatch):
    app = make_app(world)
    registry = app.state.registry
    old = registry.active
    gate, entered = threading.Event(), threading.Event()
    original = old.rag._retrieve_scored  # the retrieval step of RAG.ask

    def slow_retrieve(questions, k):
        entered.set()
        assert gate.wait(10)
        return original(questions, k)

    monkeypatch.setattr(old.rag, "_retrieve_scored", slow_retrieve)
    with TestClient(app) as c, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.post, "/v1/ask", json={"question": QUESTIONS[0]})
        assert entered.wait(10)  # the request is being answered on 2016 ...
        assert activate(c, "2018")["id"] == "2018"  # ... when 2018 becomes active
        gate.set()
        first = pending.result(10).json()
        after = c.post("/v1/ask", json={"question": QUESTIONS[0]}).json()
    assert first["index"]["id"] == "2016" and top(first) == "Berlin"
    assert after["index"]["id"] == "2018" and top(after) == "Bonn"


def test_concurrent_requests_during_hot_swaps_never_fail_and_stay_consistent(world):
    with TestClient(make_app(world, batch=BatchConfig(max_batch=8, max_wait_ms=5))) as client:
        hammer_during_hot_swaps(client)


def hammer_during_hot_swaps(client) -> None:
    """Six clients ask while the index is switched six times (a fresh app: its counters are
    this test's own)."""
    versions = {e["id"]: e["version"] for e in client.get("/v1/indexes").json()["indexes"]}
    stop = threading.Event()

    def hammer(i: int) -> list[dict]:
        out = []
        while not stop.is_set() or not out:
            q = QUESTIONS[i % 2]
            r = client.post("/v1/ask", json={"question": q, "k": 2, "max_new_tokens": 3})
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(hammer, i) for i in range(6)]
        for year in ("2018", "2016", "2018", "2016", "2018", "2016"):
            activate(client, year)
            time.sleep(0.05)
        stop.set()
        results = [body for f in futures for body in f.result(30)]
    seen = set()
    for body in results:
        year, version = body["index"]["id"], body["index"]["version"]
        answer = body["answers"][0]
        assert versions[year] == version == answer["index_version"]
        # the provenance comes from the index the response names
        assert answer["passages"][0]["title"] in TOP[year]
        seen.add(year)
    assert seen == {"2016", "2018"}
    batcher = client.app.state.batcher
    assert batcher.items_run == len(results)  # every model call counted was one of these
    assert batcher.batches_run < batcher.items_run  # some requests shared a model call


# ------------------------------------------------------------------------- one request's failure

POISON = "capital of nowhere?"  # the question the patched model cannot answer


def poison(app, monkeypatch, error: Exception, after_decoding: bool = False) -> list[list[str]]:
    """Make every model call holding POISON raise ``error`` (before decoding, or after it, once
    tokens have been streamed); returns the questions of each model call, in order."""
    rag = app.state.registry.active.rag
    original, calls = rag.ask, []

    def ask(questions, **options):
        calls.append(list(questions))
        if POISON in questions and not after_decoding:
            raise error
        answers = original(questions, **options)
        if POISON in questions:
            raise error
        return answers

    monkeypatch.setattr(rag, "ask", ask)
    return calls


def post_together(client, *bodies: dict) -> list:
    """POST /v1/ask bodies at once (with max_batch = len(bodies) they share one model call);
    a streamed body gives its events, the others their responses."""

    def post(body):
        if not body.get("stream"):
            return client.post("/v1/ask", json=body)
        with client.stream("POST", "/v1/ask", json=body) as r:
            return sse(r.read().decode())

    with ThreadPoolExecutor(len(bodies)) as pool:
        return [f.result(30) for f in [pool.submit(post, b) for b in bodies]]


BATCH_OF_TWO = BatchConfig(max_batch=2, max_wait_ms=1000)  # the first waits for the second


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [(MarginError("cannot answer this one"), 400, "cannot answer this one"),
     (RuntimeError("the model broke on this one"), 500, "internal error")],
)
def test_a_request_that_fails_does_not_fail_the_others_in_its_batch(
    world, monkeypatch, error, status, message
):
    _, refs = world
    app = make_app(world, batch=BATCH_OF_TWO)
    calls = poison(app, monkeypatch, error)
    with TestClient(app) as c:
        good, bad = post_together(c, {"question": QUESTIONS[0]}, {"question": POISON})
    assert sorted(calls[0]) == sorted([QUESTIONS[0], POISON])  # they shared a model call
    assert good.status_code == 200, good.text
    [want] = refs["2016"].ask(QUESTIONS[:1])
    assert good.json()["answers"][0]["answer"] == want.answer
    assert top(good.json()) == "Berlin"
    assert bad.status_code == status and bad.json()["error"] == message


def test_a_streamed_answer_survives_a_failure_in_its_batch_without_repeating_tokens(
    world, monkeypatch
):
    app = make_app(world, batch=BATCH_OF_TWO)
    calls = poison(app, monkeypatch, MarginError("cannot answer this one"), after_decoding=True)
    with TestClient(app) as c:
        plain = c.post("/v1/ask", json={"question": QUESTIONS[0]}).json()
        calls.clear()
        good, bad = post_together(c, {"question": QUESTIONS[0], "stream": True},
                                  {"question": POISON, "stream": True})
    assert sorted(calls[0]) == sorted([QUESTIONS[0], POISON])  # decoded together, then failed
    assert good[-1] == ("answer", plain)
    streamed = "".join(data["text"] for name, data in good if name == "token")
    assert streamed.strip() == plain["answers"][0]["answer"].strip() != ""  # each token once
    assert bad[-1] == ("error", {"error": "cannot answer this one", "field": None, "status": 400})


def test_a_prompt_too_long_for_the_generator_fails_only_its_own_request(world, llama, monkeypatch):
    """A realistic failure: a causal generator with a short context and a long question. Each
    request gets, batched, exactly what it gets alone. (Micro-batched: continuous batching's
    prefill groups are tests/test_continuous_batching.py's.)"""
    root, _ = world
    generator = CausalGenerator(llama.model, llama.tokenizer, CausalFormat(max_prompt_length=64))
    rag = RAG(generator, Retriever(open_index(root / "2016"), QuestionKeywords(KEYWORDS)),
              default_decode=DecodeConfig(max_new_tokens=3), default_k=2)
    long_question = "capital of germany " + "where is the tower " * 20  # about 90 tokens
    bodies = ({"question": QUESTIONS[0]}, {"question": long_question})
    with TestClient(create_app(rag, None, ServeConfig(continuous_batching=False))) as c:
        alone = [c.post("/v1/ask", json=b) for b in bodies]
    app = create_app(rag, None, ServeConfig(batch=BATCH_OF_TWO, continuous_batching=False))
    calls = poison(app, monkeypatch, MarginError("unused"))  # nothing is POISON: records calls
    with TestClient(app) as c:
        batched = post_together(c, *bodies)
    assert sorted(calls[0]) == sorted([QUESTIONS[0], long_question])  # one model call
    assert alone[0].status_code == 200, alone[0].text
    if alone[1].status_code == 200:
        pytest.skip("the generator now fits this prompt; the patched failures above still apply")
    assert alone[1].status_code == 400 and "prompt" in alone[1].json()["error"]
    assert [r.status_code for r in batched] == [200, 400], batched[0].text
    assert batched[0].json() == alone[0].json() and batched[1].json() == alone[1].json()


# ----------------------------------------------------------------------------- admin and security


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": TOKEN}, 401),
     ({"Authorization": f"Basic {TOKEN}"}, 401)],
)
def test_admin_endpoints_refuse_a_missing_or_wrong_token(client, headers, status):
    before = client.get("/v1/indexes").json()["active"]
    for path, body in (("/v1/indexes/active", {"index": "2018"}),
                       ("/v1/indexes", {"name": "x", "directory": "extra"})):
        r = client.post(path, json=body, headers=headers)
        assert r.status_code == status and r.json()["field"] == "authorization"
    assert client.get("/v1/indexes").json()["active"] == before


def test_admin_is_off_without_a_configured_token(world):
    with TestClient(make_app(world, admin_token=None)) as c:
        r = c.post("/v1/indexes/active", json={"index": "2018"}, headers=ADMIN)
        assert r.status_code == 403 and "MARGIN_ADMIN_TOKEN" in r.json()["error"]


def test_switching_to_an_unknown_index_names_the_field(client):
    r = client.post("/v1/indexes/active", json={"index": "1999"}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["field"] == "index"


def test_registration_refuses_a_directory_name_too_long_for_the_file_system(client):
    r = client.post("/v1/indexes", json={"name": "long", "directory": "a" * 5000}, headers=ADMIN)
    assert r.status_code == 422 and r.json() == {
        "error": "directory: cannot resolve (File name too long)", "field": "directory"}


@pytest.mark.parametrize("directory", ["..", "../..", "/etc", "2016/../..", "", "escape"])
def test_registration_refuses_a_directory_outside_the_root(client, world, directory):
    root, _ = world
    link = root / "escape"
    if not link.exists():
        link.symlink_to(root.parent, target_is_directory=True)  # a symlink leading out
    r = client.post("/v1/indexes", json={"name": "evil", "directory": directory}, headers=ADMIN)
    assert r.status_code == 403 and r.json()["field"] == "directory"
    assert "evil" not in [e["id"] for e in client.get("/v1/indexes").json()["indexes"]]


def test_registration_of_an_index_under_the_root(world):
    root, _ = world
    (root / "not-an-index").mkdir(exist_ok=True)
    with TestClient(make_app(world)) as c:
        bad = c.post("/v1/indexes", json={"name": "n", "directory": "not-an-index"},
                     headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["field"] == "directory"
        assert "Traceback" not in bad.text and str(root) not in bad.json()["error"][:10]
        ok = c.post("/v1/indexes", json={"name": "extra", "directory": "extra", "activate": True},
                    headers=ADMIN)
        assert ok.status_code == 201 and ok.json()["active"] is True
        body = c.post("/v1/search", json={"query": "mountain", "k": 1}).json()
        assert body["index"]["id"] == "extra" and body["results"][0]["passages"][0]["id"] == "x"
        again = c.post("/v1/indexes", json={"name": "extra", "directory": "extra"}, headers=ADMIN)
        assert again.status_code == 409 and again.json()["field"] == "name"
    with TestClient(make_app(world, index_root=None)) as c:
        r = c.post("/v1/indexes", json={"name": "e", "directory": "extra"}, headers=ADMIN)
        assert r.status_code == 403 and "--index-root" in r.json()["error"]


LONG = "x" * 1001
BAD_REQUESTS = [
    ({"questions": ["a"] * 17}, "questions"),
    ({"question": LONG}, "question"),
    ({"questions": ["ok", LONG]}, "questions[1]"),
    ({"question": "   "}, "question"),
    ({"questions": []}, "questions"),
    ({}, "questions"),
    ({"question": "a", "questions": ["b"]}, "questions"),
    ({"question": "a", "k": 0}, "k"),
    ({"question": "a", "k": 7}, "k"),  # larger than the 6-passage index
    ({"question": "a", "k": "5"}, "k"),
    ({"question": "a", "k": 2.5}, "k"),
    ({"question": 5}, "question"),
    ({"questions": "one string"}, "questions"),
    ({"question": "a", "mode": "foo"}, "mode"),
    ({"question": "a", "decoding": "sampling"}, "decoding"),
    ({"question": "a", "mode": "token", "decoding": "thorough"}, "decoding"),
    ({"question": "a", "decoding": "beam", "beams": 99}, "beams"),
    ({"question": "a", "max_new_tokens": 10_000}, "max_new_tokens"),
    ({"question": "a", "stream": "yes"}, "stream"),
    ({"question": "a", "temperature": 0.7}, "temperature"),
]


@pytest.mark.parametrize(("body", "field"), BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(client, body, field):
    r = client.post("/v1/ask", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and field.split("[")[0] in r.json()["error"]
    assert client.post("/v1/search", json={"query": "capital germany", "k": 1}).status_code == 200


@pytest.mark.parametrize(
    ("content", "status", "field"),
    [(b"{not json", 422, "body"), (b"", 422, "body"), (b"[1, 2]", 422, "body"),
     (json.dumps({"question": "a" * 70_000}).encode(), 413, "body"),
     (b'{"question": "\\ud800 capital"}', 422, "question"),  # a lone surrogate: was a 500
     (b'{"questions": ["ok", "\\udce9"]}', 422, "questions[1]")],
)
def test_malformed_and_oversized_bodies(client, content, status, field):
    r = client.post("/v1/ask", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status and r.json()["field"] == field
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", None])
def test_a_json_body_without_its_content_type_is_told_so(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/v1/ask", content=b'{"question": "a"}', headers=headers)
    assert r.status_code == 422 and r.json() == {  # was pydantic's "valid dictionary or object"
        "error": "body: send a JSON object with Content-Type: application/json", "field": "body"}


def test_search_limits(client):
    assert client.post("/v1/search", json={"queries": ["a"] * 17}).json()["field"] == "queries"
    assert client.post("/v1/search", json={"query": "a", "k": 21}).json()["field"] == "k"


def test_the_models_own_k_is_capped_by_the_server_limit(world):
    with TestClient(make_app(world, max_k=2)) as c:
        body = c.post("/v1/ask", json={"question": QUESTIONS[0]}).json()
        assert len(body["answers"][0]["passages"]) == 2  # the model's k is 3
        assert c.post("/v1/ask", json={"question": "a", "k": 3}).json()["field"] == "k"


def test_errors_carry_no_stack_trace_and_cors_is_off(world, monkeypatch):
    app = make_app(world)

    def broken(questions, k):
        raise RuntimeError("secret internals at /home/x/model.py line 12")

    monkeypatch.setattr(app.state.registry.active.rag, "_retrieve_scored", broken)
    with TestClient(app) as c:
        r = c.post("/v1/ask", json={"question": "a"}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 500 and r.json() == {"error": "internal error", "field": None}
        assert "access-control-allow-origin" not in r.headers
        pre = c.options("/v1/ask", headers={"Origin": "https://evil.example",
                                             "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
        with c.stream("POST", "/v1/ask", json={"question": "a", "stream": True}) as s:
            events = sse(s.read().decode())
        assert events == [("error", {"error": "internal error", "field": None, "status": 500})]
        assert c.get("/healthz").status_code == 200


def test_a_request_past_the_timeout_gets_504_and_the_server_recovers(world, monkeypatch):
    app = make_app(world, timeout_s=1.0)
    gate = threading.Event()
    original = app.state.registry.active.rag._retrieve_scored  # the retrieval step of RAG.ask
    monkeypatch.setattr(app.state.registry.active.rag, "_retrieve_scored",
                        lambda qs, k: (gate.wait(10), original(qs, k))[1])
    with TestClient(app) as c:
        r = c.post("/v1/ask", json={"question": QUESTIONS[0]})
        assert r.status_code == 504 and "1 s" in r.json()["error"]
        gate.set()
        deadline = time.monotonic() + 10
        while app.state.batcher.batches_run < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the model finishes the abandoned request
        ok = c.post("/v1/ask", json={"question": QUESTIONS[0]})
        assert ok.status_code == 200 and ok.json()["answers"][0]["passages"][0]["title"] == "Berlin"


# ----------------------------------------------------------------------------- micro-batcher


def test_the_batcher_groups_queued_jobs_of_one_key_up_to_the_batch_size():
    calls: list[tuple[str, list[int]]] = []
    gate = threading.Event()

    def run(key, items):
        if key == "block":
            assert gate.wait(10)
        calls.append((key, list(items)))
        return [x * 10 for x in items]

    batcher = MicroBatcher(run, BatchConfig(max_batch=4, max_wait_ms=50))
    try:
        blocker = batcher.submit("block", [0])
        time.sleep(0.05)  # the worker now holds the blocker; the rest queue up behind it
        futures = [batcher.submit("a", [1, 2]), batcher.submit("b", [3]),
                   batcher.submit("a", [4]), batcher.submit("a", [5, 6]), batcher.submit("a", [7])]
        gate.set()
        assert blocker.result(5) == [0]
        assert [f.result(5) for f in futures] == [[10, 20], [30], [40], [50, 60], [70]]
    finally:
        batcher.close()
    # same-key jobs joined up to 4 items in queue order; "b" never mixed with "a"
    assert calls[1:] == [("a", [1, 2, 4, 7]), ("b", [3]), ("a", [5, 6])]


def test_the_batcher_without_batching_runs_one_job_per_call_and_survives_errors():
    def run(key, items):
        if key == "bad":
            raise MarginError("bad key")
        return items

    batcher = MicroBatcher(run, BatchConfig(max_batch=1, max_wait_ms=50, max_pending=2))
    try:
        with pytest.raises(MarginError, match="bad key"):
            batcher.submit("bad", [1]).result(5)
        assert batcher.submit("ok", ["x"]).result(5) == ["x"]
        assert batcher.batches_run == 1
    finally:
        batcher.close()
    with pytest.raises(MarginError, match="closed"):
        batcher.submit("ok", [1])


def test_the_batcher_refuses_work_beyond_its_queue_and_drops_cancelled_jobs():
    gate = threading.Event()
    ran: list = []

    def run(key, items):
        assert gate.wait(10)
        ran.extend(items)
        return items

    batcher = MicroBatcher(run, BatchConfig(max_batch=1, max_pending=2))
    try:
        first = batcher.submit("k", [1])
        time.sleep(0.05)
        second, third = batcher.submit("k", [2]), batcher.submit("k", [3])
        with pytest.raises(BatcherBusy):
            batcher.submit("k", [4])
        assert second.cancel()
        gate.set()
        assert first.result(5) == [1] and third.result(5) == [3]
    finally:
        batcher.close()
    assert ran == [1, 3]


def test_a_failing_job_fails_alone_and_the_rest_of_its_batch_is_answered():
    calls: list[list[str]] = []
    gate = threading.Event()

    def run(key, items):
        if key == "block":
            assert gate.wait(10)
        calls.append(list(items))
        if "bad" in items:
            raise MarginError("cannot do 'bad'")
        return [x.upper() for x in items]

    batcher = MicroBatcher(run, BatchConfig(max_batch=4, max_wait_ms=50))
    try:
        blocker = batcher.submit("block", ["z"])
        time.sleep(0.05)  # the worker holds the blocker; the three jobs queue up behind it
        a, bad, bc = (batcher.submit("k", ["a"]), batcher.submit("k", ["bad"]),
                      batcher.submit("k", ["b", "c"]))
        gate.set()
        assert blocker.result(5) == ["Z"]
        assert a.result(5) == ["A"] and bc.result(5) == ["B", "C"]
        with pytest.raises(MarginError, match="cannot do 'bad'"):
            bad.result(5)
    finally:
        batcher.close()
    # one call for the batch, which failed, then each job on its own
    assert calls[1:] == [["a", "bad", "b", "c"], ["a"], ["bad"], ["b", "c"]]
    assert (batcher.batches_run, batcher.items_run) == (3, 4)


# ----------------------------------------------------------------------------- command line


def test_index_options_parse_into_names_and_directories(tmp_path):
    assert parse_index_options([]) == {"default": "default"}
    assert parse_index_options(["default"]) == {"default": "default"}
    assert parse_index_options([str(tmp_path / "wiki2018")]) == {
        "wiki2018": str(tmp_path / "wiki2018")
    }
    assert parse_index_options(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}
    for bad in (["a=/x", "a=/y"], ["bad name=/x"], ["a="]):
        with pytest.raises(MarginError, match="--index"):
            parse_index_options(bad)


def test_margin_serve_is_a_command_with_the_documented_options():
    from typer.testing import CliRunner

    from margin.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--index", "--host", "--port", "--index-root"):
        assert option in result.output


def test_margin_serve_flags_reach_its_config(monkeypatch, capsys):
    import margin.serving.server
    from margin.cli import main

    seen: list[ServeConfig] = []
    monkeypatch.setattr(margin.serving.server, "serve", lambda model, indexes, c: seen.append(c))
    assert main(["serve", "--passage-cache-mb", "8", "--no-continuous-batching"]) == 0
    assert seen[0].passage_cache_mb == 8 and seen[0].continuous_batching is False
    assert main(["serve", "--continuous-batching"]) == main(["serve"]) == 0
    assert all(c.passage_cache_mb == 1024 and c.continuous_batching for c in seen[1:])
    capsys.readouterr()
    assert main(["serve", "--passage-cache-mb", "-1"]) != 0 and len(seen) == 3
    assert "--passage-cache-mb is -1" in capsys.readouterr().err


@pytest.mark.parametrize("taken", [False, True])
def test_margin_serve_refuses_an_address_it_cannot_listen_on_before_loading(monkeypatch, capsys,
                                                                           taken):
    """A port out of range or held by another process: one line, exit 2, and the model is
    never loaded (no wait for it only to fail at bind time)."""
    import socket

    from margin.cli import main

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(RAG, "load", load)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1] if taken else 99999
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    want = f"cannot listen on 127.0.0.1:{port}" if taken else "--port 99999 is not a TCP port"
    assert want in err and "serving on" not in err
