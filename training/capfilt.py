"""CapFilt (BLIP §3.3): caption every image with the captioner (nucleus sampling, p=0.9), then keep the
web captions and the synthetic ones that the ITM filter accepts; write the cleaned pairs as a LAVIS
training file (one caption per entry, with its `source`).

The filter is any retrieval checkpoint the engine loads (`load_model`), scored exactly as the engine
re-ranks: ITM on [ENC], match probability = softmax(logits)[1].
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from blipsearch.indexer.images import load_image
from blipsearch.retrieval.errors import ImageLoadError, InvalidInputError
from blipsearch.retrieval.fusion import match_probability

from .data import default_image_root, load_samples, normalise

log = logging.getLogger(__name__)


@dataclass
class CapFiltReport:
    images: int = 0
    skipped: int = 0  # images that could not be read
    web_total: int = 0
    web_kept: int = 0
    synthetic_total: int = 0
    synthetic_kept: int = 0


class Captioner:
    """A `BlipForConditionalGeneration` checkpoint with its tokenizer and image preprocessing."""

    def __init__(self, name: str, device: torch.device):
        from transformers import AutoTokenizer, BlipForConditionalGeneration

        from blipsearch.retrieval.models.preprocessing import read_preprocessing

        from .export import checkpoint_dir, load_pretrained

        directory = checkpoint_dir(name)
        self.model = load_pretrained(BlipForConditionalGeneration, directory, name, require="text_decoder")
        self.model = self.model.to(device).eval()
        self.tokenizer = load_pretrained(AutoTokenizer, directory, name)
        self.preprocessing = read_preprocessing(directory, name, self.model.config.vision_config.image_size)
        self.device = device
        # a captioner fine-tuned as BLIP's writes after its prompt ("a picture of"), which is cut off again
        self.prompt = getattr(self.model.config, "caption_prompt", "") or ""

    @torch.inference_mode()
    def caption(self, pixels: list, samples: int = 1, top_p: float = 0.9, max_length: int = 30,
                min_length: int = 5) -> list[list[str]]:
        """uint8 (H, W, 3) arrays -> `samples` nucleus-sampled captions per image."""
        pre = self.preprocessing
        batch = normalise(torch.from_numpy(np.stack(pixels)), pre.mean, pre.std)  # (B, 3, H, W)
        prompt = None
        if self.prompt:  # [CLS] prompt [SEP] per image: generate puts [DEC] first and drops the [SEP]
            prompt = self.tokenizer([self.prompt] * len(pixels), return_tensors="pt").input_ids.to(self.device)
        out = self.model.generate(pixel_values=batch.to(self.device), input_ids=prompt, do_sample=True, top_p=top_p,
                                  top_k=0, max_length=max_length, min_length=min_length,
                                  num_return_sequences=samples)
        texts = [_after(t.strip(), self.prompt) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return [texts[i * samples:(i + 1) * samples] for i in range(len(pixels))]


def _after(text: str, prompt: str) -> str:
    """The caption without the prompt it was generated after (BLIP: `caption[len(self.prompt):]`)."""
    return text[len(prompt):].strip() if prompt and text.lower().startswith(prompt.lower()) else text


def _grouped(source: str, images: str | None, split: str) -> Iterator[tuple[Path, list[str]]]:
    """(image path, web captions) per image, in file order."""
    by_image: dict[Path, list[str]] = {}
    for sample in load_samples(source, images, split):
        by_image.setdefault(sample.image, []).append(sample.caption)
    yield from by_image.items()


def accepted(filter_model, pixels, texts: list[str], threshold: float) -> list[bool]:
    """ITM match probability of each text with one image, against `threshold`."""
    features = filter_model.encode_images(filter_model.pixel_values([pixels])).features  # (1, T, H)
    tokens = filter_model.encode_texts(texts).tokens
    logits = filter_model.itm_scores(tokens, features.expand(len(texts), -1, -1))
    return (match_probability(logits) > threshold).tolist()


def capfilt(source: str, out: str | Path, captioner: Captioner, filter_model, images: str | None = None,
            split: str = "train", samples: int = 1, top_p: float = 0.9, threshold: float = 0.5,
            seed: int = 0) -> CapFiltReport:
    """Bootstrap a cleaner dataset from `source` (annotation JSON or caption folder) into `out` (JSON)."""
    out = Path(out)
    if not out.parent.is_dir() or out.is_dir():
        raise InvalidInputError(f"output {out}: " + ("is a folder; name a JSON file" if out.is_dir() else
                                                     f"no folder {out.parent} to write it in"))
    if out.exists() and out.resolve() == Path(source).resolve():
        raise InvalidInputError(f"output {out} is the source itself; name another file")
    torch.manual_seed(seed)  # nucleus sampling draws from torch's generator
    root = Path(source) if Path(source).is_dir() else None
    report, entries = CapFiltReport(), []
    for image, web in tqdm(list(_grouped(source, images, split)), desc="capfilt", unit="image"):
        try:
            synthetic = captioner.caption([load_image(image, captioner.preprocessing).pixels], samples, top_p)[0]
            pixels = load_image(image, filter_model.info.preprocessing).pixels
        except ImageLoadError as exc:
            log.warning("%s: skipped (%s)", image, exc)
            report.skipped += 1
            continue
        keep = accepted(filter_model, pixels, web + synthetic, threshold)
        name = str(image.relative_to(root)) if root else _relative(image, source, images)
        for i, (text, ok) in enumerate(zip(web + synthetic, keep, strict=True)):
            if ok:
                entries.append({"image": name, "caption": text, "image_id": name,
                                "source": "web" if i < len(web) else "synthetic"})
        report.images += 1
        report.web_total, report.synthetic_total = report.web_total + len(web), report.synthetic_total + len(synthetic)
        report.web_kept += sum(keep[:len(web)])
        report.synthetic_kept += sum(keep[len(web):])
    if report.skipped and not report.images and root is None:  # nothing read: most likely the wrong root
        found = Path(images) if images is not None else default_image_root(Path(source))
        raise InvalidInputError(f"no image of {source} could be read ({report.skipped} skipped, each named above); "
                                f"--images names the folder its image paths start in (now {found})")
    out.write_text(json.dumps(entries, indent=0) + "\n", encoding="utf-8")
    return report


def _relative(image: Path, source: str, images: str | None) -> str:
    """The image's path as the output names it: relative to the images' root, as the source named it; an
    absolute path that lies elsewhere stays absolute (relative_to raised, after every image before it was
    captioned, and nothing was written)."""
    root = Path(images) if images is not None else default_image_root(Path(source))
    try:
        return str(image.relative_to(root))
    except ValueError:
        return str(image.resolve())
