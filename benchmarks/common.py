"""Shared pieces of the speed benchmarks: a full-size random BLIP checkpoint, photo-like JPEGs, the
machine's matmul peak in the engine's precision, and peak memory of a child process.

Speed does not depend on weight values, so a BLIP ViT-B/16 384 px retrieval model with random weights
(saved once under the work folder) stands in for `Salesforce/blip-itm-base-coco`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

DEFAULT_WORKDIR = Path(os.environ.get("BLIPSEARCH_BENCH_DIR", Path.home() / ".cache" / "blipsearch-bench"))

# Enough real words that benchmark queries tokenise to realistic lengths (one token per word).
WORDS = """a an the of on in at with and or to from by near under over behind beside next front back top bottom
left right up down inside outside around through across along man woman men women person people child
children boy girl baby kid kids dog dogs cat cats horse horses bird birds cow sheep elephant bear zebra
giraffe car cars bus truck train plane boat bike bicycle motorcycle street road city building house tree
trees grass field beach sea ocean water lake river snow mountain sky cloud sun sunset table chair bed
sofa room kitchen food pizza cake plate cup bowl phone laptop book ball frisbee kite surfboard skateboard
umbrella bench sign light red green blue yellow white black brown orange pink purple gray small large big
tall young old two three four many some is are sitting standing walking running riding playing holding
eating looking lying flying jumping wearing carrying building sandcastle photo picture image view shot
close group couple family friends team game snowy sunny rainy night day morning evening""".split()


BERT_BASE_HEADS = 12  # text heads of Salesforce/blip-itm-base-coco and blip-image-captioning-base


def save_random_blip_base(directory: Path, model_class: str = "BlipForImageTextRetrieval") -> Path:
    """BLIP ViT-B/16 384 px + BERT-base retrieval model (or `BlipForConditionalGeneration`: the captioner),
    random weights, with tokenizer and processor."""
    config_file = directory / "config.json"
    if (directory / "model.safetensors").exists() and \
            json.loads(config_file.read_text())["text_config"].get("num_attention_heads") == BERT_BASE_HEADS:
        return directory
    import shutil

    import torch
    import transformers
    from transformers import BlipConfig, BlipImageProcessorPil, BlipProcessor

    shutil.rmtree(directory, ignore_errors=True)  # a model made before the heads were set: make it again
    directory.mkdir(parents=True, exist_ok=True)
    # ViT-B/16 at 384 px, BERT-base text with 30524 tokens ([DEC] 30522, [ENC] 30523); BlipTextConfig's default
    # of 8 heads is not the released checkpoints' 12, and the ITM's cost depends on it
    config = BlipConfig(text_config={"num_attention_heads": BERT_BASE_HEADS})
    tokenizer = word_tokenizer(config.text_config.vocab_size, ["[DEC]", "[ENC]"])
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(directory)
    side = config.vision_config.image_size
    images = BlipImageProcessorPil(size={"height": side, "width": side})
    BlipProcessor(images, tokenizer).save_pretrained(directory)  # as transformers 5 saves it: processor_config.json
    return directory


def make_photos(directory: Path, count: int, size: tuple[int, int] = (4000, 3000), seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (quality 90): shaded backgrounds, shapes of many sizes, edges and sensor grain."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"photo{i:04d}.jpg"
        if not path.exists():
            _photo(path, size if i % 4 else size[::-1], np.random.default_rng(seed * 100_000 + i))
        paths.append(path)
    return paths


def _photo(path: Path, size: tuple[int, int], rng: np.random.Generator) -> None:
    from PIL import Image, ImageDraw, ImageFilter

    grid = rng.integers(0, 255, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(10, 40))):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        w, h = (int(v) for v in rng.integers(20, size[0] // 3, 2))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        elif shape == 1:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        else:
            draw.polygon([(x, y), (x + w, y + h // 3), (x + w // 2, y + h)], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
    grain = rng.normal(0, rng.uniform(2, 8), (size[1], size[0], 1)).astype(np.float32)
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def engine_precision() -> str:
    """The precision `--precision auto` computes in on this CPU: bf16 where the CPU multiplies bf16 in hardware
    (AVX512-BF16 or AMX), else fp32. The peak that figures are compared with is this precision's: on an
    AVX2-only CPU bf16 is emulated (0.3 GFLOP/s measured on one), and the engine runs fp32 there."""
    import torch

    from blipsearch.retrieval.device import select_dtype

    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[select_dtype(torch.device("cpu"))]


def matmul_peak_gflops(dtype_name: str | None = None, n: int = 2048, chunks: int = 5, per_chunk: int = 4) -> float:
    """The machine's dense matmul rate in `dtype_name` (default: `engine_precision()`), measured now (so
    ratios hold on a busy or different machine): the best of `chunks` timings of `per_chunk` n x n matmuls,
    after a warm-up. The best, not the mean: on a shared 2-core machine one 2048^2 fp32 matmul ran at
    107-175 GFLOP/s within a minute, and a process's first ones ran slowest, so a mean of one run read as
    low as 93 and put figures above 100% of it. The best is the rate the machine showed it can reach.

    In fp32 the best of torch's GEMM and numpy's (its BLAS: OpenBLAS in numpy's wheels), timed in turn: the
    engine runs fp32 text queries in numpy, and on an AVX2 EPYC OpenBLAS ran 141-154 GFLOP/s where torch's
    MKL ran 114-127, so torch's figure alone understated what the machine can do."""
    import numpy as np
    import torch

    dtype_name = dtype_name or engine_precision()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    products = [lambda: a @ b]
    if dtype_name == "fp32":
        x, y, out = a.numpy(), b.numpy(), np.empty((n, n), np.float32)
        products.append(lambda: np.matmul(x, y, out=out))
    for product in products:
        for _ in range(2):
            product()
    best = 0.0
    for _ in range(chunks):
        for product in products:
            start = time.perf_counter()
            for _ in range(per_chunk):
                product()
            best = max(best, 2 * n**3 * per_chunk / (time.perf_counter() - start) / 1e9)
    return best


def vit_gflops_per_image(tokens: int = 577, hidden: int = 768, layers: int = 12, mlp: int = 3072,
                         patch_pixels: int = 3 * 16 * 16) -> float:
    """Multiply-adds x 2 of one ViT forward: patch embedding, QKV/out projections, attention, MLP."""
    per_layer = 4 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + 2 * tokens * hidden * mlp
    return 2 * ((tokens - 1) * patch_pixels * hidden + layers * per_layer) / 1e9


def run_measured(command: list[str], env: dict | None = None) -> dict:
    """Run a command; wall seconds and peak resident memory of it and its children (psutil polling)."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    peak = 0
    watched = psutil.Process(process.pid)

    def poll() -> None:
        nonlocal peak
        while process.poll() is None:
            try:
                rss = watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    if process.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-2000:]}")
    return {"seconds": wall, "peak_rss_mb": peak / 2**20, "stdout": stdout, "stderr": stderr}


def print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def word_tokenizer(vocab_size: int, tail: list[str]):
    """A BERT word tokenizer of `vocab_size` ids: specials, WORDS (one token each), [unusedN] filler, then
    `tail` (e.g. ["[DEC]"] for BLIP-2's Q-Former, whose bos token is the last id). Ids decide the speed,
    not the words: benchmark queries tokenise to realistic lengths."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + list(dict.fromkeys(WORDS))
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tail) - len(tokens))] + tail
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, bos_token=tail[0] if tail else None)


