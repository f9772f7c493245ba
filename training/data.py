"""Image-caption data: where the pairs come from, how an image becomes pixels, and in which order.

Sources: an annotation JSON in the LAVIS or Karpathy form (read by `retrieval.annotations`), or a folder
where each image has a `.txt` file of the same stem beside it, one caption per line.

Determinism: the order of an epoch is a permutation seeded by (seed, epoch), cut into global batches of
`batch_size x processes`; rank r takes the r-th slice of each. A resumed run starts at the batch where
the checkpoint stopped. Augmentation draws from a generator seeded by (seed, epoch, sample), so
neither worker count nor restarts change what the model sees.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blipsearch.indexer.images import load_image
from blipsearch.indexer.scan import supported_extensions  # the engine's formats (HEIC with pillow-heif)
from blipsearch.retrieval.annotations import load_annotations
from blipsearch.retrieval.errors import ImageLoadError, InvalidInputError, printable
from blipsearch.retrieval.models import preprocessing
from blipsearch.retrieval.models.base import Preprocessing
from blipsearch.retrieval.models.preprocessing import BLIP_MEAN, BLIP_STD

from .objectives import Batch
from .randaugment import random_augment

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str
    image_id: int  # the image's index: its captions share it
    sample_id: int  # index of the pair
    negative_captions: tuple[str, ...] = ()  # captions false for the image (ITM caption negatives)
    group: str | None = None  # pairs of one group are batched together where `data.group_batches` asks it
    instruction: str | None = None  # InstructBLIP: the question the caption answers (None: a caption to describe)


def json_samples(path: str | Path, images: str | Path | None = None, split: str = "train") -> list[Sample]:
    """Pairs from a LAVIS or Karpathy annotation file; image paths are relative to `images`
    (default: `images/` beside the file if it exists, else the file's folder). A LAVIS entry's optional
    `"negative_captions": [...]` belong to every caption of its image; its optional `"group"` to its pair."""
    path = Path(path)
    root = Path(images) if images is not None else default_image_root(path)
    items = load_annotations(path, default_split=split)  # a LAVIS file holds one split: `split` passes it by
    negatives, groups, asked = negative_captions(path), pair_field(path, "group"), pair_field(path, "instruction")
    pairs = [(root / item.image, caption) for item in items for caption in item.captions]
    false = [negatives.get(item.image, ()) for item in items for _ in item.captions]
    group = [_next(groups, (item.image, caption)) for item in items for caption in item.captions]
    instruction = [_next(asked, (item.image, caption)) for item in items for caption in item.captions]
    return [replace(sample, negative_captions=neg, group=g, instruction=i) if neg or g or i else sample
            for sample, neg, g, i in zip(_number(pairs), false, group, instruction, strict=True)]


def negative_captions(path: Path) -> dict[str, tuple[str, ...]]:
    """image -> its LAVIS entries' `negative_captions`, in file order, without repeats ({} for Karpathy)."""
    data = json.loads(path.read_text(encoding="utf-8"))  # already read once by load_annotations: valid
    by_image: dict[str, dict[str, None]] = {}
    for i, entry in enumerate(data if isinstance(data, list) else []):
        captions = entry.get("negative_captions", [])
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise InvalidInputError(f"annotation file {path}: entry {i}'s negative_captions must be a list of "
                                    "strings")
        by_image.setdefault(entry["image"], {}).update(dict.fromkeys(captions))
    return {image: tuple(captions) for image, captions in by_image.items() if captions}


def pair_field(path: Path, name: str) -> dict[tuple[str, str], list[str | None]]:
    """(image, caption) -> the field `name` (`"group"`, `"instruction"`) of each LAVIS entry with that image
    and caption, in file order ({} for Karpathy): one image may hold the same answer to two questions."""
    data = json.loads(path.read_text(encoding="utf-8"))
    out: dict[tuple[str, str], list[str | None]] = {}
    for entry in data if isinstance(data, list) else []:
        if isinstance(entry.get("caption"), str):
            value = entry.get(name)
            out.setdefault((entry["image"], entry["caption"]), []).append(None if value is None else str(value))
    return out


def _next(values: dict[tuple[str, str], list[str | None]], key: tuple[str, str]) -> str | None:
    """The next entry's value for this (image, caption), as the pairs come in file order."""
    queue = values.get(key)
    return queue.pop(0) if queue else None


def default_image_root(path: Path) -> Path:
    return path.parent / "images" if (path.parent / "images").is_dir() else path.parent


def folder_samples(folder: str | Path) -> list[Sample]:
    """Pairs from images with a same-stem `.txt` beside them (one caption per non-empty line)."""
    folder = Path(folder)
    pairs = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in supported_extensions()):
        text = image.with_suffix(".txt")
        if text.is_file():
            try:
                lines = text.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"caption file {text} is not UTF-8 text (byte {exc.start + 1}); save it as "
                                        "UTF-8") from exc
            pairs += [(image, line.strip()) for line in lines if line.strip()]
    if not pairs:
        raise InvalidInputError(f"folder {folder} has no image with a caption file beside it (photo.jpg + photo.txt)")
    return _number(pairs)


