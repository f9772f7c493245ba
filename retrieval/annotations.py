"""Image-caption annotation files in the two forms people have, read into one shape.

- LAVIS: a JSON list of {"image": relative path, "caption": [captions] or "caption", "image_id"?}
  (`flickr30k_test.json`, `coco_karpathy_test.json`; training files have one caption per entry).
- Karpathy: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}]}]}
  (`dataset_flickr30k.json`, `dataset_coco.json`); "restval" belongs to the training split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInputError

SPLITS = ("train", "val", "test")


@dataclass
class AnnotatedImage:
    image: str  # path relative to the images root
    captions: list[str] = field(default_factory=list)


def load_annotations(path: str | Path, split: str = "test") -> list[AnnotatedImage]:
    """Images with their captions, in file order; `split` applies to Karpathy files only."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInputError(f"annotation file {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"annotation file {path} is not valid JSON (line {exc.lineno})") from exc
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        images = _karpathy(data["images"], split)
    elif isinstance(data, list):
        images = _lavis(data)
    else:
        raise InvalidInputError(f"annotation file {path} is neither a LAVIS list of {{image, caption}} nor a "
                                "Karpathy {images: [...]} file")
    if not images:
        raise InvalidInputError(f"annotation file {path} has no images" +
                                (f" in the {split!r} split" if isinstance(data, dict) else ""))
    return images


def _lavis(entries: list) -> list[AnnotatedImage]:
    by_image: dict[str, AnnotatedImage] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise InvalidInputError(f"LAVIS annotation entry {i} needs 'image' and 'caption' keys")
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        item = by_image.setdefault(entry["image"], AnnotatedImage(entry["image"]))
        item.captions.extend(str(c) for c in captions)
    return list(by_image.values())


def _karpathy(entries: list, split: str) -> list[AnnotatedImage]:
    if split not in SPLITS:
        raise InvalidInputError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    images = []
    for i, entry in enumerate(entries):
        try:
            entry_split = "train" if entry["split"] == "restval" else entry["split"]
            if entry_split != split:
                continue
            relative = str(Path(entry.get("filepath", "")) / entry["filename"])
            images.append(AnnotatedImage(relative, [s["raw"] for s in entry["sentences"]]))
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"Karpathy annotation image {i} lacks {exc}") from exc
    return images
