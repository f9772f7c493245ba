"""Load on `blipsearch serve`: N concurrent clients on loopback, p50/p95 latency and errors per level.

    python benchmarks/bench_serve.py                      # the demo index (demo model, 60 scenes), 1/4/16 clients
    python benchmarks/bench_serve.py --index PATH --seconds 20

Starts the server in a subprocess on 127.0.0.1 (never another host), then for each client count runs that
many threads, each with its own keep-alive connection, sending text queries (ITM re-rank of 64 candidates)
back to back for --seconds (at most --max-requests each). The server runs one query at a time (one model),
so latency grows with the clients while throughput stays flat: the figures show the queueing. Prints the CPU
and the matmul peak (in the engine's precision on this CPU) measured in the same run (before the server starts).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_WORKDIR, cpu_model, engine_precision, matmul_peak_gflops, print_json

ROOT = Path(__file__).parents[1]
CLI = [sys.executable, "-m", "blipsearch.retrieval.cli"]
QUERIES = ["a large red circle left of a large blue square", "a small green triangle above a yellow diamond",
           "a blue square", "two purple circles", "an orange diamond right of a red triangle",
           "a large yellow circle below a small blue square"]
MAX_CLIENTS, MAX_SECONDS = 64, 120


def demo_index(workdir: Path) -> Path:
    """The README's demo: the scene folder indexed with the committed demo model (made once)."""
    folder, index = workdir / "serve-demo" / "photos", workdir / "serve-demo" / "index"
    if not (index / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scenes.py"), "demo-folder", str(folder)], check=True)
        subprocess.run([*CLI, "index", str(folder), "--index", str(index), "--model", str(ROOT / "training" /
                        "demo_model"), "-q"], check=True)
    return index


def start_server(index: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([*CLI, "serve", "--index", str(index), "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"blipsearch serve exited: {process.stderr.read()[-2000:]}")
        try:
            if _get(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "/api/status")[0] == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError("blipsearch serve did not start within 120 s")


def _get(connection: http.client.HTTPConnection, url: str) -> tuple[int, bytes]:
    connection.request("GET", url)
    response = connection.getresponse()
    return response.status, response.read()


def client(port: int, seconds: float, max_requests: int, offset: int, out: list, errors: list) -> None:
    """One client: its own connection, queries back to back until the time or the request budget is spent."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    deadline = time.monotonic() + seconds
    for i in range(max_requests):
        if time.monotonic() >= deadline:
            break
        url = "/api/search?" + urllib.parse.urlencode({"q": QUERIES[(offset + i) % len(QUERIES)], "top": 20})
        start = time.perf_counter()
        try:
            status, body = _get(connection, url)
            ok = status == 200 and "results" in json.loads(body)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            ok, status = False, repr(exc)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        out.append(time.perf_counter() - start)
        if not ok:
            errors.append(status)


def level(port: int, clients: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors: list = []
    threads = [threading.Thread(target=client, args=(port, seconds, max_requests, i, latencies, errors))
               for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "errors": len(errors),
            "p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * float(np.percentile(latencies, 95)),
            "throughput_rps": len(latencies) / wall}


def library_latency(index: Path, rounds: int = 5) -> float:
    """Median ms of the same text queries through the library API in this process, warm: what a served query
    costs without HTTP (the server's one-client p50 is compared with it)."""
    from blipsearch.retrieval.api import Index, Options
    from blipsearch.retrieval.device import keep_freed_memory

    keep_freed_memory()  # as `blipsearch serve` does
    opened, options = Index.open(index, with_vision=False), Options(top=20)  # as the clients ask
    for text in QUERIES:  # warm up
        opened.search(text, options)
    times = []
    for _ in range(rounds):
        for text in QUERIES:
            start = time.perf_counter()
            opened.search(text, options)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=None, help="an existing index (default: the demo one)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=10, help="per client count")
    parser.add_argument("--max-requests", type=int, default=500, help="per client, per count")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if not all(1 <= c <= MAX_CLIENTS for c in counts) or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"clients must lie in 1..{MAX_CLIENTS} and seconds in (0, {MAX_SECONDS}]")

    index = args.index or demo_index(args.workdir)
    report = {"cpu": cpu_model(), "peak_precision": engine_precision(), "matmul_peak_gflops": matmul_peak_gflops(),
              "index": str(index),
              "library_p50_ms": library_latency(index)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(index, port)
    try:
        level(port, 1, MAX_SECONDS, len(QUERIES))  # warm up: kernels, page cache
        report["levels"] = [level(port, c, args.seconds, args.max_requests) for c in counts]
    finally:
        server.terminate()
        server.wait(timeout=30)
    print_json(report)
    for row in report["levels"]:
        print(f"{row['clients']:>3} clients: p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, "
              f"{row['throughput_rps']:.1f} req/s, {row['errors']} errors of {row['requests']}")
    one = next((row for row in report["levels"] if row["clients"] == 1), None)
    if one:
        print(f"library API in process, warm: p50 {report['library_p50_ms']:.0f} ms; served to one client: "
              f"{one['p50_ms'] / report['library_p50_ms']:.2f}x that")
    print(f"CPU {report['cpu']}, {report['peak_precision']} peak {report['matmul_peak_gflops']:.0f} GFLOP/s (this run)")
    if any(row["errors"] for row in report["levels"]):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
