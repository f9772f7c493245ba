"""Query speed: a text query with ITM re-rank of 32 candidates over a 10,000-image index.

    python benchmarks/bench_query.py            # ~3 minutes here once the index exists (~2 minutes to build)

The index holds synthetic stored features (random vectors and int8 feature maps of the real size:
577 x 768 per image), made once under --workdir; the model is BLIP ViT-B/16 384 px + BERT-base with
random weights (speed does not depend on weight values). Prints, for the same 32 candidates:
  - warm: p50/p95 latency of `Index.search` (the library API) in a process that has the model loaded;
  - baseline: transformers' `BlipForImageTextRetrieval(input_ids, pixel_values, use_itm_head=True)`;
  - itm: the ITM pass alone (32 stored feature maps, one query), p50/p95, and the fraction of this
    machine's matmul peak (measured in the same run, in the precision the engine picks on this CPU: bf16
    where it has bf16 units, else fp32) that the FLOPs it executes reach;
  - cold: a fresh `blipsearch query` process, from start to printed answer, with this model and with the
    committed demo model over the README's 60-picture demo folder (7 runs each: the median, every run, and
    how many met the speed issue's 1.5 s). A fresh query's BLIP text side runs in fp32 numpy (no torch) on x86
    Linux CPUs, with bf16 units or not (`device.numpy_text_side(one_shot=True)`); where warm processes compute in
    bf16 (through torch), also the same query with `--precision bf16`, the torch route it replaced.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    DEFAULT_WORKDIR,
    build_synthetic_index,
    cpu_model,
    engine_precision,
    made_for,
    mark_made,
    matmul_peak_gflops,
    print_json,
    run_measured,
    save_random_blip_base,
)

QUERIES = [
    "a dog on a beach", "two children building a sandcastle near the sea", "a red car parked on a city street",
    "a man riding a horse in a field", "a cat sitting on a sofa", "a plate of food on a table",
    "people walking in the snow", "a bird flying over the lake", "a group of friends playing a game",
    "a white boat on the river at sunset", "a woman holding an umbrella in the rain", "a tall tree in the park",
    "a train at the station", "a kitchen with a large table", "a boy playing with a ball",
    "an elephant standing in the grass", "a sunny day at the beach with many people", "a pizza on a plate",
    "a girl riding a bike on the road", "two dogs running across a field", "a bus on a city street at night",
    "a couple sitting on a bench", "a laptop on a table", "a giraffe eating from a tree",
    "a baby sleeping in a bed", "a man surfing a large wave", "snow on the mountain under a blue sky",
    "a family eating dinner", "a kite flying in the sky", "a small house near the lake",
]
CANDIDATES = 32
COLD_TARGET_S = 1.5  # the speed issue's line for a fresh query process, start to printed answer


def warm_latencies(model_dir: Path, index: Path, queries: list[str]) -> dict:
    """Per-query wall time in a process that has loaded the model, with a breakdown by stage."""
    from blipsearch.retrieval.api import Index, Options

    opened = Index.open(index, str(model_dir), device="cpu", with_vision=False)
    stages = {"recall": 0.0, "features": 0.0}
    timed = Index(opened.location, opened.model, _Timed(opened.reader, stages))
    options = Options(top=10, candidates=CANDIDATES)
    for query in queries[:3]:  # first touches: page cache, oneDNN kernels
        timed.search(query, options)
    stages.update(recall=0.0, features=0.0)
    times = []
    for query in queries:
        start = time.perf_counter()
        timed.search(query, options)
        times.append(time.perf_counter() - start)
    model = opened.model
    total = sum(times)
    return {"p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * float(np.percentile(times, 95)),
            "mean_ms": 1000 * total / len(times), "dtype": str(model.dtype).replace("torch.", ""),
            "runtime": type(model).__name__,
            "share_recall": stages["recall"] / total, "share_feature_fetch": stages["features"] / total,
            "share_text_encode_and_itm": 1 - (stages["recall"] + stages["features"]) / total}


def itm_gflops(config, text_tokens: int, image_tokens: int, candidates: int, first_layer_runs: int | None = None
               ) -> float:
    """FLOPs (multiply-adds x 2) of the text tower's ITM pass as it runs (`blip_text.BlipTextTower`): every
    layer's self-attention keys/values over all L tokens; queries, cross-attention and feed-forward over L
    rows, the last layer over [ENC] alone; the cross-attention folded (queries move into image space, no
    image K/V). `config` is a `TextTowerConfig`. `first_layer_runs`: the numpy text side runs the first
    layer's self-attention (before any image is seen) for one query text once per thread of its pass
    (`blip_text_numpy.threads_for`), not once per candidate."""
    h, hv, t, n = config.hidden_size, config.image_hidden_size, image_tokens, text_tokens
    def self_attention(keys: int) -> float:  # per query row: query + output projections, scores + mixing
        return 2 * h * h * 2 + 2 * 2 * keys * h
    def per_row(keys: int) -> float:
        cross = 2 * h * h * 2 + 2 * h * hv * 2 + 2 * 2 * config.num_heads * t * hv  # q, o; fold in/out; scores, mix
        return self_attention(keys) + cross + 2 * 2 * h * config.intermediate_size
    keys_values = n * 2 * h * h * 2  # per layer
    total = candidates * (config.num_layers * keys_values + (config.num_layers - 1) * n * per_row(n) + per_row(n))
    if first_layer_runs is not None:
        total -= (candidates - first_layer_runs) * (keys_values + n * self_attention(n))
    return total / 1e9


def stored_features() -> np.ndarray:
    """32 stored feature maps (random int8 values, as stored), as the reader hands them to the model: float32."""
    stored = np.random.default_rng(0).integers(-127, 128, (CANDIDATES, 577, 768), dtype=np.int8)
    return stored.astype(np.float32) * np.float32(0.05)


def itm_latencies(model_dir: Path, queries: list[str], repeats: int = 3, torch_runtime: bool = False) -> dict:
    """The ITM pass alone: each query against 32 stored feature maps (random int8 values, as stored),
    in the engine's precision and runtime (fp32 text queries: the numpy text side; `torch_runtime`: the torch
    adapter instead); p50/p95 over queries of the median of `repeats`, and GFLOP/s against the same-run
    matmul peak in that precision (the median of samples taken before, between and after)."""
    import torch

    from blipsearch.retrieval.models import load_model
    from blipsearch.retrieval.models.blip_numpy import BlipNumpyTextModel
    from blipsearch.retrieval.models.blip_text_numpy import threads_for

    precision = engine_precision()
    model = load_model(str(model_dir), torch.device("cpu") if torch_runtime else "cpu", precision, with_vision=False)
    numpy_side = isinstance(model, BlipNumpyTextModel)
    features = stored_features()
    if isinstance(model.dtype, torch.dtype):
        features = torch.from_numpy(features).to(model.dtype)
    peaks = [matmul_peak_gflops(precision)]  # again every 10 queries: these machines drift by +-15%
    times, flops = [], []
    with torch.inference_mode():
        for i, query in enumerate(queries):
            if i and i % 10 == 0:
                peaks.append(matmul_peak_gflops(precision))
            tokens = model.tokenize([query])
            model.itm_scores(tokens, features)  # first touch of this length's kernels
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                model.itm_scores(tokens, features)
                runs.append(time.perf_counter() - start)
            times.append(statistics.median(runs))
            flops.append(itm_gflops(model.text.config, int(tokens.attention_mask.sum()), 577, CANDIDATES,
                                    first_layer_runs=threads_for(CANDIDATES) if numpy_side else None))
    peaks.append(matmul_peak_gflops(precision))
    peak = statistics.median(peaks)
    rates = [f / s for f, s in zip(flops, times, strict=True)]
    return {"p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * float(np.percentile(times, 95)),
            "gflop_per_pass_median": statistics.median(flops), "gflops_per_s_median": statistics.median(rates),
            "runtime": type(model).__name__, "peak_precision": precision, "matmul_peak_gflops": peak,
            "matmul_peak_samples": [round(p) for p in peaks],
            "fraction_of_peak": statistics.median(rates) / peak}


class _Timed:
    """A store that adds up the time spent in recall and in fetching features (the rest passes through)."""

    def __init__(self, store, stages: dict):
        self.store, self.stages = store, stages

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def recall(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.store.recall(*args, **kwargs)
        finally:
            self.stages["recall"] += time.perf_counter() - start

    def token_features(self, keys):
        start = time.perf_counter()
        try:
            return self.store.token_features(keys)
        finally:
            self.stages["features"] += time.perf_counter() - start


def baseline_latencies(model_dir: Path, queries: list[str]) -> dict:
    """transformers' retrieval forward over 32 candidates: it re-runs the vision tower for every pair."""
    import torch
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pixels = torch.randn(CANDIDATES, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for query in queries:
            tokens = tokenizer([query] * CANDIDATES, return_tensors="pt")
            start = time.perf_counter()
            model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                  use_itm_head=True)
            times.append(time.perf_counter() - start)
    return {"p50_ms": 1000 * statistics.median(times), "queries": len(times)}


