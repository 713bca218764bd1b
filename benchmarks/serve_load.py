"""Load on ``margin serve``: before and after, in one run, each side alone.

Issue 28 (items 3 and 4) and issue 6's measurements, against the default model and index:

1. Throughput and latency, "before" (micro-batching: ``--no-continuous-batching``, batches of up
   to ``--max-batch`` questions run to their end) and "after" (continuous batching: RAG-Token
   greedy requests join the running decode between steps), with 8 and 32 loopback clients for
   60 s each (``--clients``, ``--seconds``): requests/s, p50 and p99 latency, errors. The two
   servers run one after the other, never together, with the same settings otherwise.
   ``--before-rev REV`` runs the "before" server from a git worktree of REV (under ``--work``)
   instead of this checkout, passing only the settings that revision's ``ServeConfig`` has (at
   06b7b69, the server as issue 28 found it, neither continuous batching nor a passage cache).
   The passage KV cache is ``--passage-cache-mb`` on both sides, or ``--after-passage-cache-mb``
   on the "after" one. Clients ask the 8 built-in questions, or those of ``--questions-file``
   (``--distinct N``: its first N), in turn: request i asks question i mod N, so with a long list
   every request asks a new question (a passage cache only hits once the list wraps).
2. The same load on the "after" server while an admin switches the active index several times
   (``--swaps``): zero failed requests, and every response names the index version it used
   (body and header agree, and the version is one of the two registered).
3. The paper's hot-swapping experiment (Sec. 4.5) in miniature: a copy of the default index with
   a few passages stating changed facts (``add_to_index``: the copy's manifest, so its version,
   differs). The same questions, asked of the same served model, follow the active index.

The server runs in its own process (this script with ``--serve-child``, uvicorn, as in
production, ``PYTHONPATH`` naming the side's ``src/``); the clients are threads with their own
HTTP connections. ``--write`` replaces the "Service" section of BENCHMARKS.md.

    MARGIN_HOME=/tmp/mh nice -n 10 .venv/bin/python benchmarks/serve_load.py --write
    # the server as issue 28 found it against this one with its passage cache, 256 new questions
    .venv/bin/python benchmarks/serve_load.py --before-rev 06b7b69 --after-passage-cache-mb 1024 \
        --questions-file nq-open-dev.tsv --distinct 256 --write
    # a smoke test of the script itself (minutes, not a measurement):
    MARGIN_HOME=/tmp/mh .venv/bin/python benchmarks/serve_load.py --seconds 3 --clients 2 \
        --swaps 0 --no-follow
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _report import (  # noqa: E402
    ROOT,
    commit_of,
    git,
    load_average,
    provenance,
    worktree,
    write_section,
)

TOKEN = "bench-admin-token"
QUESTIONS = [
    "Who painted the Mona Lisa?",
    "What is the capital of Australia?",
    "Which planet is known as the Red Planet?",
    "Who wrote the play Romeo and Juliet?",
    "Who developed the theory of relativity?",
    "What is the largest ocean on Earth?",
    "Who was the first president of the United States?",
    "What is the chemical symbol for gold?",
]
# The copy's changed facts (counterfactual on purpose, so following them is unmistakable).
CHANGED = [
    ("Mona Lisa", "The Mona Lisa was painted by Sandro Botticelli in Florence.", "Botticelli"),
    ("Australia", "The capital of Australia is Melbourne, its seat of government.", "Melbourne"),
    ("Mars", "Jupiter is the planet known as the Red Planet.", "Jupiter"),
    ("Romeo and Juliet", "The play Romeo and Juliet was written by Christopher Marlowe.",
     "Marlowe"),
]


def changed_index(work: Path) -> Path:
    """A copy of the default index plus the changed-fact passages (built once, cached)."""
    from margin.retrieval.build import add_to_index
    from margin.retrieval.encoders import load_encoder
    from margin.retrieval.passages import Passage
    from margin.retrieval.retriever import ensure_default_index

    out = work / "default-changed"
    if (out / "manifest.json").exists():
        return out
    tmp = work / "default-changed.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ensure_default_index(progress=False), tmp)
    passages = [Passage(f"changed-{i}", t, x, "serve_load.py") for i, (t, x, _) in
                enumerate(CHANGED)]
    add_to_index(tmp, passages, load_encoder("default", role="passage"), progress=False)
    os.replace(tmp, out)
    return out


def read_questions(path: Path | None, distinct: int | None) -> list[str]:
    """The clients' questions, the first ``distinct`` of them: the built-in 8, or the first
    TAB-separated column of each line of ``path`` (a DPR-style TSV, or one question a line),
    duplicates dropped."""
    questions = QUESTIONS
    if path is not None:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file; give a DPR-style TSV or one question a line")
        lines = path.read_text(encoding="utf-8").splitlines()
        questions = list(dict.fromkeys(q for line in lines if (q := line.split("\t")[0].strip())))
    if distinct is not None and not 1 <= distinct <= len(questions):
        raise SystemExit(f"--distinct {distinct}: there are {len(questions)} questions; "
                         f"give 1 to {len(questions)}")
    return questions[:distinct]


def plan_sides(args: argparse.Namespace) -> dict[str, dict]:
    """What each server runs: its ``src/``, its revision, the ServeConfig fields it is asked for."""
    here = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--", "src"):
        here += " with uncommitted changes to src/"
    before = {"src": ROOT / "src", "revision": here}
    if args.before_rev:
        commit = git("rev-parse", "--short", commit_of(args.before_rev))
        before = {"src": worktree(commit, args.work / f"rev-{commit}") / "src",
                  "revision": f"{commit} (a git worktree)"}
    after_mb = args.passage_cache_mb if args.after_passage_cache_mb is None \
        else args.after_passage_cache_mb
    common = {"max_running_rows": args.max_running_rows}
    continuous = args.before_continuous
    return {
        "before": {**before, "features": {**common, "continuous_batching": continuous,
                                          "passage_cache_mb": args.passage_cache_mb}},
        "after": {"src": ROOT / "src", "revision": here,
                  "features": {**common, "continuous_batching": True,
                               "passage_cache_mb": after_mb}},
    }


def _serve(settings: dict) -> None:
    """Server process (``--serve-child``): the default model over the default index (and the
    changed copy, if given), with those of ``features`` that this revision's ServeConfig has; what
    it ran -> ``report``."""
    import dataclasses

    import torch
    import uvicorn
    from transformers.utils import logging as hf_logging

    import margin
    from margin._io import atomic_path
    from margin.rag import RAG
    from margin.serving.batching import BatchConfig
    from margin.serving.config import ServeConfig
    from margin.serving.server import create_app

    if not Path(margin.__file__).resolve().is_relative_to(Path(settings["src"]).resolve()):
        raise SystemExit(f"the server imported {margin.__file__}, not {settings['src']}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(settings["threads"])
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    features = {k: v for k, v in settings["features"].items() if k in known}
    rag = RAG.load(model="default", index="default", progress=False)
    config = ServeConfig(
        port=settings["port"], admin_token=TOKEN, timeout_s=900.0, max_questions=16,
        batch=BatchConfig(max_batch=settings["max_batch"], max_wait_ms=5.0), **features,
    )
    indexes = {"default": "default"}
    if settings["changed"]:
        indexes["changed"] = settings["changed"]
    app = create_app(rag, indexes, config)
    with atomic_path(Path(settings["report"])) as tmp:
        tmp.write_text(json.dumps({"margin": margin.__file__, "features": features}))
    uvicorn.run(app, host="127.0.0.1", port=settings["port"], log_level="warning")


def start_server(side: str, spec: dict, port: int, args: argparse.Namespace,
                 changed: Path | None):
    """Start ``side``'s server with ``PYTHONPATH`` naming its ``src/`` (and ``changed`` registered
    too, if given); wait until it is ready and warmed up by one question. The process, its URL,
    and what it ran."""
    report = args.work / f"{side}-server.json"
    report.unlink(missing_ok=True)
    settings = {"port": port, "src": str(spec["src"]), "threads": args.threads,
                "max_batch": args.max_batch, "changed": str(changed) if changed else None,
                "features": spec["features"], "report": str(report)}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-child", json.dumps(settings)],
        env={**os.environ, "PYTHONPATH": str(spec["src"])},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                httpx.post(url + "/v1/ask", json={"question": QUESTIONS[0]}, timeout=900)
                return proc, url, json.loads(report.read_text())
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the {side} server process died while loading")
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"the {side} server did not become ready in 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def switch(url: str, name: str) -> dict:
    r = httpx.post(url + "/v1/indexes/active", json={"index": name},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    r.raise_for_status()
    return r.json()["active"]


def follow_experiment(url: str) -> list[dict]:
    """Ask the changed-fact questions with each index active; record answer and top passage."""
    rows = []
    questions = [QUESTIONS[i] for i in range(len(CHANGED))]
    for name in ("default", "changed"):
        switch(url, name)
        r = httpx.post(url + "/v1/ask", json={"questions": questions}, timeout=300)
        r.raise_for_status()
        for (_, _, fact), ans in zip(CHANGED, r.json()["answers"], strict=True):
            rows.append({"index": name, "question": ans["question"], "answer": ans["answer"],
                         "top": ans["passages"][0]["title"], "fact": fact,
                         "follows": fact.lower() in ans["answer"].lower()})
    switch(url, "default")
    return rows


def load(url: str, seconds: float, clients: int, questions: list[str], swaps: int = 0) -> dict:
    """``clients`` threads asking ``questions`` in turn (request i asks question i mod their
    number) for ``seconds``; with ``swaps``, switch indexes meanwhile."""
    versions = {e["id"]: e["version"] for e in httpx.get(url + "/v1/indexes").json()["indexes"]}
    latencies: list[float] = []
    errors: list[str] = []
    used: dict[str, int] = {}
    lock = threading.Lock()
    turn = itertools.count()
    start = time.monotonic()
    deadline = start + seconds

    def client() -> None:
        with httpx.Client(timeout=1000) as http:
            while time.monotonic() < deadline:
                with lock:
                    q = questions[next(turn) % len(questions)]
                t0 = time.monotonic()
                try:
                    r = http.post(url + "/v1/ask", json={"question": q})
                    ok = r.status_code == 200
                    problem = None if ok else f"{r.status_code} {r.text[:80]}"
                    if ok:
                        body = r.json()
                        name, version = body["index"]["id"], body["index"]["version"]
                        header = r.headers.get("x-margin-index")
                        if (versions.get(name) != version or header != f"{name}@{version}"
                                or body["answers"][0]["index_version"] != version):
                            problem = f"inconsistent index version {name}@{version} ({header})"
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                with lock:
                    if problem:
                        errors.append(problem)
                    else:
                        latencies.append(time.monotonic() - t0)
                        used[name] = used.get(name, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    switched = 0
    if swaps:
        for i in range(swaps):
            time.sleep(seconds / (swaps + 1))
            switch(url, ("changed", "default")[i % 2])
            switched += 1
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    lat = sorted(latencies)
    return {
        "requests": len(lat), "errors": len(errors), "first_errors": errors[:3],
        "rps": len(lat) / elapsed, "p50": statistics.median(lat) if lat else float("nan"),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "elapsed": elapsed, "swaps": switched, "by_index": used,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="each load run")
    parser.add_argument("--clients", default="8,32", help="client counts, comma-separated")
    parser.add_argument("--swaps", type=int, default=6, help="hot-swaps under load (0: no run)")
    parser.add_argument("--no-follow", action="store_true", help="skip the Sec. 4.5 experiment")
    parser.add_argument("--max-batch", type=int, default=8, help="micro-batch size (both sides)")
    parser.add_argument("--max-running-rows", type=int, default=40, help="the running batch's")
    parser.add_argument("--passage-cache-mb", type=float, default=0.0, help="both sides")
    parser.add_argument("--after-passage-cache-mb", type=float, default=None,
                        help="the after side's passage cache (default: --passage-cache-mb)")
    parser.add_argument("--before-rev", help="run the before side from a worktree of this "
                        "revision (e.g. 06b7b69), not this checkout")
    parser.add_argument("--before-continuous", action="store_true", help="the before side "
                        "batches continuously too (to compare passage cache settings alone)")
    parser.add_argument("--questions-file", type=Path, help="clients ask these questions in "
                        "turn (DPR-style TSV or one a line), not the built-in 8")
    parser.add_argument("--distinct", type=int, help="only the first N questions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--work", type=Path, default=Path("/tmp/margin-serve-bench"))
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--write", action="store_true", help="replace its BENCHMARKS.md section")
    parser.add_argument("--serve-child", help=argparse.SUPPRESS)  # JSON: run one server
    args = parser.parse_args()
    if args.serve_child:
        _serve(json.loads(args.serve_child))
        return
    for name in ("passage_cache_mb", "after_passage_cache_mb"):
        if (getattr(args, name) or 0) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} is negative; give 0 (off) or more MiB")
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    questions = read_questions(args.questions_file, args.distinct)
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    sides = plan_sides(args)
    changed = changed_index(args.work)

    runs: dict[tuple[str, int], dict] = {}
    follow: list[dict] = []
    swap = None
    for n, (side, spec) in enumerate(sides.items()):
        # only the after side switches indexes; an earlier revision may not read the copy's
        # manifest (written by this checkout), so the before side serves the default one alone
        proc, url, spec["ran"] = start_server(side, spec, args.port + n, args,
                                              changed if side == "after" else None)
        print(f"{side}: {spec['revision']}, {spec['ran']}", flush=True)
        try:
            if side == "after" and not args.no_follow:
                follow = follow_experiment(url)
                for row in follow:
                    print(row, flush=True)
            for c in clients:
                runs[side, c] = load(url, args.seconds, c, questions)
                print(f"{side}, {c} clients:", runs[side, c], flush=True)
            if side == "after" and args.swaps:
                swap = load(url, args.seconds, max(clients), questions, swaps=args.swaps)
                print("hot-swapping under load:", swap, flush=True)
        finally:
            stop(proc)
    for c in clients:
        before, after = runs["before", c], runs["after", c]
        print(f"{c} clients: after/before requests/s = {ratio(after, before)}")
    if args.write:
        section = report(args, sides, questions, clients, runs, swap, follow, load_before)
        write_section(args.out, section)
        print(f"wrote the Service section of {args.out}")


def ratio(after: dict, before: dict) -> str:
    return f"{after['rps'] / before['rps']:.2f}x" if before["rps"] else "n/a"


def describe(spec: dict, args: argparse.Namespace) -> str:
    """A side's table row: its code, its batching, its passage cache, as its server ran them."""
    ran = spec["ran"]["features"]
    if ran.get("continuous_batching"):
        batching = f"continuous (at most {ran['max_running_rows']} rows decoding)"
    else:
        batching = f"micro-batching (up to {args.max_batch} questions a batch, 5 ms wait)"
        if "continuous_batching" not in ran:
            batching += "; this revision has no continuous batching"
    if "passage_cache_mb" not in ran:
        cache = "none in this revision"
    else:
        cache = f"{ran['passage_cache_mb']:g} MiB" if ran["passage_cache_mb"] else "off"
    return f"{spec['revision']} | {batching} | {cache}"


