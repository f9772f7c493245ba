"""`blipsearch eval`: Flickr30k / COCO (or any same-form dataset) recall@k with the LAVIS protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .. import DEFAULT_MODEL
from . import main
from .options import device_option, load, model_option, precision_option

_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@main.command("eval")
@click.option("--dataset", type=click.Choice(["flickr30k", "coco", "custom"], case_sensitive=False),
              default="custom", show_default=True,
              help="Selects the default k_test and the published figures shown beside ours; custom: your own "
                   "data in either annotation form (k_test 128, no published figures).")
@click.option("--images", "images_root", type=_EXISTING_DIR, required=True,
              help="Folder the annotation file's image paths are relative to.")
@click.option("--ann", "annotations", type=_EXISTING_FILE, required=True,
              help="LAVIS test list (flickr30k_test.json, coco_karpathy_test.json) or Karpathy "
                   "dataset_*.json.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default=None,
              help="Split to read from a Karpathy file. [default: test; refused for LAVIS files, which hold one "
                   "split]")
@model_option("Retrieval checkpoint to evaluate (hub id or local directory). Default: "
              f"{DEFAULT_MODEL}.")
@device_option
@precision_option
@click.option("--k-test", type=click.IntRange(min=1), default=None,
              help="ITM candidates per query. [default: BLIP 256 on COCO, 128 on Flickr30k and custom; "
                   "BLIP-2 128]")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate the first N images and their captions only.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep image features here (float16, ~0.9 MB per BLIP-B image) and resume from them.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per vision-tower forward.")
@click.option("--itm-batch", type=click.IntRange(min=1), default=128, show_default=True,
              help="Image-text pairs per ITM forward.")
@click.option("--workers", type=click.IntRange(1, 64), default=min(4, os.cpu_count() or 1), show_default=True,
              help="Image-decoding threads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def evaluate_command(dataset: str, images_root: Path, annotations: Path, split: str | None, model_name: str | None,
                     device: str, precision: str, k_test: int | None, limit: int | None,
                     cache_dir: Path | None, batch_size: int, itm_batch: int, workers: int,
                     as_json: bool, quiet: bool) -> None:
    """Image-text retrieval recall@1/5/10 (TR: image->text, IR: text->image), ITC-only and ITM re-ranked.

    Follows LAVIS: ITC over all pairs, ITM + ITC re-rank of each query's top k_test, per-stage timings.
    """
    from ..annotations import read_annotations
    from ..eval_report import RunInfo, format_table, published_for, to_json
    from ..evaluation import EvalOptions, check_captions, check_images, default_k_test, evaluate

    dataset = dataset.lower()
    annotation_file = read_annotations(annotations, split=split)
    items = annotation_file.images
    check_images(images_root, [item.image for item in items[:limit]])  # before the slow model load
    check_captions(items[:limit])
    model = load(model_name or DEFAULT_MODEL, device, precision)
    options = EvalOptions(k_test=k_test or default_k_test(model.info.family, dataset), image_batch=batch_size,
                          text_batch=256, itm_batch=itm_batch, workers=workers, progress=not quiet)
    result = evaluate(model, items, images_root, options, cache_dir=cache_dir, limit=limit)
    run = RunInfo(model_id=model.info.model_id, revision=model.info.revision, family=model.info.family,
                  device=str(model.device), dtype=_dtype_name(model), dataset=dataset,
                  annotations=str(annotations), images_root=str(images_root), split=annotation_file.split)
    published = published_for(run.model_id, dataset)
    if as_json:
        click.echo(json.dumps(to_json(run, result, published), indent=1))
    else:
        click.echo(format_table(run, result, published))


def _dtype_name(model) -> str:
    dtype = getattr(model, "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "unknown"
    if not getattr(model, "int8", False):  # --precision int8 sets it
        return name
    check = model.int8_check  # None: every image came from the cache
    verdict = "" if check is None else " (check passed)" if check.passed else " (check failed: encoded in fp32)"
    return f"{name}, image tower int8{verdict}"