def save_random_blip2(directory: Path) -> Path:
    """BLIP-2 stage-1 retrieval model at transformers' default `Blip2Config` sizes (EVA ViT-g/14 at 224 px,
    39 layers, 1408 wide; Q-Former BERT-base with 32 queries, cross-attention every 2 layers), random
    weights, with a BERT tokenizer and a 224 px BLIP image processor: ~1.2 B parameters, ~4.6 GB fp32.

    Stands in for `Salesforce/blip2-itm-vit-g` (same shapes; its config lists the Q-Former vocabulary as
    30523, BERT's plus [DEC]). Weights are transformers' own fp32 initialisation (~25 s and ~5 GB of memory
    here; run it in a process of its own so that memory goes back), except the ViT's scale: 0.02 like the
    rest, not Blip2VisionConfig's 1e-10, so that activations have a trained model's magnitudes.
    """
    if directory.exists():
        return directory
    import shutil

    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, BlipImageProcessorPil

    partial = directory.with_name(directory.name + ".partial")  # renamed when complete
    shutil.rmtree(partial, ignore_errors=True)
    vocab_size = 30523  # BERT's 30522 + [DEC]
    config = Blip2Config(vision_config={"initializer_range": 0.02},
                         qformer_config={"use_qformer_text_input": True, "vocab_size": vocab_size})
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # transformers zeroes the queries at initialisation; trained ones differ from each other
        model.query_tokens.normal_(0, 1)
    model.save_pretrained(partial)
    side = config.vision_config.image_size
    images = BlipImageProcessorPil(size={"height": side, "width": side})
    Blip2Processor(images, word_tokenizer(vocab_size, ["[DEC]"]), num_query_tokens=None).save_pretrained(partial)
    partial.rename(directory)
    return directory


