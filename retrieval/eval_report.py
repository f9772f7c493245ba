"""What `blipsearch eval` prints: the recall table with the published figures beside ours, and --json.

Published figures (GUIDE §2) are keyed by hub id and dataset; only R@1 is recorded for them. A local
model directory or any other hub id has no published figure, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .eval_metrics import Recall
from .evaluation import EvalResult


@dataclass(frozen=True)
class Published:
    source: str  # which model and paper the figure comes from
    txt_r1: float  # image->text R@1
    img_r1: float  # text->image R@1
    images: int  # size of the test split the figure is for


PUBLISHED: dict[tuple[str, str], Published] = {
    ("Salesforce/blip-itm-base-coco", "coco"):
        Published("BLIP ViT-B fine-tuned on COCO, 5K test (LAVIS)", 82.0, 64.5, 5000),
    ("Salesforce/blip-itm-base-flickr", "flickr30k"):
        Published("BLIP ViT-B fine-tuned on Flickr30k, 1K test", 96.9, 87.5, 1000),
    ("Salesforce/blip2-itm-vit-g-coco", "coco"):
        Published("BLIP-2 ViT-g fine-tuned on COCO, 5K test (BLIP-2 paper)", 85.4, 68.3, 5000),
    ("Salesforce/blip2-itm-vit-g-coco", "flickr30k"):
        Published("BLIP-2 ViT-g, COCO model zero-shot on Flickr30k 1K test (BLIP-2 paper)", 97.6, 89.7, 1000),
}

_COLUMNS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "mean")
_STAGES = (("image_encoding", "image encoding"), ("text_encoding", "text encoding"), ("itc", "ITC"),
           ("itm", "ITM re-rank"))


@dataclass(frozen=True)
class RunInfo:
    """What was evaluated, for the header and the JSON."""

    model_id: str
    revision: str
    family: str
    device: str
    dtype: str
    dataset: str
    annotations: str
    images_root: str
    split: str | None  # None: a LAVIS list, which does not say which split it holds


def published_for(model_id: str, dataset: str) -> Published | None:
    return PUBLISHED.get((model_id, dataset))


def format_table(run: RunInfo, result: EvalResult, published: Published | None) -> str:
    lines = [f"{run.model_id} on {run.dataset} ({_split_label(run)}): {_count(result.images, 'image')}, "
             f"{_count(result.texts, 'caption')}, k_test {result.k_test}{_capped(result)}, {run.device} {run.dtype}",
             ""]
    lines.append(_row("", _COLUMNS))
    lines.append(_row("ITC", _recall_cells(result.itc)))
    lines.append(_row("ITC + ITM re-rank", _recall_cells(result.rerank)))
    lines.append(_published_row(published))
    lines += _published_notes(run, result, published)
    lines += ["", f"{'stage':<18}{'seconds':>9}"]
    for key, label in _STAGES:
        lines.append(f"{label:<18}{result.seconds.get(key, 0.0):>9.1f}   {_stage_note(key, result)}".rstrip())
    return "\n".join(lines)


def _capped(result: EvalResult) -> str:
    """Where the pool is smaller than k_test, the candidates each query really had."""
    if result.k_test <= min(result.images, result.texts):
        return ""
    return f" (capped at {min(result.k_test, result.images)} images per caption, " \
           f"{min(result.k_test, result.texts)} captions per image)"


def _row(label: str, cells) -> str:
    return f"{label:<18}" + "".join(f"{cell:>7}" for cell in cells)


def _recall_cells(r: Recall) -> list[str]:
    values = (r.txt_r1, r.txt_r5, r.txt_r10, r.img_r1, r.img_r5, r.img_r10, r.r_mean)
    return [f"{v:.1f}" for v in values]


def _published_row(published: Published | None) -> str:
    if published is None:
        return _row("published", ["-"] * len(_COLUMNS)) + "   none known for this model and dataset"
    cells = [f"{published.txt_r1:.1f}", "-", "-", f"{published.img_r1:.1f}", "-", "-", "-"]
    return _row("published", cells) + f"   {published.source}"


def _published_notes(run: RunInfo, result: EvalResult, published: Published | None) -> list[str]:
    if run.dataset == "custom":
        return ["(pass --dataset coco or flickr30k to compare with the papers on those test sets)"]
    # a LAVIS list's split is its file's (the header names it): only its size is checked
    if published is not None and (result.images != published.images or run.split not in ("test", None)):
        return [f"(the published figure is for the {published.images}-image test split; this run used "
                f"{_count(result.images, 'image')} of {_split_label(run, 'the ')})"]
    return []


def _split_label(run: RunInfo, article: str = "") -> str:
    """"test split", or the annotation file's name where it does not say (a LAVIS list)."""
    return f"{article}{run.split} split" if run.split else Path(run.annotations).name


def _stage_note(stage: str, result: EvalResult) -> str:
    seconds = result.seconds.get(stage, 0.0)
    if stage == "image_encoding":
        encoded = result.images_encoded
        rate = f", {encoded / seconds:.1f} img/s" if encoded and seconds else ""
        return f"{_count(encoded, 'image')} encoded, {result.images - encoded} from cache{rate}"
    if stage == "text_encoding":
        return _count(result.texts, "caption")
    if stage == "itm":
        return (f"{result.itm_pairs} distinct pairs for {result.candidate_pairs} candidates, "
                f"{result.itm_pairs_per_second:.1f} pairs/s")
    return ""


def to_json(run: RunInfo, result: EvalResult, published: Published | None) -> dict:
    """Machine-readable report; recall keys as LAVIS names them (txt_r1 = TR@1, img_r1 = IR@1, r_mean)."""
    data = {
        "model": {"id": run.model_id, "revision": run.revision, "family": run.family, "device": run.device,
                  "dtype": run.dtype},
        "dataset": {"name": run.dataset, "split": run.split, "annotations": run.annotations,
                    "images_root": run.images_root, "images": result.images, "texts": result.texts},
        "k_test": result.k_test,
        "itc": result.itc.to_dict(),
        "rerank": result.rerank.to_dict(),
        "published": None if published is None else asdict(published),
        "seconds": dict(result.seconds),
        "images_encoded": result.images_encoded,
        "itm_pairs": result.itm_pairs,
        "candidate_pairs": result.candidate_pairs,
        "itm_pairs_per_second": result.itm_pairs_per_second,
    }
    return _finite(data)


def _finite(value):
    """NaN is not JSON: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