def itm_levers(model_dir: Path, repeats: int = 5) -> dict:
    """ITM of one query over 32 stored feature maps, lever by lever (ms, median of `repeats`)."""
    import torch
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    from blipsearch.retrieval.models import load_model

    features = torch.randn(CANDIDATES, 577, 768, generator=torch.Generator().manual_seed(0))
    reference = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    tokens = AutoTokenizer.from_pretrained(model_dir)([QUERIES[0]] * CANDIDATES, return_tensors="pt")
    mask = torch.ones(CANDIDATES, 577, dtype=torch.long)

    def plain(dtype):
        encoder, head = reference.text_encoder.to(dtype), reference.itm_head.to(dtype)
        x = features.to(dtype)
        return lambda: head(encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                    encoder_hidden_states=x, encoder_attention_mask=mask).last_hidden_state[:, 0])

    def ours(precision):
        model = load_model(str(model_dir), "cpu", precision, with_vision=False)  # fp32: the numpy text side
        single = model.tokenize([QUERIES[0]])
        return lambda: model.itm_scores(single, features)

    levers = {"transformers text encoder over stored features, fp32": lambda: plain(torch.float32),
              "+ bf16": lambda: plain(torch.bfloat16),
              "our text side (folded cross-attention, last layer at [ENC] only), fp32 (numpy)": lambda: ours("fp32"),
              "+ bf16 (the default on CPUs with bf16 units)": lambda: ours("bf16")}
    if engine_precision() != "bf16":  # emulated bf16 runs at 0.3-1.2 GFLOP/s: minutes per lever, and never the default
        levers = {name: build for name, build in levers.items() if "bf16" not in name}
    return {name: _median_ms(build(), repeats) for name, build in levers.items()}  # one at a time