def made_for(index: Path, revision: str) -> bool:
    """Whether the benchmark index at `index` was completed for a model of this revision. If not, its
    completion marker goes: a rebuild refuses a folder holding files it does not know."""
    marker = index / "complete"
    if marker.exists() and marker.read_text() == revision:
        return True
    marker.unlink(missing_ok=True)
    return False


def mark_made(index: Path, revision: str) -> None:
    """Record that the index at `index` is complete, for a model of this revision (see `made_for`)."""
    (index / "complete").write_text(revision)


def build_synthetic_index(directory: Path, model_dir: Path, images: int, batch: int = 250) -> Path:
    """An index of `images` synthetic images for `model_dir`'s shapes: random normalised ITC vectors
    (V, D) per image (V = 1 for BLIP, 32 for BLIP-2) and random int8 feature maps (T, H) (577 x 768 for
    BLIP ViT-B/16 at 384 px, 257 x 1408 for BLIP-2 ViT-g at 224 px). Made once per model revision, which
    `complete` records.
"""
    from blipsearch.indexer import codec
    from blipsearch.indexer.store import FileRecord, ImageRecord, IndexWriter
    from blipsearch.retrieval.models import load_model

    info = load_model(str(model_dir), "cpu", "fp32", with_vision=False).info
    if made_for(directory, info.revision):
        return directory
    store = IndexWriter.open(directory, info, rebuild=True)
    rng = np.random.default_rng(0)
    t, h = info.feature_tokens, info.feature_dim
    scale, offset = np.full(h, 0.05, np.float16).tobytes(), np.zeros(h, np.float16).tobytes()
    for start in range(0, images, batch):
        count = min(batch, images - start)
        vectors = rng.standard_normal((count, info.vectors_per_image, info.embed_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)  # (count, V, D)
        hashes = [f"{start + i:032x}" for i in range(count)]
        store.add_images([ImageRecord(hashes[i], vectors[i], codec.PackedFeatures(rng.bytes(t * h), scale, offset),
                                      4000, 3000) for i in range(count)])
        store.upsert_files([FileRecord(f"/photos/synthetic/img{start + i:06d}.jpg", 3_000_000, 0, hashes[i])
                            for i in range(count)])
        print(f"\rbuilding the synthetic index: {start + count}/{images}", end="", file=sys.stderr)
    store.finish()
    store.close()
    mark_made(directory, info.revision)
    print(file=sys.stderr)
    return directory


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else what `platform` knows), how many cores are usable, and
    the vector units that set its matmul peak: e.g. "AMD EPYC (2 cores, AVX512, bf16 units, no AMX)"."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = "bf16 units" if engine_precision() == "bf16" else "no bf16 units"
    amx = "AMX" if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else "no AMX"
    return f"{name} ({cores} cores, {torch.backends.cpu.get_cpu_capability()}, {bf16}, {amx})"
