"""The model-bound figures on an accelerator: image encoding and the ITM re-rank pass, against the same-run
matmul peak of the card in the engine's precision there.

    python benchmarks/bench_gpu.py                       # CUDA; ~2 minutes on an H100 with the model made
    python benchmarks/bench_gpu.py --device cpu --images 16 --batch 8 --queries 3   # a dry run of the script

Why not bench_index.py / bench_query.py there: they build a LanceDB index, and the GPU machines this project
is lent have no LanceDB (its wheel, 75 MB, is more than one call to such a machine carries). This script
needs torch, transformers, numpy and the engine's model code, nothing of the store. The model is BLIP ViT-B/16
at 384 px + BERT-base (the shape of `Salesforce/blip-itm-base-coco`) with random weights, as in the CPU
benchmarks. Prints, with `--device auto`'s precision (bf16 on cards that have it, else fp16):
  - encoder: images/s of `encode_images` (ITC embeddings + the token features the index stores, both back
    on the CPU, where the indexer packs them) over random pixels handed over from the CPU, as the indexer
    hands decoded batches, and the fraction of the peak;
  - baseline: transformers' `vision_model` + `vision_proj` on the same pixels and batch, same precision;
  - itm: the ITM pass of one query over 32 stored feature maps (float32 from the CPU, as the reader hands
    them), p50/p95 over the queries of bench_query.py, and its fraction of the peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_query import CANDIDATES, QUERIES, itm_gflops, stored_features
from common import DEFAULT_WORKDIR, print_json, save_random_blip_base, vit_gflops_per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--images", type=int, default=1024, help="images timed (after one warm-up batch)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (the GPU default of index)")
    parser.add_argument("--queries", type=int, default=len(QUERIES))
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()

    import torch

    from blipsearch.retrieval.models import load_model

    model_dir = save_random_blip_base(args.workdir / "blip-base-random")
    model = load_model(str(model_dir), args.device, args.precision)
    device, dtype = torch.device(model.device), model.dtype
    report = {"device": describe(device), "dtype": str(dtype).removeprefix("torch."), "batch": args.batch}
    peaks = [peak_tflops(device, dtype)]
    pixels = torch.randn(args.batch, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    report["encoder"] = encoder_rate(lambda: model.encode_images(pixels).features.cpu(), device, args.images,
                                     args.batch)
    peaks.append(peak_tflops(device, dtype))
    report["baseline_transformers"] = encoder_rate(transformers_encoder(model_dir, device, dtype, pixels), device,
                                                   args.images, args.batch)
    report["itm"] = itm_latencies(model, QUERIES[:args.queries], device)
    peaks.append(peak_tflops(device, dtype))
    peak = statistics.median(peaks)
    report |= {"matmul_peak_tflops": peak, "matmul_peak_samples": [round(p, 1) for p in peaks]}
    report["encoder"]["fraction_of_peak"] = report["encoder"]["images_per_s"] * vit_gflops_per_image() / 1e3 / peak
    report["itm"]["fraction_of_peak"] = report["itm"]["tflops_per_s_median"] / peak
    report["encoder_speedup"] = report["encoder"]["images_per_s"] / report["baseline_transformers"]["images_per_s"]
    print_json(report)
    print(f"\n{report['device']}, {report['dtype']}: encoder {report['encoder']['images_per_s']:.0f} images/s "
          f"({report['encoder']['fraction_of_peak']:.0%} of the {peak:.3g} TFLOP/s matmul peak; transformers "
          f"{report['baseline_transformers']['images_per_s']:.0f} images/s, {report['encoder_speedup']:.1f}x); "
          f"ITM pass over {CANDIDATES} candidates p50 {report['itm']['p50_ms']:.1f} ms, "
          f"p95 {report['itm']['p95_ms']:.1f} ms ({report['itm']['fraction_of_peak']:.0%})")


def describe(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from common import cpu_model

    return cpu_model()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device, dtype, n: int = 8192, repeats: int = 10) -> float:
    """The best of three timings of `repeats` n x n products in `dtype` on `device`, after a warm-up; on the
    CPU (a dry run), benchmarks/common.py's peak, as the CPU benchmarks take it."""
    import torch

    if device.type == "cpu":
        from common import matmul_peak_gflops

        return matmul_peak_gflops({torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]) / 1e3
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
    return best


def encoder_rate(encode, device, images: int, batch: int) -> dict:
    """images/s of `encode()` (one batch per call) over `images` images after one warm-up batch."""
    encode()
    synchronize(device)
    batches = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(batches):
        encode()
    synchronize(device)
    return {"images_per_s": batches * batch / (time.perf_counter() - start), "images": batches * batch}


def transformers_encoder(model_dir: Path, device, dtype, pixels):
    """transformers' retrieval model's image side: `vision_model` + `vision_proj`, normalised."""
    import torch
    from transformers import BlipForImageTextRetrieval

    retrieval = BlipForImageTextRetrieval.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def encode():
        features = retrieval.vision_model(pixel_values=pixels.to(device, dtype)).last_hidden_state
        embeddings = torch.nn.functional.normalize(retrieval.vision_proj(features[:, 0, :]), dim=-1)
        return embeddings.cpu(), features.cpu()

    return encode


def itm_latencies(model, queries: list[str], device, repeats: int = 5) -> dict:
    """Each query against 32 stored feature maps (random int8 values scaled, float32 on the CPU as the reader
    hands them): p50/p95 over queries of the median of `repeats` passes, and the median FLOP rate."""
    features = stored_features()
    times, rates = [], []
    for query in queries:
        tokens = model.tokenize([query])
        model.itm_scores(tokens, features)  # first touch of this length's kernels
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.itm_scores(tokens, features)  # its logits come back to the CPU: synchronised
            runs.append(time.perf_counter() - start)
        seconds = statistics.median(runs)
        times.append(seconds)
        length = int(np.asarray(tokens.attention_mask).sum())
        rates.append(itm_gflops(model.text.config, length, 577, CANDIDATES) / 1e3 / seconds)
    return {"p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * float(np.percentile(times, 95)),
            "tflops_per_s_median": statistics.median(rates), "queries": len(queries)}


if __name__ == "__main__":
    main()
