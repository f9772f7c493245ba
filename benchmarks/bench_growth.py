"""How cost grows with the collection on one machine: first run, re-scan of an unchanged tree, an
incremental run (1% new files, 1% deleted), snapshot build, and a query (fresh process and warm), at each
size, with a tiny random BLIP model (32 px, 32 wide) so that encoding costs little and the engine's own
bookkeeping shows.

    python benchmarks/bench_growth.py --sizes 10000 100000     # ~10 minutes here; files under --workdir

Files are distinct 32x32 PNGs (~3 KB each) in folders of 1,000. Prints one table row per size and the
CPU with its matmul peak (in the engine's precision on this CPU) measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from common import DEFAULT_WORKDIR, cpu_model, engine_precision, matmul_peak_gflops, print_json, run_measured

CLI = [sys.executable, "-m", "blipsearch.retrieval.cli"]


def make_files(folder: Path, count: int, start: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        path = folder / f"d{i // 1000:04d}" / f"img{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, compress_level=0)


def index(folder: Path, location: Path, model: Path) -> float:
    done = run_measured([*CLI, "index", str(folder), "--model", str(model), "--index", str(location), "-q",
                         "--device", "cpu", "--batch-size", "256"])
    return done["seconds"]


def snapshot_seconds(location: Path) -> float:
    """Building and writing the snapshot from the tables, as the end of every changing run does."""
    import lancedb

    from blipsearch.indexer import snapshot
    from blipsearch.indexer.layout import FILES, IMAGES, read_index_manifest

    manifest = read_index_manifest(location)
    db = lancedb.connect(str(location))
    start = time.perf_counter()
    view = snapshot.from_tables(db.open_table(IMAGES), db.open_table(FILES), manifest.identity)
    view.save(location, manifest.run.generation, manifest.identity.model_id)
    return time.perf_counter() - start


def query_seconds(location: Path, model: Path) -> tuple[float, float]:
    """(fresh `blipsearch query` process, warm `Index.search` p50) for a text query with ITM re-rank."""
    from blipsearch.retrieval.api import Index, Options

    cold = run_measured([*CLI, "query", "a red dog", "--index", str(location), "--device", "cpu", "--json"])["seconds"]
    opened = Index.open(location, device="cpu", with_vision=False)
    times = []
    for i in range(12):
        start = time.perf_counter()
        opened.search(f"a red dog {i}", Options(top=10, candidates=64))
        times.append(time.perf_counter() - start)
    return cold, statistics.median(times[2:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "growth")
    args = parser.parse_args(argv)

    from tiny import save_tiny_blip

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "tiny-model"
    if not (model / "config.json").exists():
        save_tiny_blip(model)
    peak = matmul_peak_gflops()
    rows = []
    for size in args.sizes:
        folder, location = args.workdir / f"files-{size}", args.workdir / f"index-{size}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(location, ignore_errors=True)
        make_files(folder, size)
        first = index(folder, location, model)
        rescan = index(folder, location, model)
        step = max(1, size // 100)
        make_files(folder, step, start=size)  # 1% new
        for path in sorted(folder.rglob("*.png"))[:step]:  # 1% deleted
            path.unlink()
        incremental = index(folder, location, model)
        build = snapshot_seconds(location)
        cold, warm = query_seconds(location, model)
        rows.append({"files": size, "first_run_s": round(first, 1), "images_per_s": round(size / first),
                     "rescan_unchanged_s": round(rescan, 2), "incremental_1pct_s": round(incremental, 2),
                     "snapshot_build_s": round(build, 2), "query_fresh_process_s": round(cold, 2),
                     "query_warm_p50_ms": round(1000 * warm, 1)})
        print_json(rows[-1])
    print_json({"cpu": cpu_model(), "peak_precision": engine_precision(), "matmul_peak_gflops": round(peak),
                "rows": rows})


if __name__ == "__main__":
    main()