def itm_matmuls_alone(model_dir: Path, queries: list[str]) -> dict:
    """`itm_latencies` of the numpy text side with its element-wise steps (softmax, GELU, layer norms) made
    free: what the pass's matrix products alone reach, at its shapes and in its threads. A ceiling for the
    pass's fraction of the peak with this BLAS. The scores it computes are meaningless: unnormalised, its
    values overflow to inf and NaN, which the CPU's vector units multiply at full speed."""
    import warnings
    from unittest import mock

    from blipsearch.retrieval.models import blip_text_numpy

    with mock.patch.multiple(blip_text_numpy, _softmax=lambda x: None, _gelu=lambda x: None,
                             _layer_norm=lambda x, *args: x), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # from the pass's threads too (numpy's errstate is per thread)
        return itm_latencies(model_dir, queries)


def _median_ms(run, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def cold_latencies(model_dir: Path, index: Path, runs: int, query: str = QUERIES[0],
                   precision: str | None = None, device: str | None = None) -> dict:
    """A fresh `blipsearch query` process `runs` times: the median, every run, and how many met the line."""
    byte_compile_engine()
    command = [sys.executable, "-m", "blipsearch.retrieval.cli", "query", query, "--index", str(index),
               "--candidates", str(CANDIDATES), "--model", str(model_dir)]
    command += ["--precision", precision] if precision else []
    command += ["--device", device] if device else []
    seconds = [run_measured(command)["seconds"] for _ in range(runs)]
    return {"median_s": statistics.median(seconds), "runs_s": seconds,
            "runs_within_target": sum(s <= COLD_TARGET_S for s in seconds)}


def byte_compile_engine() -> None:
    """Byte-compile the engine's modules, as any run after the first leaves them (or a non-editable `pip
    install`): a source checkout run with PYTHONDONTWRITEBYTECODE set (as on our build machines), or edited
    since its last run, compiles the modules it imports afresh in every process (~0.1 s of a fresh full-size
    query here)."""
    import compileall

    import blipsearch.indexer
    import blipsearch.retrieval

    for package in (blipsearch.retrieval, blipsearch.indexer):
        for folder in package.__path__:
            if not compileall.compile_dir(folder, quiet=1):
                print(f"warning: could not byte-compile {folder}: the fresh-process figures include compiling",
                      file=sys.stderr)


def demo_index(workdir: Path) -> Path:
    """The README's demo: 60 scene pictures indexed with the committed demo model and captioner (made once
    per demo model revision); its queries are then hybrid, as the README's are."""
    from blipsearch.retrieval.models import load_model

    photos, index = workdir / "demo-photos", workdir / "demo-index"
    revision = load_model(str(DEMO_MODEL), "cpu", "fp32", with_vision=False).info.revision + " captioned"
    if not made_for(index, revision):
        scenes = str(Path(__file__).parent / "scenes.py")
        subprocess.run([sys.executable, scenes, "demo-folder", str(photos)], check=True)
        subprocess.run([sys.executable, "-m", "blipsearch.retrieval.cli", "index", str(photos), "--model",
                        str(DEMO_MODEL), "--captioner", str(DEMO_CAPTIONER), "--index", str(index), "--rebuild", "-q"],
                       check=True)
        mark_made(index, revision)
    return index


DEMO_MODEL = Path(__file__).resolve().parent.parent / "training" / "demo_model"
DEMO_CAPTIONER = DEMO_MODEL.parent / "demo_captioner"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--baseline-queries", type=int, default=3)
    parser.add_argument("--cold-runs", type=int, default=7,
                        help="fresh query processes per model (the machines' noise moves single runs by +-20%%)")
    parser.add_argument("--levers", action="store_true",
                        help="also time the ITM pass lever by lever, and its matrix products alone")
    args = parser.parse_args()

    from blipsearch.retrieval.device import keep_freed_memory

    keep_freed_memory()  # as the CLI does, `serve` included: the in-process figures below are the CLI's
    model = save_random_blip_base(args.workdir / "blip-base-random")
    index = build_synthetic_index(args.workdir / f"query-index-{args.images}", model, args.images)
    warm = warm_latencies(model, index, QUERIES)
    baseline = baseline_latencies(model, QUERIES[:args.baseline_queries])
    itm = itm_latencies(model, QUERIES)
    if itm["runtime"] != "BlipRetrievalModel":  # the numpy text side: the torch adapter's pass beside it
        report_torch = itm_latencies(model, QUERIES[:10], torch_runtime=True)
    cold = cold_latencies(model, index, args.cold_runs)
    demo = cold_latencies(DEMO_MODEL, demo_index(args.workdir), args.cold_runs,
                          "a large red circle left of a large blue square")
    cold |= {"demo_median_s": demo["median_s"], "demo_runs_s": demo["runs_s"]}
    if itm["peak_precision"] == "bf16":  # warm processes compute in bf16 here, through torch: that route too
        cold["bf16_torch_route"] = cold_latencies(model, index, args.cold_runs, precision="bf16", device="cpu")
    cold["matmul_peak_gflops"] = matmul_peak_gflops(itm["peak_precision"])
    report = {"cpu": cpu_model(), "images": args.images, "candidates": CANDIDATES, "warm": warm, "itm": itm,
              "baseline_transformers": baseline, "speedup_p50": baseline["p50_ms"] / warm["p50_ms"], "cold": cold}
    if itm["runtime"] != "BlipRetrievalModel":
        report["itm_torch_adapter_first_10_queries"] = report_torch
    if args.levers:
        report["itm_levers_ms"] = itm_levers(model)
        if itm["runtime"] != "BlipRetrievalModel":
            report["itm_matmuls_alone_first_10_queries"] = itm_matmuls_alone(model, QUERIES[:10])
    print_json(report)
    print(f"\nquery with ITM re-rank of {CANDIDATES} over {args.images} images: warm p50 {warm['p50_ms']:.0f} ms, "
          f"p95 {warm['p95_ms']:.0f} ms; transformers {baseline['p50_ms']:.0f} ms -> "
          f"{report['speedup_p50']:.0f}x; ITM pass p50 {itm['p50_ms']:.0f} ms, p95 {itm['p95_ms']:.0f} ms, "
          f"{itm['fraction_of_peak']:.0%} of the {itm['peak_precision']} peak "
          f"({itm['matmul_peak_gflops']:.0f} GFLOP/s in this run, {report['cpu']}); "
          f"cold process {cold['median_s']:.2f} s, {cold['runs_within_target']} of {args.cold_runs} runs within "
          f"{COLD_TARGET_S} s (demo model {cold['demo_median_s']:.2f} s)")


if __name__ == "__main__":
    main()
