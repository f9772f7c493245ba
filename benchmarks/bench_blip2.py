"""BLIP-2 speed: indexing and ITM re-ranked text queries with a full-size BLIP-2 retrieval model, each against
transformers' own route on the same inputs, in the same run.

    python benchmarks/bench_blip2.py            # 16 photos, a 2,000-image index: ~4 minutes on 2 cores
    python benchmarks/bench_blip2.py --images 24 --index-images 5000

Made once under --workdir: a `Blip2ForImageTextRetrieval` at transformers' default `Blip2Config` sizes with
random weights (EVA ViT-g/14 at 224 px + Q-Former: ~1.2 B parameters, 4.6 GB fp32; common.save_random_blip2),
photo-like 12 MP JPEGs, and a synthetic index of random ITC vectors (32 x 256) and int8 feature maps
(257 x 1408) per image (the model ~25 s and 5 GB of memory, the index ~1 minute and 0.9 GB of disk).
Speed does not depend on weight or pixel values. Prints (JSON, then one line):

  - the CPU and its matmul peak (in the engine's precision on this CPU: bf16 where it has bf16 units, else
    fp32), measured in this run before indexing and again at the end (on a
    machine shared with other work it shows the contention the figures ran under);
  - indexing: `blipsearch index` in a fresh process against Blip2Processor + `vision_model` + the Q-Former's
    query pass + `vision_projection` in fp32 at batch 8 (what `get_image_features`-style code runs): images/s,
    peak RSS, their ratio, and the fraction of that peak ours reaches on the ViT-g's FLOPs;
  - query: warm p50/p95 of `Searcher.search_text` re-ranking 32 candidates with ITM over stored features, in
    a process that loads no ViT-g weights (checked and printed), and that process's peak RSS; against
    `Blip2ForImageTextRetrieval(..., use_image_text_matching_head=True)` over 32 candidates, which re-runs the
    ViT-g for every pair: timed on --baseline-candidates of them and scaled to 32 (its work is linear in the
    candidates), one query, no warm-up call (a ~30 s call);
  - cold: a fresh `blipsearch query` process, start to printed answer, and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_index import index_run, subset
from bench_query import CANDIDATES, QUERIES, warm_latencies
from common import (
    DEFAULT_WORKDIR,
    build_synthetic_index,
    cpu_model,
    engine_precision,
    make_photos,
    matmul_peak_gflops,
    print_json,
    run_measured,
    save_random_blip2,
    vit_gflops_per_image,
)

FLOPS_FORMULA = ("2 x [(T-1) x 3 p^2 x H  +  L x (4 T H^2 + 2 T^2 H + 2 T H M)]: patch embedding, then per layer "
                 "QKV + output projections, attention scores + mixing, MLP; T tokens, H width, M MLP width, "
                 "L layers, p patch")


def vit_g_flops(model_dir: Path) -> dict:
    """GFLOP per image of the checkpoint's ViT, counted from its config.json."""
    from blipsearch.retrieval.models.blip2_vision import vision_config

    v = vision_config(json.loads((model_dir / "config.json").read_text()))
    gflops = vit_gflops_per_image(tokens=v.tokens, hidden=v.hidden_size, layers=v.num_layers,
                                  mlp=v.intermediate_size, patch_pixels=3 * v.patch_size**2)
    return {"gflops": gflops, "formula": FLOPS_FORMULA,
            "T": v.tokens, "H": v.hidden_size, "M": v.intermediate_size, "L": v.num_layers, "p": v.patch_size}


# --- children: each route runs in a fresh process, so its peak RSS is its own ---------------------------------