def _number(pairs: list[tuple[Path, str]]) -> list[Sample]:
    """One image id per image file, however its path is spelled ("train/../train/a.png" is "train/a.png"):
    two ids for one image made its own captions ITC/ITM negatives."""
    image_ids: dict[Path, int] = {}
    files: dict[Path, Path] = {}  # as spelled -> resolved, once per spelling (COCO: 5 captions an image)
    samples = []
    for i, (image, caption) in enumerate(pairs):
        if image not in files:
            files[image] = _same_file(image)
        samples.append(Sample(image, caption, image_ids.setdefault(files[image], len(image_ids)), i))
    return samples


def _same_file(image: Path) -> Path:
    try:
        return image.resolve()
    except (OSError, RuntimeError):  # a link loop: the check for missing images names it later
        return image


def load_samples(source: str | Path | tuple[str, ...], images: str | Path | None = None,
                 split: str = "train") -> list[Sample]:
    """Pairs of one source, or of several read as one dataset: their samples in the order given, one image id
    per image file (a file two sources name is one image, however its path is spelled), and each group kept
    within its own source (two files may both name group "0-0"). `images` applies to every JSON source."""
    if isinstance(source, tuple | list):
        parts = [load_samples(one, images, split) for one in source]
        if len(parts) == 1:
            return parts[0]
        image_ids: dict[Path, int] = {}
        return [replace(s, sample_id=i, image_id=image_ids.setdefault(s.image.resolve(), len(image_ids)),
                        group=None if s.group is None else f"{k}/{s.group}")
                for i, (k, s) in enumerate((k, s) for k, part in enumerate(parts) for s in part)]
    source = Path(source)
    if not source.exists():
        raise InvalidInputError(f"training data {source} does not exist")
    return folder_samples(source) if source.is_dir() else json_samples(source, images, split)


def check_images(samples: list[Sample]) -> None:
    """Fail before training starts where images of the samples are missing (one stat per image file)."""
    images = list(dict.fromkeys(s.image for s in samples))
    missing = [image for image in images if not image.is_file()]
    if missing:
        raise InvalidInputError(f"{len(missing)} of {len(images)} training images are missing, e.g. "
                                f"{printable(str(missing[0]))}; data.images is the folder the annotation paths "
                                "start in")


def _concatenate(parts: list[list[Sample]]) -> list[Sample]:
    """The parts' samples as one list; image and sample ids shifted so that no two parts share one."""
    samples: list[Sample] = []
    for part in parts:
        images_before = 1 + max((s.image_id for s in samples), default=-1)
        samples += [replace(s, image_id=s.image_id + images_before, sample_id=len(samples) + i)
                    for i, s in enumerate(part)]
    return samples


def load_mixture(sources: dict[str, float | None], images: str | Path | None = None,
                 split: str = "train") -> tuple[list[Sample], list[int], list[float]]:
    """Several datasets as one list of samples (image and sample ids made unique), their sizes, and their
    sampling weights: as given, else the square root of the dataset's size (InstructBLIP's mixture)."""
    parts = [load_samples(source, images, split) for source in sources]
    weights = [float(w) if w is not None else len(part) ** 0.5 for part, w in zip(parts, sources.values(), strict=True)]
    return _concatenate(parts), [len(part) for part in parts], weights


