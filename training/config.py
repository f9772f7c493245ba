"""Training configuration as data: dataclasses with commented defaults, read from a YAML or JSON file.

A config file has four sections (`model`, `objective`, `data`, `optim`) and a few top-level keys; any
key left out keeps the default below. `model.preset` fills the architecture sizes first (`tiny`,
`small`, `vit-b`, `vit-b-224`), and keys given beside it override single sizes. Overrides from the
command line use dotted keys: `optim.lr=3e-4`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blipsearch.retrieval.errors import InvalidInputError

# Architecture sizes by name. ViT-B presets follow BLIP's base models (ViT-B/16 + BERT-base):
# 224 px for pre-training, 384 px for retrieval fine-tuning.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp=64,
                 text_width=32, text_layers=2, text_heads=4, text_mlp=64, max_positions=64, embed_dim=16),
    "small": dict(image_size=64, patch_size=8, vision_width=192, vision_layers=4, vision_heads=3,
                  vision_mlp=768, text_width=192, text_layers=3, text_heads=3, text_mlp=768,
                  max_positions=64, embed_dim=128),
    "vit-b": dict(image_size=384, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                  vision_mlp=3072, text_width=768, text_layers=12, text_heads=12, text_mlp=3072,
                  max_positions=512, embed_dim=256),
}
PRESETS["vit-b-224"] = {**PRESETS["vit-b"], "image_size": 224}
# BLIP-2's Q-Former is BERT-base (LAVIS initialises it from bert-base-uncased); its ViT comes from `vision_from`
PRESETS["qformer-base"] = dict(text_width=768, text_layers=12, text_heads=12, text_mlp=3072, max_positions=512,
                               embed_dim=256)
# The losses each family's objective computes (all weighted 1.0 unless objective.losses says otherwise)
FAMILY_LOSSES: dict[str, tuple[str, ...]] = {"blip": ("itc", "itm", "lm"), "blip-2": ("itc", "itm", "itg"),
                                             "blip-2-lm": ("lm",), "instructblip": ("lm",)}


@dataclass
class ModelConfig:
    # model + objective: blip | blip-2 (stage 1: Q-Former ITC, ITM, ITG) | blip-2-lm (stage 2) | instructblip
    family: str = "blip"
    preset: str | None = None  # fills the sizes below first, see PRESETS
    init_from: str | None = None  # a Hugging Face BLIP checkpoint (hub id or directory); sizes then come from it
    tokenizer: str | None = None  # tokenizer directory or hub id; None: a word-level vocabulary of the captions
    image_size: int = 384  # input side in pixels
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    max_positions: int = 512  # text position embeddings
    embed_dim: int = 256  # ITC embedding size (vision_proj / text_proj output)
    max_text_tokens: int = 35  # captions are cut to this many tokens, as in BLIP's retrieval evaluation
    text_dropout: float = 0.1  # hidden and attention dropout of the text side (BLIP's med_config; the Q-Former's)
    # a ViT trained from scratch starts its (learned) position embedding at: "random" (transformers' default,
    # std 0.02 here) or "sincos" (2-D sine-cosine codes of each patch's column and row, as MAE's): see model.py
    vision_position_init: str = "random"
    # BLIP: keep the ViT as `init_from` has it (no gradient, bit-identical in the export), e.g. so that a BLIP-2
    # model trained on that ViT (`vision_from`) still reads the same tokens
    freeze_vision: bool = False
    # BLIP-2 only. The text_* sizes above describe the Q-Former (a BERT); vision_* a random ViT when no
    # checkpoint gives one (tests). The ViT is frozen: the Q-Former learns to read it.
    vision_from: str | None = None  # BLIP or BLIP-2 checkpoint whose ViT is the frozen image encoder
    # the Q-Former's start: a BERT checkpoint (LAVIS: bert-base-uncased), or a BLIP retrieval checkpoint whose
    # text encoder brings its cross-attention and ITC text projection too (e.g. the one `vision_from` names)
    qformer_from: str | None = None
    num_query_tokens: int = 32  # learned queries: Q image vectors for ITC, Q outputs for ITM
    cross_attention_frequency: int = 2  # Q-Former layers 0, f, 2f, ... cross-attend the ViT tokens
    train_vision_norm: bool = False  # train the ViT's last LayerNorm (LAVIS's `ln_vision`, new in stage 1)
    # BLIP-2 stage 2 (blip-2-lm) and InstructBLIP (instructblip): init_from is the stage-1 checkpoint (ViT, queries,
    # Q-Former and its tokenizer); the LM is frozen
    language_model: str | None = None  # the LM and its tokenizer (hub id or directory): decoder-only (OPT) or T5


@dataclass
class ObjectiveConfig:
    losses: dict[str, float] = field(default_factory=lambda: {"itc": 1.0, "itm": 1.0, "lm": 1.0})  # name: weight
    temperature: float = 0.07  # initial ITC temperature; learnable, clamped to 0.001..0.5
    momentum: float = 0.995  # momentum encoders: m = momentum * m + (1 - momentum) * online
    queue_size: int = 57600  # momentum features kept as extra ITC keys (0: current global batch only)
    alpha: float = 0.4  # momentum distillation weight of the momentum encoders' soft targets
    alpha_ramp_epochs: float = 1.0  # alpha rises linearly from 0 over this many epochs (BLIP: the first)
    positives: str = "image"  # "image": captions of the same image are positives (fine-tuning); "pair": only
    label_smoothing: float = 0.1  # LM / ITG loss; BLIP-2's ITC targets too (LAVIS)
    # BLIP's captioner fine-tuning starts every caption with "a picture of " and masks it from the LM loss; the
    # exported captioner then generates after it. "" (BLIP's pre-training): no prompt.
    caption_prompt: str = ""
    # weight of `itm_neg_loss`: ITM ranks an image's caption above one of its entry's `negative_captions`, e.g.
    # the caption with its two things exchanged; 0: off (batches' negative captions are ignored)
    caption_negatives: float = 0.0


@dataclass
class DataConfig:
    # annotation JSON (LAVIS or Karpathy form) or a folder of images with .txt captions beside, or a list of
    # such sources read as one dataset (their pairs shuffled together; groups stay within their own source)
    train: str | tuple[str, ...] = ""
    # several datasets instead of `train`: source -> sampling weight (null: the square root of its size); each
    # batch comes from one of them (InstructBLIP's mixture)
    mixture: dict[str, float | None] = field(default_factory=dict)
    images: str | None = None  # folder that JSON image paths are relative to (default: the JSON's folder/images)
    split: str = "train"  # split to read from a Karpathy file
    batch_size: int = 32  # per process; the global batch is batch_size x processes
    workers: int = 2  # DataLoader worker processes
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop area range; (1, 1) turns it off
    hflip: bool = False  # horizontal flips swap "left" and "right", so they are off by default
    randaugment: bool = False  # BLIP's RandomAugment(2, 5) after crop and flip (training/randaugment.py)
    group_batches: bool = False  # batch the pairs of one annotation "group" together (a scene, its mirror, its twin)
    # InstructBLIP: an entry's "instruction" (a question) goes into one of question_templates ("{}" marks where);
    # an entry without one (a caption) gets one of caption_instructions; drawn per sample and epoch
    caption_instructions: tuple[str, ...] = ("A short image caption:", "A short image description:",
                                             "Write a short description for the image.",
                                             "Briefly describe the content of the image.")
    question_templates: tuple[str, ...] = ("{}", "Question: {} Short answer:",
                                           "Given the image, answer the following question with no more than "
                                           "three words. {}")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate (after warmup)
    min_lr: float = 0.0  # the cosine schedule ends here
    weight_decay: float = 0.05  # AdamW; not applied to biases, norms, embeddings of position/class, temperature
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1000
    epochs: float = 6.0  # training length, unless max_steps is set
    max_steps: int | None = None  # optimizer steps; overrides epochs
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max gradient norm
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto" (bf16 on CUDA and on CPUs with bf16 units)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output: str = "runs/blip"  # checkpoints, logs and the exported models go here
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (under torchrun: the local rank's GPU)
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    log_every: int = 20  # optimizer steps between log lines
    save_every: int = 500  # optimizer steps between checkpoints (one is always written at the end)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML/JSON file (None: all defaults), apply `section.key=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read(Path(path))
    for item in overrides:
        _apply_override(data, item)
    config = from_dict(data)
    validate(config)
    return config


def from_dict(data: dict[str, Any]) -> TrainConfig:
    sections = {"model": ModelConfig, "objective": ObjectiveConfig, "data": DataConfig, "optim": OptimConfig}
    top = {k: v for k, v in data.items() if k not in sections}
    for name in sections:  # `model: 5` was a traceback ('int' object has no attribute 'get')
        if not isinstance(data.get(name) or {}, dict):
            raise InvalidInputError(f"{name} must be a mapping of keys (key: value, ...), not {data[name]!r}")
    parts = {}
    family = (data.get("model") or {}).get("family", ModelConfig.family)
    for name, cls in sections.items():
        values = dict(data.get(name) or {})
        if name == "objective" and family in FAMILY_LOSSES:  # the family's losses unless the file names some
            values.setdefault("losses", dict.fromkeys(FAMILY_LOSSES[family], 1.0))
        if name == "model" and values.get("preset") is not None:
            preset = PRESETS.get(values["preset"]) if isinstance(values["preset"], str) else None
            if preset is None:
                raise InvalidInputError(f"model.preset must be one of {', '.join(PRESETS)}, not {values['preset']!r}")
            values = {**preset, **values}
        parts[name] = _build(cls, values, name)
    return _build(TrainConfig, {**top, **parts}, "config")


def _build(cls, values: dict[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise InvalidInputError(f"unknown {where} key(s) {', '.join(unknown)}; known: {', '.join(names)}")
    for key, value in values.items():
        annotation = str(names[key].type)
        if isinstance(value, list):  # YAML/JSON have no tuples
            values[key] = value = tuple(value)
        if annotation.startswith("tuple[float") and isinstance(value, tuple):  # YAML reads 1e-4 as a string
            values[key] = tuple(_float(v, f"{where}.{key}") if isinstance(v, str) else v for v in value)
        elif annotation.startswith("dict[str, float") and isinstance(value, dict):
            values[key] = {k: _float(v, f"{where}.{key}") if isinstance(v, str) else v for k, v in value.items()}
        elif isinstance(value, str) and annotation.startswith("float"):
            values[key] = _float(value, f"{where}.{key}")  # YAML reads 1e-4 (no dot) as a string
        elif value is None and annotation == "str":
            values[key] = ""  # `--set key=` (YAML reads nothing as null): the empty string
        _check_type(f"{where}.{key}" if where != "config" else key, annotation, values[key])
    return cls(**values)


# a field's plain type -> the values it takes, and how a message names them
_PLAIN = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
          "str": ((str,), "a string")}
_PLURAL = {"int": "whole numbers", "float": "numbers", "bool": "true or false values", "str": "strings"}


def _check_type(key: str, annotation: str, value: Any) -> None:
    """Refuse a value of the wrong kind for a field typed int, float, bool or str (each maybe `| None`), a
    tuple or a dict of them, in one line: a string where a step count goes, or a number where a pair goes,
    once ended in a traceback from deep inside the run."""
    if annotation.startswith(("tuple[", "dict[")):
        _check_container(key, annotation, value)
        return
    optional = annotation.endswith(" | None")
    plain = _PLAIN.get(annotation.removesuffix(" | None"))
    if plain is None or (value is None and optional):
        return
    kinds, what = plain
    if not _is(value, kinds):
        raise InvalidInputError(f"{key} must be {what}{' (or null)' if optional else ''}, not {value!r}")


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _check_container(key: str, annotation: str, value: Any) -> None:
    """`tuple[float, float]`, `tuple[str, ...]`, `dict[str, float]`, `dict[str, float | None]`."""
    inner = [part.strip() for part in annotation[annotation.index("[") + 1:-1].split(",")]
    if annotation.startswith("dict["):
        optional = inner[1].endswith(" | None")
        kinds, what = _PLAIN[inner[1].removesuffix(" | None")][0], _PLURAL[inner[1].removesuffix(" | None")]
        if not isinstance(value, dict) or not all(isinstance(k, str) and (_is(v, kinds) or (optional and v is None))
                                                  for k, v in value.items()):
            raise InvalidInputError(f"{key} must map names to {what}{' (or null)' if optional else ''} "
                                    f"({{name: 1.0, ...}}), not {value!r}")
        return
    count = None if inner[-1] == "..." else len(inner)
    kinds, what = _PLAIN[inner[0]][0], _PLURAL[inner[0]]
    if not isinstance(value, tuple) or (count is not None and len(value) != count) \
            or not all(_is(v, kinds) for v in value):
        raise InvalidInputError(f"{key} must be a list of {count or 'any number of'} {what}, not {value!r}")


def _float(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError(f"{key} must be a number, not {text!r}") from None


def validate(config: TrainConfig) -> None:
    family = config.model.family
    if family not in FAMILY_LOSSES:
        raise InvalidInputError(f"model.family must be one of {', '.join(FAMILY_LOSSES)}, not {family!r}")
    losses = FAMILY_LOSSES[family]
    unknown = sorted(set(config.objective.losses) - set(losses))
    if unknown or not config.objective.losses:
        raise InvalidInputError(f"objective.losses must name some of {', '.join(losses)}; got {unknown or 'none'}")
    if family == "blip-2":
        validate_blip2(config.model)
    elif family in ("blip-2-lm", "instructblip"):
        if not (config.model.init_from and config.model.language_model):
            raise InvalidInputError(f"model.family {family} needs model.init_from (a stage-1 BLIP-2 checkpoint) "
                                    "and model.language_model (a language model)")
        if family == "instructblip" and not (config.data.caption_instructions and config.data.question_templates
                                             and all("{}" in t for t in config.data.question_templates)):
            raise InvalidInputError("data.caption_instructions and data.question_templates must be non-empty, and "
                                    "every question template must hold {} where the question goes")
    elif config.model.vision_from or config.model.qformer_from:
        raise InvalidInputError("model.vision_from and model.qformer_from are for model.family blip-2")
    data = config.data
    if data.train is not None and not isinstance(data.train, str) and not (
            isinstance(data.train, tuple) and all(isinstance(one, str) and one for one in data.train)):
        raise InvalidInputError("data.train must be a path, or a list of paths read as one dataset")
    if data.mixture and (data.train or data.group_batches):
        raise InvalidInputError("data.mixture replaces data.train (and cannot group batches); set one of them")
    if any(w is not None and (not isinstance(w, int | float) or w <= 0) for w in data.mixture.values()):
        raise InvalidInputError("data.mixture weights must be positive numbers, or null for the square root of "
                                "the dataset's size")
    if config.model.vision_position_init not in ("random", "sincos"):
        raise InvalidInputError("model.vision_position_init must be 'random' or 'sincos'")
    if config.model.vision_position_init != "random" and (family != "blip" or config.model.init_from):
        raise InvalidInputError("model.vision_position_init is for a BLIP ViT trained from scratch (family blip, "
                                "no model.init_from); a loaded or frozen ViT keeps its own position embedding")
    if config.model.freeze_vision and (family != "blip" or not config.model.init_from):
        raise InvalidInputError("model.freeze_vision is for a BLIP model fine-tuned from model.init_from (a BLIP-2 "
                                "image encoder is always frozen)")
    if not 0.0 <= config.model.text_dropout < 1.0:
        raise InvalidInputError("model.text_dropout must be in [0, 1)")
    if config.objective.caption_negatives < 0 or (config.objective.caption_negatives > 0
                                                  and "itm" not in config.objective.losses):
        raise InvalidInputError("objective.caption_negatives must be 0 (off) or positive with itm in objective.losses")
    if config.objective.positives not in ("image", "pair"):
        raise InvalidInputError("objective.positives must be 'image' or 'pair'")
    if config.optim.precision not in ("auto", "bf16", "fp32"):
        raise InvalidInputError("optim.precision must be auto, bf16 or fp32")
    if config.data.batch_size < 2:
        raise InvalidInputError("data.batch_size must be at least 2: ITC and ITM need negatives in the batch")
    if config.optim.lr <= 0 or config.optim.min_lr > config.optim.lr:
        raise InvalidInputError("optim.lr must be positive and at least optim.min_lr")
    if config.optim.grad_accum < 1:
        raise InvalidInputError("optim.grad_accum must be at least 1")
    if config.optim.max_steps is not None and config.optim.max_steps < 1:
        raise InvalidInputError("optim.max_steps must be at least 1 (or null: optim.epochs decides)")
    if config.optim.epochs <= 0 or config.optim.warmup_steps < 0:
        raise InvalidInputError("optim.epochs must be positive and optim.warmup_steps at least 0")
    if config.save_every < 1 or config.log_every < 1:
        raise InvalidInputError("save_every and log_every must be at least 1")
    if config.objective.queue_size < 0 or config.data.workers < 0:
        raise InvalidInputError("objective.queue_size and data.workers must be at least 0")
    _check_ranges(config)


def _check_ranges(config: TrainConfig) -> None:
    """Values of the right kind but outside what the model and the losses accept: each was a traceback from
    deep inside the run (or a run that trained on nonsense, a negative temperature clamped to 0.001)."""
    model, objective, data, optim = config.model, config.objective, config.data, config.optim
    checks = (
        (0.0 <= objective.label_smoothing < 1.0, "objective.label_smoothing must be in [0, 1)"),
        (0.0 <= objective.momentum <= 1.0, "objective.momentum must be in [0, 1]"),
        (0.0 <= objective.alpha <= 1.0, "objective.alpha must be in [0, 1]"),
        (objective.alpha_ramp_epochs >= 0, "objective.alpha_ramp_epochs must be at least 0"),
        (0.001 <= objective.temperature <= 0.5, "objective.temperature must be in [0.001, 0.5] (it is clamped there)"),
        (model.embed_dim >= 1 and model.max_text_tokens >= 2,
         "model.embed_dim must be at least 1 and model.max_text_tokens at least 2 ([CLS] or [ENC], and [SEP])"),
        (model.max_positions >= model.max_text_tokens + 1,
         "model.max_positions must exceed model.max_text_tokens (a caption's tokens, and the decoder's [DEC])"),
        (all(w >= 1 and h >= 1 and w % h == 0 for w, h in ((model.text_width, model.text_heads),
                                                          (model.vision_width, model.vision_heads))),
         "model.text_width and model.vision_width must be positive multiples of model.text_heads and "
         "model.vision_heads"),
        (0.0 < data.crop_scale[0] <= data.crop_scale[1] <= 1.0,
         "data.crop_scale must be [low, high] with 0 < low <= high <= 1"),
        (optim.clip_grad is None or optim.clip_grad > 0, "optim.clip_grad must be positive (or null: no clipping)"),
        (all(0.0 <= b < 1.0 for b in optim.betas), "optim.betas must each be in [0, 1)"),
        (optim.weight_decay >= 0, "optim.weight_decay must be at least 0"),
        (config.threads is None or config.threads >= 1, "threads must be at least 1 (or null: torch's default)"),
    )
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(message)


def validate_blip2(model: ModelConfig) -> None:
    if model.num_query_tokens < 1 or model.cross_attention_frequency < 1:
        raise InvalidInputError("model.num_query_tokens and model.cross_attention_frequency must be at least 1")
    if model.init_from and (model.vision_from or model.qformer_from):
        raise InvalidInputError("model.init_from (a BLIP-2 checkpoint) brings its own ViT and Q-Former; "
                                "leave model.vision_from and model.qformer_from unset")


def _read(path: Path) -> dict[str, Any]:
    import yaml  # a dependency of transformers

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"config file {path} is not UTF-8 text (byte {exc.start + 1}); save it as UTF-8"
                                ) from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"config file {path} cannot be parsed: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {path} must hold a mapping of sections")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise InvalidInputError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # `--set data.train.x=1` where data.train is a path
            raise InvalidInputError(f"override {item!r}: {'.'.join(parents[:i + 1])} is a value, not a section "
                                    "with keys")
    node[leaf] = yaml.safe_load(raw)  # numbers, booleans, lists and null parse as in the file