def child(mode: str, *options: str) -> dict:
    """Run this file's `mode` child; its JSON answer, with the process's wall time and peak RSS."""
    run = run_measured([sys.executable, __file__, "--child", mode, *options])
    return json.loads(run["stdout"]) | {"command_seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}


def index_baseline_child(photos: Path, model_dir: Path, batch: int = 8) -> dict:
    """transformers' route to what an index keeps, fp32 at batch 8: processor, ViT-g, the 32 query vectors."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    processor = Blip2Processor.from_pretrained(model_dir)
    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir, dtype=torch.float32).eval()
    paths = sorted(photos.glob("*.jpg"))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[i:i + batch]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, 224, 224)
            tokens = model.vision_model(pixel_values=pixels).last_hidden_state  # (B, 257, 1408)
            mask = torch.ones(tokens.shape[:-1], dtype=torch.long)  # as the retrieval forward passes it
            queries = model.qformer(query_embeds=model.query_tokens.expand(len(images), -1, -1),
                                    encoder_hidden_states=tokens, encoder_attention_mask=mask).last_hidden_state
            # queries: (B, 32, 768)
            F.normalize(model.vision_projection(queries), dim=-1)  # (B, 32, 256)
    seconds = time.perf_counter() - start
    return {"images": len(paths), "loop_seconds": seconds, "images_per_s": len(paths) / seconds}


def warm_child(model_dir: Path, index: Path, queries: int) -> dict:
    """bench_query's warm loop over the BLIP-2 index, and a check of what the searcher's model holds."""
    import blipsearch.retrieval.models as models
    from blipsearch.retrieval.device import keep_freed_memory

    keep_freed_memory()  # as the CLI does

    loaded, load = [], models.load_model

    def recording_load(*args, **kwargs):  # bench_query's loop loads its own model: keep a handle on it
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    models.load_model = recording_load
    warm = warm_latencies(model_dir, index, QUERIES[:queries])
    model = loaded[-1]
    parameters = sum(p.numel() for p in model.qformer.parameters())
    return warm | {"queries": queries, "vision_is_none": model.vision is None,
                   "parameters_loaded_millions": parameters / 1e6}


def query_baseline_child(model_dir: Path, candidates: int) -> dict:
    """`Blip2ForImageTextRetrieval` ITM forward of one query against `candidates` images, fp32."""
    import torch
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    side = model.config.vision_config.image_size
    pixels = torch.randn(candidates, 3, side, side, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer([QUERIES[0]] * candidates, truncation=True, max_length=35, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
              use_image_text_matching_head=True)
    seconds = time.perf_counter() - start
    return {"candidates_timed": candidates, "seconds": seconds, "ms_scaled_to_32": 1000 * seconds * 32 / candidates}


CHILDREN = {
    "build": lambda a: {"model": str(save_random_blip2(a.model))},
    "index-baseline": lambda a: index_baseline_child(Path(a.photos), a.model),
    "warm": lambda a: warm_child(a.model, Path(a.index), a.queries),
    "query-baseline": lambda a: query_baseline_child(a.model, a.baseline_candidates),
}


# --- the parent ------------------------------------------------------------------------------------------------

def cold_query(model_dir: Path, index: Path, runs: int) -> dict:
    """A fresh `blipsearch query` process re-ranking 32 candidates: wall seconds and peak RSS."""
    command = [sys.executable, "-m", "blipsearch.retrieval.cli", "query", QUERIES[0], "--index", str(index),
               "--candidates", str(CANDIDATES), "--model", str(model_dir)]
    measured = [run_measured(command) for _ in range(runs)]
    return {"median_s": statistics.median(m["seconds"] for m in measured),
            "runs_s": [m["seconds"] for m in measured], "peak_rss_mb": max(m["peak_rss_mb"] for m in measured)}


def indexing(args: argparse.Namespace, model_dir: Path, peak: float) -> dict:
    photos = make_photos(args.workdir / "photos", args.images)  # 4000x3000 (every 4th 3000x4000), as bench_index
    folder = subset(photos, args.workdir / f"photos-{args.images}", args.images)
    ours = index_run(folder, model_dir, args.workdir / "index-blip2", [])
    baseline = child("index-baseline", "--model", str(model_dir), "--photos", str(folder))
    flops = vit_g_flops(model_dir)
    return {"images": args.images, "vit_g": flops, "ours": ours, "baseline_transformers_fp32_batch8": baseline,
            "speedup": ours["pipeline_images_per_s"] / baseline["images_per_s"],
            "speedup_whole_command": ours["command_images_per_s"] / baseline["images_per_s"],
            "fraction_of_peak": ours["pipeline_images_per_s"] * flops["gflops"] / peak}


def querying(args: argparse.Namespace, model_dir: Path) -> dict:
    index = build_synthetic_index(args.workdir / f"query-index-blip2-{args.index_images}", model_dir,
                                  args.index_images)
    warm = child("warm", "--model", str(model_dir), "--index", str(index), "--queries", str(args.queries))
    baseline = child("query-baseline", "--model", str(model_dir), "--baseline-candidates",
                     str(args.baseline_candidates))
    return {"index_images": args.index_images, "candidates": CANDIDATES, "warm": warm,
            "baseline_transformers_fp32": baseline, "speedup_p50": baseline["ms_scaled_to_32"] / warm["p50_ms"],
            "cold": cold_query(model_dir, index, args.cold_runs)}


def summary(report: dict) -> str:
    i, q = report["indexing"], report["query"]
    ours, base, warm, cold = i["ours"], i["baseline_transformers_fp32_batch8"], q["warm"], q["cold"]
    return (f"BLIP-2 ViT-g on {report['cpu']}, "
            f"{report['peak_precision']} peak {report['matmul_peak_gflops']:.0f} GFLOP/s: "
            f"indexing {i['images']} photos {ours['pipeline_images_per_s']:.2f} img/s vs transformers fp32 "
            f"{base['images_per_s']:.2f} -> {i['speedup']:.1f}x ({i['fraction_of_peak']:.0%} of peak; "
            f"peak RSS {ours['peak_rss_mb']:.0f} vs {base['peak_rss_mb']:.0f} MB); query re-ranking {q['candidates']} "
            f"of {q['index_images']}: warm p50 {warm['p50_ms']:.0f} ms, p95 {warm['p95_ms']:.0f} ms "
            f"(RSS {warm['peak_rss_mb']:.0f} MB, ViT-g loaded: {not warm['vision_is_none']}) vs transformers "
            f"{q['baseline_transformers_fp32']['ms_scaled_to_32'] / 1000:.0f} s -> {q['speedup_p50']:.0f}x; "
            f"cold process {cold['median_s']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="photos to index (~1 s each, ~3 s for transformers)")
    parser.add_argument("--index-images", type=int, default=2000, help="images in the synthetic query index")
    parser.add_argument("--queries", type=int, default=10, help="timed warm queries (after 3 warm-up ones)")
    parser.add_argument("--baseline-candidates", type=int, default=8,
                        help="candidates transformers' ITM forward is timed on (scaled to 32)")
    parser.add_argument("--cold-runs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--photos", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return print(json.dumps(CHILDREN[args.child](args)))

    model_dir = args.workdir / "blip2-vitg-random"
    build = child("build", "--model", str(model_dir))  # once; in a child, so the fp32 model's memory goes back
    precision = engine_precision()
    peak = matmul_peak_gflops(precision)
    report = {"cpu": cpu_model(), "peak_precision": precision, "matmul_peak_gflops": peak, "model": model_dir.name,
              "model_build_seconds": build["command_seconds"], "indexing": indexing(args, model_dir, peak)}
    report["query"] = querying(args, model_dir)
    report["matmul_peak_gflops_at_end"] = matmul_peak_gflops(precision)
    print_json(report)
    print("\n" + summary(report))


if __name__ == "__main__":
    main()