class CaptionDataset(torch.utils.data.Dataset):
    """(image, caption) pairs as uint8 pixels at the model's input size; augmentation is seeded per sample."""

    def __init__(self, samples: list[Sample], pre: Preprocessing, crop_scale=(1.0, 1.0), hflip=False, seed=0,
                 randaugment: bool = False, templates: InstructionTemplates | None = None):
        self.samples, self.pre = samples, pre
        self.crop_scale, self.hflip, self.randaugment, self.seed = tuple(crop_scale), hflip, randaugment, seed
        self.templates = templates  # InstructBLIP: each sample gets an instruction
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            pixels = load_image(sample.image, self.pre).pixels  # (H, W, 3) uint8
        except ImageLoadError as exc:
            raise ImageLoadError(f"training image {printable(str(sample.image))}: {exc}; mend or remove it "
                                 "(training data must decode), then resume the run (--resume auto)") from None
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        pixels = augment(pixels, rng, self.crop_scale, self.hflip, self.randaugment)
        # a generator of its own, so that augmentation draws the same with or without negatives
        negatives = sample.negative_captions
        negative = random.Random(f"{self.seed}-{self.epoch}-{index}-negative").choice(negatives) if negatives else None
        item = {"pixels": torch.from_numpy(np.array(pixels)), "caption": sample.caption,
                "image_id": sample.image_id, "sample_id": sample.sample_id, "negative_caption": negative}
        if self.templates is not None:
            item["instruction"] = self.templates.instruction(
                sample.instruction, random.Random(f"{self.seed}-{self.epoch}-{index}-instruction"))
        return item


@dataclass(frozen=True)
class InstructionTemplates:
    """InstructBLIP's instruction templates: a question is put into one of `questions` ("{}" marks where); a
    sample without one (a caption) gets one of `captions`; the template is drawn per sample and epoch."""

    captions: tuple[str, ...]
    questions: tuple[str, ...]

    def instruction(self, question: str | None, rng: random.Random) -> str:
        return rng.choice(self.captions) if question is None else rng.choice(self.questions).format(question)


def augment(pixels: np.ndarray, rng: random.Random, crop_scale=(1.0, 1.0), hflip: bool = False,
            randaugment: bool = False) -> np.ndarray:
    """Random resized crop (area fraction in crop_scale, aspect 3/4..4/3), optional flip, optional BLIP
    RandomAugment: BLIP's training transform, in its order."""
    height, width = pixels.shape[:2]
    if crop_scale[0] < 1.0:
        area = rng.uniform(*crop_scale) * height * width
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = min(width, round((area * aspect) ** 0.5))
        h = min(height, round((area / aspect) ** 0.5))
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        crop = Image.fromarray(pixels[y:y + h, x:x + w]).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(crop)
    if hflip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    if randaugment:
        pixels = random_augment(pixels, rng)
    return pixels