def report(args, sides: dict, questions: list[str], clients: list[int], runs: dict,
           swap: dict | None, follow: list[dict], load_before: str) -> str:
    asked = (f"the first {len(questions)} distinct questions of `{args.questions_file.name}`"
             if args.questions_file else f"{len(questions)} built-in questions")
    lines = [
        "## Service",
        "",
        f"`margin serve` under load: the default model (SmolLM2-135M-Instruct) and index; each "
        f"server in its own process with {args.threads} torch thread(s), the two one after the "
        "other, each alone, each warmed up by one question. Client threads on loopback, each "
        "asking one question at a time (RAG-Token greedy, the model's k=5) for "
        f"{args.seconds:g} s per run; questions: {asked}, asked in turn across the clients "
        "(request i asks question i mod their number, so a passage cache can only hit once the "
        "list wraps: see the passes column).",
        "",
        "| side | code | batching | passage KV cache |",
        "|---|---|---|---|",
        *(f"| {side} | {describe(spec, args)} |" for side, spec in sides.items()),
        "",
        "| clients | side | requests | errors | requests/s | p50 latency | p99 latency "
        "| passes over the questions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in clients:
        for side in sides:
            r = runs[side, c]
            passes = (r["requests"] + r["errors"]) / len(questions)
            lines.append(f"| {c} | {side} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | "
                         f"{r['p50']:.2f} s | {r['p99']:.2f} s | {passes:.2f} |")
    lines += ["", "After / before, requests/s: " + ", ".join(
        f"{c} clients **{ratio(runs['after', c], runs['before', c])}**" for c in clients) + "."]
    if swap is not None:
        lines += [
            "",
            f"Hot-swapping under load (after, {max(clients)} clients): {swap['swaps']} switches "
            f"between the default index and its changed copy, {swap['errors']} failed requests, "
            f"{swap['rps']:.2f} requests/s; responses by index {swap['by_index']}, every one "
            "naming an index version that body, answer and `X-Margin-Index` header agree on and "
            "that was registered.",
        ]
    if follow:
        lines += [
            "",
            "The paper's experiment in miniature (Sec. 4.5): the same questions, the same served "
            "model, the active index switched from the default corpus to a copy with changed "
            "facts:",
            "",
            "| question | index | top passage | answer | states the copy's fact |",
            "|---|---|---|---|---|",
        ]
        for row in follow:
            lines.append(f"| {row['question']} | {row['index']} | {row['top']} | "
                         f"{row['answer'].replace('|', '/')} | "
                         f"{'yes' if row['follows'] else 'no'} |")
    return "\n".join([*lines, "", *provenance("serve_load.py", load_before)])


if __name__ == "__main__":
    main()
