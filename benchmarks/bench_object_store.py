"""The ITM feature store on object storage against the same store in a local folder.

Writes BLIP-base feature records (577 x 768, int8 with per-channel scales: 446 KB each) in segments of
`--batch` records, once as local segment files and once as segment objects under an S3-compatible prefix,
then reads the candidates of `--queries` queries (`--candidates` random records each) as a query's re-rank
does: memory-mapped locally, as parallel ranged GETs from the objects. Prints write MB/s and the p50/p95 of
a query's feature read for both, and the matmul peak (in the engine's precision on this CPU) measured in the same run.

By default the prefix is on a moto server this script starts on localhost: that measures the client and
the request path, not a network. Point it at a real bucket with `--index s3://bucket/prefix` (AWS_* from the
environment); the prefix is deleted afterwards.

    python benchmarks/bench_object_store.py [--records 512] [--batch 64] [--candidates 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_model, engine_precision, matmul_peak_gflops, print_json


def start_moto() -> subprocess.Popen:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ALLOW_HTTP="true")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def measure(segments, records: list[bytes], batch: int, queries: int, candidates: int, seed: int) -> dict:
    start = time.perf_counter()
    for number, first in enumerate(range(0, len(records), batch), 1):
        segments.append(number, records[first:first + batch])
    write_s = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(queries):
        picks = rng.choice(len(records), candidates, replace=False)
        places = [(int(i) // batch + 1, int(i) % batch) for i in picks]
        start = time.perf_counter()
        got = [bytes(record) for record in segments.read_many(places)]  # in memory, as the re-rank needs them
        times.append(time.perf_counter() - start)
        assert all(g == records[i] for g, i in zip(got, picks, strict=True))
    mb = len(records) * len(records[0]) / 1e6
    return {"write_mb_per_s": round(mb / write_s, 1), "query_read_p50_ms": round(1e3 * float(np.median(times)), 1),
            "query_read_p95_ms": round(1e3 * float(np.percentile(times, 95)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="records per segment (the --ray batch)")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--index", default=None, help="s3://bucket/prefix (default: a local moto server)")
    args = parser.parse_args()

    from blipsearch.indexer import codec
    from blipsearch.indexer.features import FeatureSegments, ObjectSegments
    from blipsearch.indexer.location import ObjectPrefix

    peak = matmul_peak_gflops()
    server = None if args.index else start_moto()
    remote = ObjectPrefix(args.index or "s3://bench/index")
    size = codec.packed_bytes(577, 768)
    rng = np.random.default_rng(0)
    records = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(args.records)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = measure(FeatureSegments(Path(tmp), size), records, args.batch, args.queries, args.candidates, 1)
        objects = measure(ObjectSegments(remote, size), records, args.batch, args.queries, args.candidates, 1)
    finally:
        remote.remove("features")
        if server is not None:
            server.terminate()
    report = {"cpu": cpu_model(), "peak_precision": engine_precision(), "matmul_peak_gflops": round(peak),
              "record_bytes": size,
              "records": args.records, "records_per_segment": args.batch, "candidates": args.candidates,
              "store": "moto on localhost" if server else args.index, "local_folder": local, "object_storage": objects}
    print_json(report)
    print(f"feature read of {args.candidates} candidates: local p50 {local['query_read_p50_ms']} ms, object storage "
          f"({report['store']}) p50 {objects['query_read_p50_ms']} ms; writes {local['write_mb_per_s']} vs "
          f"{objects['write_mb_per_s']} MB/s; {report['peak_precision']} peak {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