def normalise(pixels: torch.Tensor, mean=BLIP_MEAN, std=BLIP_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W): (x / 255 - mean) / std, as BLIP's image processor (the
    engine's own normalisation, with BLIP's statistics by default)."""
    return preprocessing.normalise(pixels, mean, std)


class Collate:
    """Tokenises captions and normalises pixels into a `Batch`; a sample's negative caption (the one
    `CaptionDataset` drew, seeded per sample and epoch) goes into the batch's negative fields."""

    def __init__(self, tokenizer, max_tokens: int, mean=BLIP_MEAN, std=BLIP_STD, qformer_tokenizer=None,
                 prompt: tuple[str, tuple[int, ...]] | None = None):
        self.tokenizer, self.max_tokens, self.mean, self.std = tokenizer, max_tokens, mean, std
        self.qformer_tokenizer = qformer_tokenizer  # InstructBLIP: instructions go to the Q-Former too
        self.prompt = prompt  # BLIP-2's decoder-only LM: (text, its tokens) that the objective puts before captions

    def __call__(self, items: list[dict]) -> Batch:
        pixels = normalise(torch.stack([item["pixels"] for item in items]), self.mean, self.std)  # (B, 3, H, W)
        captions = [item["caption"] for item in items]
        tokens = self.tokenize(captions) if self.prompt is None else self.after_prompt(captions)
        batch = Batch(pixel_values=pixels, input_ids=tokens["input_ids"],
                      attention_mask=tokens["attention_mask"],
                      image_ids=torch.tensor([item["image_id"] for item in items], dtype=torch.long),
                      sample_ids=torch.tensor([item["sample_id"] for item in items], dtype=torch.long))
        if self.qformer_tokenizer is not None:
            self.instructions(batch, items)
        rows = [row for row, item in enumerate(items) if item.get("negative_caption")]
        if rows:
            negatives = self.tokenize([items[row]["negative_caption"] for row in rows])
            batch.negative_input_ids = negatives["input_ids"]
            batch.negative_attention_mask = negatives["attention_mask"]
            batch.negative_rows = torch.tensor(rows, dtype=torch.long)
        return batch

    def instructions(self, batch: Batch, items: list[dict]) -> None:
        """InstructBLIP: the instruction for the Q-Former and for the LM (as its tokenizer encodes it), and the
        answers as the LM continues them (its own tokens, then its end token)."""
        asked = [item["instruction"] for item in items]
        qformer = self.qformer_tokenizer(asked, padding="longest", truncation=True, max_length=self.max_tokens,
                                         return_tensors="pt")
        prompt = self.tokenize(asked)
        end = self.tokenizer.eos_token or self.tokenizer.sep_token
        answers = self.tokenizer([f"{item['caption']}{end}" for item in items], padding="longest", truncation=True,
                                 max_length=self.max_tokens, add_special_tokens=False, return_tensors="pt")
        batch.instruction_ids, batch.instruction_mask = qformer["input_ids"], qformer["attention_mask"]
        batch.prompt_ids, batch.prompt_mask = prompt["input_ids"], prompt["attention_mask"]
        batch.input_ids, batch.attention_mask = answers["input_ids"], answers["attention_mask"]

    def tokenize(self, captions: list[str]):
        return self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")

    def after_prompt(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """[BOS] caption, the caption's tokens as they come after the prompt in "prompt caption" tokenised as
        one text (LAVIS `blip2_opt`), for `objectives.with_prompt` to put the prompt's tokens back between: a
        byte-level BPE (OPT's) spells a caption's first word alone without its leading space ("a picture of"
        + "a" decoded as "ofa"), and the LM would learn to continue the prompt that way."""
        text, ids = self.prompt
        joined = self.tokenizer([f"{text} {caption}" for caption in captions], padding="longest", truncation=True,
                                max_length=self.max_tokens + len(ids), return_tensors="pt")
        input_ids, mask = joined["input_ids"], joined["attention_mask"]
        starts = input_ids[:, 1:1 + len(ids)]
        if starts.shape[1] < len(ids) or not (starts == torch.tensor(ids, dtype=starts.dtype)).all():
            raise InvalidInputError(f"objective.caption_prompt {text!r} tokenises differently before a caption than "
                                    "alone; end it at a whole word")
        keep = [0, *range(1 + len(ids), input_ids.shape[1])]  # [BOS], then the caption
        return {"input_ids": input_ids[:, keep], "attention_mask": mask[:, keep]}


class EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of one epoch, from `start` on; global batches are consecutive permutation slices.

    With `groups` (one key per sample, None for a sample of its own) the permutation is of groups, each
    group's samples kept together in their order: a scene, its mirror and its twin then mostly share a batch
    (a group that straddles two batches is split between them)."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 groups: list[str | None] | None = None):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.start = 0, 0
        self.groups: list[list[int]] | None = None
        if groups is not None:
            members: dict[object, list[int]] = {}
            for i, key in enumerate(groups):
                members.setdefault(("group", key) if key is not None else ("sample", i), []).append(i)
            self.groups = list(members.values())
        if self.batches_per_epoch == 0:
            raise InvalidInputError(f"{size} training pairs do not fill one global batch of {batch_size * world}")

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)  # the incomplete last batch is dropped

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.groups is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.tensor([i for g in torch.randperm(len(self.groups), generator=generator).tolist()
                                  for i in self.groups[g]])
        global_batch = self.batch_size * self.world
        for b in range(self.start, self.batches_per_epoch):
            first = b * global_batch + self.rank * self.batch_size
            yield order[first:first + self.batch_size].tolist()


class MixtureBatches(EpochBatches):
    """Batches of a mixture of datasets (LAVIS `MultiIterLoader`): each global batch comes from one dataset,
    drawn with probability proportional to its weight; each dataset is read in its own seeded order, again
    from the start when used up. `sizes` count the consecutive samples of each dataset (`load_mixture`).
    An epoch is as many batches as the datasets' pairs fill; the draws repeat exactly on resume."""

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int, rank: int = 0,
                 world: int = 1):
        super().__init__(sum(sizes), batch_size, seed, rank, world)
        small = [i for i, n in enumerate(sizes) if n < batch_size * world]
        if small:
            raise InvalidInputError(f"dataset {small[0] + 1} of the mixture has {sizes[small[0]]} pairs, fewer than "
                                    f"one global batch of {batch_size * world}")
        self.sizes, self.weights = sizes, torch.tensor(weights, dtype=torch.float64)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        orders = [torch.randperm(n, generator=generator).tolist() for n in self.sizes]
        cursors = [0] * len(self.sizes)
        global_batch = self.batch_size * self.world
        for b in range(self.batches_per_epoch):
            d = int(torch.multinomial(self.weights, 1, generator=generator))
            if cursors[d] + global_batch > self.sizes[d]:  # used up: the same order again
                cursors[d] = 0
            rows = orders[d][cursors[d]:cursors[d] + global_batch]
            cursors[d] += global_batch
            if b >= self.start:
                first = self.rank * self.batch_size
                yield [offsets[d] + i for i in rows[first:first + self.batch_size]]
