"""Load on ``margin serve``: before and after continuous batching, in one run, each side alone.

Issue 28 (item 3) and issue 6's measurements, against the default model and index:

1. Throughput and latency, "before" (micro-batching: ``--no-continuous-batching``, batches of up
   to ``--max-batch`` questions run to their end) and "after" (continuous batching: RAG-Token
   greedy requests join the running decode between steps), with 8 and 32 loopback clients for
   60 s each (``--clients``, ``--seconds``): requests/s, p50 and p99 latency, errors. The two
   servers run one after the other, never together, with the same settings otherwise.
2. The same load on the "after" server while an admin switches the active index several times
   (``--swaps``): zero failed requests, and every response names the index version it used
   (body and header agree, and the version is one of the two registered).
3. The paper's hot-swapping experiment (Sec. 4.5) in miniature: a copy of the default index with
   a few passages stating changed facts (``add_to_index``: the copy's manifest, so its version,
   differs). The same questions, asked of the same served model, follow the active index.

The server runs in its own process (uvicorn, as in production); the clients are threads with
their own HTTP connections. ``--write`` replaces the "Service" section of BENCHMARKS.md.

    MARGIN_HOME=/tmp/mh nice -n 10 .venv/bin/python benchmarks/serve_load.py --write
    # a smoke test of the script itself (minutes, not a measurement):
    MARGIN_HOME=/tmp/mh .venv/bin/python benchmarks/serve_load.py --seconds 3 --clients 2 \
        --swaps 0 --no-follow
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _report import cpu_model, load_average, write_section  # noqa: E402

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


SIDES = {"before": False, "after": True}  # side -> ServeConfig.continuous_batching


def _serve(port: int, side: str, args: dict, changed: str) -> None:
    """Server process: the default model over the default and changed indexes."""
    import torch
    import uvicorn
    from transformers.utils import logging as hf_logging

    from margin.rag import RAG
    from margin.serving.batching import BatchConfig
    from margin.serving.config import ServeConfig
    from margin.serving.server import create_app

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args["threads"])
    rag = RAG.load(model="default", index="default", progress=False)
    config = ServeConfig(
        port=port, admin_token=TOKEN, timeout_s=900.0, max_questions=16,
        batch=BatchConfig(max_batch=args["max_batch"], max_wait_ms=5.0),
        continuous_batching=SIDES[side], max_running_rows=args["max_running_rows"],
        passage_cache_mb=args["passage_cache_mb"],
    )
    app = create_app(rag, {"default": "default", "changed": changed}, config)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_server(port: int, side: str, args: argparse.Namespace, changed: Path):
    settings = {name: getattr(args, name) for name in
                ("threads", "max_batch", "max_running_rows", "passage_cache_mb")}
    proc = mp.get_context("spawn").Process(
        target=_serve, args=(port, side, settings, str(changed)), daemon=True
    )
    proc.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                httpx.post(url + "/v1/ask", json={"question": QUESTIONS[0]}, timeout=900)
                return proc, url  # loaded and warmed up by one question
        except httpx.HTTPError:
            pass
        if not proc.is_alive():
            raise SystemExit("the server process died while loading")
        time.sleep(0.5)
    raise SystemExit("the server did not become ready in 300 s")


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


def load(url: str, seconds: float, clients: int, swaps: int = 0) -> dict:
    """``clients`` threads asking for ``seconds``; with ``swaps``, switch indexes meanwhile."""
    versions = {e["id"]: e["version"] for e in httpx.get(url + "/v1/indexes").json()["indexes"]}
    latencies: list[float] = []
    errors: list[str] = []
    used: dict[str, int] = {}
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=1000) as http:
            while time.monotonic() < deadline:
                q = rng.choice(QUESTIONS)
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

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--work", type=Path, default=Path("/tmp/margin-serve-bench"))
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--write", action="store_true", help="replace its BENCHMARKS.md section")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    changed = changed_index(args.work)

    runs: dict[tuple[str, int], dict] = {}
    follow: list[dict] = []
    swap = None
    for n, side in enumerate(SIDES):
        proc, url = start_server(args.port + n, side, args, changed)
        try:
            if side == "after" and not args.no_follow:
                follow = follow_experiment(url)
                for row in follow:
                    print(row, flush=True)
            for c in clients:
                runs[side, c] = load(url, args.seconds, c)
                print(f"{side}, {c} clients:", runs[side, c], flush=True)
            if side == "after" and args.swaps:
                swap = load(url, args.seconds, max(clients), swaps=args.swaps)
                print("hot-swapping under load:", swap, flush=True)
        finally:
            proc.terminate()
            proc.join(10)
    for c in clients:
        before, after = runs["before", c], runs["after", c]
        print(f"{c} clients: after/before requests/s = {ratio(after, before)}")
    if args.write:
        write_section(args.out, report(args, clients, runs, swap, follow, load_before))
        print(f"wrote the Service section of {args.out}")


def ratio(after: dict, before: dict) -> str:
    return f"{after['rps'] / before['rps']:.2f}x" if before["rps"] else "n/a"


def report(args, clients: list[int], runs: dict, swap: dict | None, follow: list[dict],
           load_before: str) -> str:
    lines = [
        "## Service",
        "",
        f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}` ({cpu_model()}, "
        f"{os.cpu_count()} cores; load average "
        f"{load_before} before, {load_average()} after). Default model (SmolLM2-135M-Instruct) "
        f"and index; the server in its own process with {args.threads} torch thread(s); "
        f"client threads on loopback, each asking one of {len(QUESTIONS)} questions at a time "
        f"(RAG-Token greedy, the model's k=5) for {args.seconds:g} s per run. Before: "
        f"micro-batching (`--no-continuous-batching`, up to {args.max_batch} questions a batch, "
        f"5 ms wait). After: continuous batching (at most {args.max_running_rows} rows "
        f"decoding). Passage KV cache: {args.passage_cache_mb:g} MiB on both sides. The two "
        "servers ran one after the other, each alone, each warmed up by one question.",
        "",
        "| clients | side | requests | errors | requests/s | p50 latency | p99 latency |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in clients:
        for side in SIDES:
            r = runs[side, c]
            lines.append(f"| {c} | {side} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | "
                         f"{r['p50']:.2f} s | {r['p99']:.2f} s |")
    lines += ["", "After / before, requests/s: " + ", ".join(
        f"{c} clients {ratio(runs['after', c], runs['before', c])}" for c in clients) + "."]
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
