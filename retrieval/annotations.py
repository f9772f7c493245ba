"""Image-caption annotation files in the two forms people have, read into one shape.

- LAVIS: a JSON list of {"image": relative path, "caption": [captions] or "caption", "image_id"?}
  (`flickr30k_test.json`, `coco_karpathy_test.json`; training files have one caption per entry).
- Karpathy: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}]}]}
  (`dataset_flickr30k.json`, `dataset_coco.json`); "restval" belongs to the training split.

In both, an image listed more than once is one image with all its captions: as two images of the same file,
each would tie with the other on every caption, and ties count against the query (`eval_metrics`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInputError

SPLITS = ("train", "val", "test")


@dataclass
class AnnotatedImage:
    image: str  # path relative to the images root
    captions: list[str] = field(default_factory=list)


@dataclass
class AnnotationFile:
    images: list[AnnotatedImage]
    split: str | None  # the Karpathy split read; None for a LAVIS list, whose split its contents do not name


def load_annotations(path: str | Path, split: str | None = None, default_split: str = "test"
                     ) -> list[AnnotatedImage]:
    """Images with their captions, in file order (see `read_annotations`)."""
    return read_annotations(path, split, default_split).images


def read_annotations(path: str | Path, split: str | None = None, default_split: str = "test") -> AnnotationFile:
    """Images with their captions, in file order, and the split they are. `split` chooses among a Karpathy
    file's splits (else `default_split`) and is refused for a LAVIS list, which holds one: a caller that asks
    for a split must not silently get the whole file. `default_split` alone applies to Karpathy files only."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # (a Windows editor's byte-order mark)
    except OSError as exc:
        raise InvalidInputError(f"annotation file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise InvalidInputError(f"annotation file {path} is not UTF-8 text (a JSON file is)") from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"annotation file {path} is not valid JSON (line {exc.lineno})") from exc
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        split = split or default_split
        images = _karpathy(data["images"], split, path)
    elif isinstance(data, list):
        if split is not None:
            raise InvalidInputError(f"annotation file {path} is a LAVIS list, which holds one split; a split "
                                    f"({split!r}) can be chosen in a Karpathy file only: leave it out")
        images = _lavis(data, path)
    else:
        raise InvalidInputError(f"annotation file {path} is neither a LAVIS list of {{image, caption}} nor a "
                                "Karpathy {images: [...]} file")
    if not images:
        raise InvalidInputError(f"annotation file {path} has no images" +
                                (f" in the {split!r} split" if isinstance(data, dict) else ""))
    return AnnotationFile(images, split)


def _lavis(entries: list, path: Path) -> list[AnnotatedImage]:
    by_image: dict[str, AnnotatedImage] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise InvalidInputError(f"LAVIS annotation entry {i} of {path} needs 'image' and 'caption' keys")
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        if not (_name(entry["image"]) and all(isinstance(c, str) for c in captions)):
            raise InvalidInputError(f"LAVIS annotation entry {i} of {path}: 'image' must be a file name and "
                                    "'caption' a text or a list of texts")
        name = os.path.normpath(entry["image"])  # "./a.jpg" is "a.jpg": one image, as a Karpathy file reads it
        by_image.setdefault(name, AnnotatedImage(name)).captions.extend(captions)
    return list(by_image.values())


def _karpathy(entries: list, split: str, path: Path) -> list[AnnotatedImage]:
    if split not in SPLITS:
        raise InvalidInputError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    images: dict[str, AnnotatedImage] = {}  # a file listed twice is one image with both lists of captions
    for i, entry in enumerate(entries):
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("split"), str) and _name(entry.get("filename"))
                and isinstance(entry.get("filepath", ""), str) and isinstance(sentences, list)
                and all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences)):
            raise InvalidInputError(f"Karpathy annotation image {i} of {path} needs 'split' and 'filename' texts "
                                    "and 'sentences', a list of {raw: text} ('filepath' a text where given)")
        entry_split = "train" if entry["split"] == "restval" else entry["split"]
        if entry_split == split:
            relative = str(Path(entry.get("filepath", "")) / entry["filename"])
            images.setdefault(relative, AnnotatedImage(relative)).captions.extend(s["raw"] for s in sentences)
    return list(images.values())


def _name(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())
