"""Indexing speed: `blipsearch index` end to end against the plain transformers route, same files.

    python benchmarks/bench_index.py                  # 160 photos, both routes, ~5 minutes here
    python benchmarks/bench_index.py --levers         # also what each lever contributes (on a subset)
    python benchmarks/bench_index.py --ray            # also `blipsearch index --ray` on a local Ray instance
    python benchmarks/bench_index.py --int8           # also `--precision int8` (the image tower's linear layers)

Photos (4000x3000 JPEG, quality 90) and a BLIP ViT-B/16 384 px retrieval model with random weights are
generated once under --workdir. Prints images/s of both routes, their ratio, peak memory, and the
fraction of this machine's matmul peak (measured in the same run, in the precision the engine picks on this
CPU: bf16 where it has bf16 units, else fp32; the median of readings before and after our run and after the
baseline's) that indexing reaches.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    DEFAULT_WORKDIR,
    cpu_model,
    engine_precision,
    make_photos,
    matmul_peak_gflops,
    print_json,
    run_measured,
    save_random_blip_base,
    vit_gflops_per_image,
)

CLI = [sys.executable, "-m", "blipsearch.retrieval.cli"]
# Cumulative levers, each a `blipsearch index` run: (name, extra options). All but the last run with the bf16
# attention kernel off (BLIPSEARCH_NATIVE=0; it applies only on CPUs with AVX512-BF16 and no AMX, with a C compiler).
LEVERS = [
    ("own ViT (SDPA), fp32, full decode, no overlap, batch 8",
     ["--precision", "fp32", "--exact-decode", "--workers", "0", "--batch-size", "8"]),
    ("+ the engine's precision (bf16 on CPUs with bf16 units, else fp32 again)",
     ["--exact-decode", "--workers", "0", "--batch-size", "8"]),
    ("+ reduced-scale JPEG decode", ["--workers", "0", "--batch-size", "8"]),
    ("+ decode/encode overlap (2 threads)", ["--batch-size", "8", "--workers", "2"]),
    ("+ batch 16 (the default)", ["--workers", "2"]),
    ("+ the default decoding threads (1 beside a CPU encoder, 2 beside a GPU)", []),
    ("+ the bf16 attention kernel blipsearch builds (`models/native.py`): the default", []),
]
KERNEL_OFF = {"BLIPSEARCH_NATIVE": "0"}


def index_run(photos: Path, model: Path, index: Path, extra: list[str], env: dict | None = None) -> dict:
    shutil.rmtree(index, ignore_errors=True)
    run = run_measured([*CLI, "index", str(photos), "--model", str(model), "--index", str(index), "-q",
                        "--device", "cpu", *extra], env=env)
    match = re.search(r"indexed (\d+), .* in ([\d.]+) s", run["stderr"])
    images, seconds = int(match.group(1)), float(match.group(2))
    result = {"images": images, "pipeline_seconds": seconds, "pipeline_images_per_s": images / seconds,
              "command_seconds": run["seconds"], "command_images_per_s": images / run["seconds"],
              "peak_rss_mb": run["peak_rss_mb"]}
    check = re.search(r"int8 check .*", run["stderr"])  # --precision int8: its check against fp32
    if check:
        result["int8_check"] = check.group(0)
    return result


def baseline_run(photos: Path, model: Path) -> dict:
    run = run_measured([sys.executable, __file__, "--baseline-child", str(photos), "--model", str(model)])
    seconds, images = (float(v) for v in run["stdout"].split())
    return {"images": int(images), "loop_seconds": seconds, "images_per_s": images / seconds,
            "command_seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}


def baseline_child(photos: Path, model: Path, batch: int = 8) -> None:
    """transformers' processor + vision_model + vision_proj, fp32, batch 8: what a plain script does."""
    import torch
    from PIL import Image
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    processor = BlipProcessor.from_pretrained(model)
    retrieval = BlipForImageTextRetrieval.from_pretrained(model).eval()
    paths = sorted(photos.glob("*.jpg"))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[i:i + batch]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            features = retrieval.vision_model(pixel_values=pixels).last_hidden_state
            torch.nn.functional.normalize(retrieval.vision_proj(features[:, 0, :]), dim=-1)
    print(time.perf_counter() - start, len(paths))


def decode_ms_per_photo(photos: list[Path], model: Path, count: int = 16) -> float:
    """One thread: read, reduced-scale decode and resize of one photo to the model's input (what an encoder
    waits for), in ms; the CPU cost a cluster pays per image beside the encoder's."""
    from blipsearch.indexer.images import load_image
    from blipsearch.retrieval.models.preprocessing import read_preprocessing

    pre = read_preprocessing(model, str(model), 384)
    load_image(photos[0], pre, reduced_decode=True)
    start = time.perf_counter()
    for path in photos[:count]:
        load_image(path, pre, reduced_decode=True)
    return 1e3 * (time.perf_counter() - start) / min(count, len(photos))


def subset(photos: list[Path], folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in photos[:count]:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--levers", action="store_true", help="also time each lever on --lever-images photos")
    parser.add_argument("--lever-images", type=int, default=48)
    parser.add_argument("--ray", action="store_true", help="also index with --ray on a local Ray instance")
    parser.add_argument("--int8", action="store_true", help="also index with --precision int8 (its first batch "
                        "checked against fp32, which counts in its time)")
    parser.add_argument("--baseline-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:
        return baseline_child(args.baseline_child, args.model)

    model = save_random_blip_base(args.workdir / "blip-base-random")
    photos = make_photos(args.workdir / "photos", args.images)
    folder = subset(photos, args.workdir / f"photos-{args.images}", args.images)
    precision = engine_precision()
    peaks = [matmul_peak_gflops(precision)]
    ours = index_run(folder, model, args.workdir / "index", [])
    peaks.append(matmul_peak_gflops(precision))  # these machines drift by +-15%: the peak around the run
    baseline = baseline_run(folder, model)
    peaks.append(matmul_peak_gflops(precision))  # a third reading: one low outlier (207 against 413) was seen
    peak = statistics.median(peaks)
    flops = vit_gflops_per_image()
    report = {
        "cpu": cpu_model(), "images": args.images, "peak_precision": precision,
        "matmul_peak_gflops": round(peak),
        "matmul_peak_gflops_before_after_and_after_baseline": [round(p) for p in peaks],
        "vit_gflops_per_image": round(flops, 1),
        "ours": ours, "baseline_transformers_fp32_batch8": baseline,
        "speedup": ours["pipeline_images_per_s"] / baseline["images_per_s"],
        "speedup_whole_command": ours["command_images_per_s"] / baseline["images_per_s"],
        "fraction_of_peak": ours["pipeline_images_per_s"] * flops / peak,
    }
    if args.int8:  # the same photos, the image tower's linear layers in int8; the peak around this run too
        around = [matmul_peak_gflops(precision)]
        report["int8"] = index_run(folder, model, args.workdir / "index-int8", ["--precision", "int8"])
        around.append(matmul_peak_gflops(precision))
        report["int8"]["matmul_peak_gflops_before_and_after"] = [round(p) for p in around]
        report["int8"]["fraction_of_peak"] = report["int8"]["pipeline_images_per_s"] * flops / statistics.mean(around)
        report["int8"]["vs_default"] = report["int8"]["pipeline_images_per_s"] / ours["pipeline_images_per_s"]
    if args.ray:  # the same photos through Ray Data; its start-up counts, as it does for a user
        report["decode_ms_per_photo_one_thread"] = decode_ms_per_photo(photos, model)
        report["ray"] = index_run(folder, model, args.workdir / "index-ray", ["--ray"])
        report["ray_vs_single_process"] = report["ray"]["pipeline_images_per_s"] / ours["pipeline_images_per_s"]
    if args.levers:
        small = subset(photos, args.workdir / f"photos-{args.lever_images}", args.lever_images)
        report["levers"] = {"transformers fp32 batch 8 (baseline)": baseline_run(small, model)["images_per_s"]}
        for i, (name, extra) in enumerate(LEVERS):
            env = None if i == len(LEVERS) - 1 else KERNEL_OFF
            report["levers"][name] = index_run(small, model, args.workdir / "index-lever", extra, env)[
                "pipeline_images_per_s"]
    print_json(report)
    print(f"\nindexing {args.images} photos of 4000x3000: blipsearch {ours['pipeline_images_per_s']:.2f} img/s "
          f"({ours['command_images_per_s']:.2f} counting start-up), transformers fp32 "
          f"{baseline['images_per_s']:.2f} img/s -> {report['speedup']:.1f}x; "
          f"{report['fraction_of_peak']:.0%} of the {precision} matmul peak ({peak:.0f} GFLOP/s, {report['cpu']}); "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB vs {baseline['peak_rss_mb']:.0f} MB")
    if args.int8:
        int8 = report["int8"]
        print(f"--precision int8: {int8['pipeline_images_per_s']:.2f} img/s ({int8['vs_default']:.2f}x the default "
              f"run), {int8['fraction_of_peak']:.0%} of the {precision} peak (FLOPs counted as in fp32; "
              f"{statistics.mean(int8['matmul_peak_gflops_before_and_after']):.0f} GFLOP/s around it); "
              f"peak RSS {int8['peak_rss_mb']:.0f} MB; {int8.get('int8_check', 'no check line printed')}")
    if args.ray:
        print(f"--ray on a local instance: {report['ray']['pipeline_images_per_s']:.2f} img/s "
              f"({report['ray_vs_single_process']:.2f}x the single-process run); decoding a photo takes "
              f"{report['decode_ms_per_photo_one_thread']:.0f} ms of one thread")


if __name__ == "__main__":
    main()
