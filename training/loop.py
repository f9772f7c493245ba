"""The training loop: build everything from a `TrainConfig`, run optimizer steps, log, checkpoint, export.

The loop sums whatever dict of losses the objective returns; it never asks which model family runs.
Under torchrun each process trains on its slice of every global batch with DDP (see `distributed`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from blipsearch.retrieval.device import cpu_has_fast_bf16, select_device
from blipsearch.retrieval.errors import BlipsearchError, InvalidInputError, ModelLoadError

from . import checkpoint, distributed
from .checkpoint import TrainState
from .config import TrainConfig
from .data import (
    CaptionDataset,
    Collate,
    EpochBatches,
    InstructionTemplates,
    MixtureBatches,
    check_images,
    load_mixture,
    load_samples,
)
from .export import preprocessing_of, readable
from .families import FAMILIES
from .objectives import Progress, TrainingDivergedError, build_objective
from .tokenizer import kept_vocabulary, load_tokenizer, warn_unknown_words, word_tokenizer

log = logging.getLogger(__name__)


class ObjectiveModule(nn.Module):
    """model + objective as one module, so that DDP sees the objective's forward (and its gradients)."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch, progress: Progress) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch, progress)


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: TrainConfig
    output: Path
    world: distributed.World
    device: torch.device
    model: nn.Module
    tokenizer: object
    loader: torch.utils.data.DataLoader
    sampler: EpochBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    state: TrainState
    step_lr: float = 0.0  # the learning rate of the last optimizer step (the scheduler has moved on since)


def prepare_model(cfg: TrainConfig, captions: list[str], output: Path, is_main: bool,
                  resumed_run: Path | None = None):
    """(model, tokenizer) of the configured family: from a Hugging Face checkpoint, or random with the
    configured tokenizer (no tokenizer configured: a word-level vocabulary of `captions`; or the one saved in
    `output` when exporting, or in `resumed_run`, the folder of the checkpoint a run resumes, then copied into
    `output`: one built again from data changed since would hand the checkpoint's embedding rows to other
    words)."""
    family = FAMILIES[cfg.model.family]
    if family.prepare is not None:
        return family.prepare(cfg, captions, output, is_main, resumed_run=resumed_run)
    if cfg.model.init_from:
        config, state, tokenizer = family.read_checkpoint(cfg.model.init_from)
        model = family.build(cfg, tokenizer, config)
        family.load_weights(model, state)
        return model, tokenizer
    if cfg.model.tokenizer:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
    elif not captions:  # exporting a checkpoint: the run's vocabulary lies beside it
        tokenizer = load_tokenizer(str(output / "tokenizer"))
    elif resumed_run is not None and (kept := kept_vocabulary(resumed_run, output, "tokenizer")) is not None:
        tokenizer = load_tokenizer(str(kept))  # written into `output` once the checkpoint was restored
        warn_unknown_words(tokenizer, [*captions, cfg.objective.caption_prompt])
    else:  # deterministic in the captions, so every rank builds the same one
        # the prompt's words belong to the vocabulary too
        tokenizer = word_tokenizer([*captions, cfg.objective.caption_prompt],
                                   output / "tokenizer" if is_main and resumed_run is None else None)
    return family.build(cfg, tokenizer), tokenizer


def keep_vocabularies(cfg: TrainConfig, model, tokenizer, output: Path, resumed_run: Path) -> None:
    """After a checkpoint was restored: the vocabularies this run reads, written where an export of its own
    checkpoints looks for them, unless they were read from there (written before the restore, a refused
    checkpoint's would have replaced the run's own)."""
    word_level = FAMILIES[cfg.model.family].prepare is None and not (cfg.model.tokenizer or cfg.model.init_from)
    for name, vocabulary in (("tokenizer", tokenizer if word_level else None),
                             ("qformer_tokenizer", getattr(model, "qformer_tokenizer", None))):
        source = kept_vocabulary(resumed_run, output, name)
        if vocabulary is not None and (source is None or source.resolve() != (output / name).resolve()):
            vocabulary.save_pretrained(output / name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings of position/class, or the temperature (1-d or 0-d)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embedding" in name.split(".")[-1] else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup(cfg: TrainConfig, resume: str | None = None) -> Run:
    _check_output(Path(cfg.output), resume)  # before the ranks meet: none has written anything yet
    device = select_device(cfg.device)
    world = distributed.setup(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    resume_path = checkpoint.resolve_resume(resume, output)
    torch.manual_seed(cfg.seed)  # the same initial weights and queues on every rank
    if cfg.data.mixture:
        samples, sizes, weights = load_mixture(cfg.data.mixture, cfg.data.images, cfg.data.split)
    else:
        samples = load_samples(cfg.data.train, cfg.data.images, cfg.data.split)
    texts = [s.caption for s in samples] + [n for s in samples for n in s.negative_captions]  # the vocabulary
    texts += [s.instruction for s in samples if s.instruction]  # InstructBLIP's questions
    check_images(samples)  # before the model loads, not hours into the run
    model, tokenizer = prepare_model(cfg, texts, output, world.is_main,
                                     resumed_run=None if resume_path is None else Path(resume_path).parent)
    model.to(device)
    qformer_tokenizer = getattr(model, "qformer_tokenizer", None)  # InstructBLIP: each sample gets an instruction
    templates = InstructionTemplates(tuple(cfg.data.caption_instructions), tuple(cfg.data.question_templates)) \
        if qformer_tokenizer is not None else None
    dataset = CaptionDataset(samples, preprocessing_of(model.config), cfg.data.crop_scale, cfg.data.hflip, cfg.seed,
                             cfg.data.randaugment, templates)
    groups = [sample.group for sample in samples] if cfg.data.group_batches else None
    if groups is not None and not any(groups):
        raise InvalidInputError(f"data.group_batches is set, but no entry of {cfg.data.train} names a \"group\"; "
                                "make the data with `benchmarks/scenes.py dataset --groups`, or unset it")
    if cfg.data.mixture:
        sampler = MixtureBatches(sizes, weights, cfg.data.batch_size, cfg.seed, world.rank, world.size)
    else:
        sampler = EpochBatches(len(samples), cfg.data.batch_size, cfg.seed, world.rank, world.size, groups)
    # its own generator: starting an epoch's iterator must not draw from the global random state, which
    # the checkpoint restores for dropout (else a resumed run's masks would differ from an uninterrupted one's)
    collate = Collate(tokenizer, cfg.model.max_text_tokens, qformer_tokenizer=qformer_tokenizer,
                      prompt=_lm_prompt(cfg, model))
    if collate.prompt is not None:
        collate.after_prompt([samples[0].caption])  # a prompt that tokenises apart is refused here, not in a worker
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed))
    opt = cfg.optim
    total = opt.max_steps or math.ceil(opt.epochs * sampler.batches_per_epoch / opt.grad_accum)
    optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr, betas=opt.betas)
    scheduler = cosine_schedule(optimizer, opt.warmup_steps, total, opt.min_lr / opt.lr)
    state = TrainState()
    if resume_path is not None:
        state = checkpoint.restore(checkpoint.read(resume_path), model, optimizer, scheduler, resume_path,
                                   cfg.to_dict())
        log.info("resumed from %s at step %d", resume_path, state.step)
        if world.is_main:
            keep_vocabularies(cfg, model, tokenizer, output, Path(resume_path).parent)
    if resume is not None and world.is_main:  # `auto` without a checkpoint starts again from step 0
        _trim_log(output / "log.jsonl", state.step)
    log.info("%d pairs, %d batches per epoch and rank, %d optimizer steps", len(samples),
             sampler.batches_per_epoch, total)
    return Run(cfg, output, world, device, model, tokenizer, loader, sampler, optimizer, scheduler, total, state)


def _lm_prompt(cfg: TrainConfig, model) -> tuple[str, tuple[int, ...]] | None:
    """BLIP-2 stage 2 with a decoder-only LM and a caption prompt: (its text, its tokens), for the Collate to
    tokenise each caption as it reads after the prompt."""
    if cfg.model.family != "blip-2-lm" or not getattr(model, "prompt", ()) \
            or not model.config.use_decoder_only_language_model:
        return None
    return cfg.objective.caption_prompt.strip(), tuple(model.prompt)


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines after `step`: a resumed run computes those steps again and logs them anew (they were
    logged twice, with different losses). A line cut short by the interruption goes too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            entry = json.loads(line)
            keep = line.endswith("\n") and entry["step"] <= step
        except (ValueError, TypeError, KeyError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("%s: dropped %d lines after step %d, which this run computes again", path, dropped, step)


def autocast_for(run: Run):
    precision = run.cfg.optim.precision
    if precision == "auto":
        precision = "bf16" if run.device.type == "cuda" or cpu_has_fast_bf16() else "fp32"
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(run.device.type, dtype=torch.bfloat16)


def batches(run: Run):
    """This rank's batches from the saved position on, epoch after epoch; keeps `run.state` current."""
    while True:
        run.sampler.set_position(run.state.epoch, run.state.batch)
        run.loader.dataset.epoch = run.state.epoch
        try:
            for batch in run.loader:
                run.state.batch += 1
                yield batch
        except BlipsearchError as exc:  # from a loader worker, torch puts the worker's traceback in the message
            if "Original Traceback" not in str(exc):
                raise
            try:
                unwrapped = type(exc)(_worker_message(str(exc)))
            except TypeError:  # an error class of other arguments (FieldError)
                unwrapped = InvalidInputError(_worker_message(str(exc)))
            raise unwrapped from None
        run.state.epoch, run.state.batch = run.state.epoch + 1, 0


def _worker_message(message: str) -> str:
    """The error's own message: the last line of a traceback that a DataLoader worker's error carries."""
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split("Error: ", 1)[-1]


def optimizer_step(run: Run, module: nn.Module, stream) -> dict[str, torch.Tensor]:
    """grad_accum micro-batches, one optimizer step; returns the step's losses (this rank, detached)."""
    accum, totals = run.cfg.optim.grad_accum, {}
    is_ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
    for micro in range(accum):
        epoch = run.state.epoch + run.state.batch / run.sampler.batches_per_epoch
        batch = next(stream).to(run.device)
        progress = Progress(run.state.step, epoch, seed=(run.cfg.seed * 1_000_003 + run.state.step) * 64 + micro)
        sync = not is_ddp or micro == accum - 1
        with nullcontext() if sync else module.no_sync():
            with autocast_for(run):
                losses = module(batch, progress)
            (sum(losses.values()) / accum).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() / accum
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    if run.cfg.optim.clip_grad:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.clip_grad)
    else:  # a finite loss may still give inf gradients (an overflow in backward): the step would apply them
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=run.device)
    _check_finite(run, {**totals, "gradient norm": norm})
    run.step_lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return totals


def _check_finite(run: Run, losses: dict[str, torch.Tensor]) -> None:
    """A loss (or the gradient norm) that is not finite on any rank stops every rank before the step applies
    it (no checkpoint, no export of a broken model): the run diverged."""
    bad = torch.stack([~torch.isfinite(v.detach().float().to(run.device)) for v in losses.values()]).any().float()
    if float(distributed.all_reduce_sum(bad)) > 0:
        names = ", ".join(n for n, v in losses.items() if not torch.isfinite(v)) or "on another rank"
        raise TrainingDivergedError(f"the loss is not finite at step {run.state.step + 1} ({names}): the run "
                                    "diverged; lower optim.lr (or raise optim.warmup_steps, set optim.clip_grad) "
                                    "and resume from the last checkpoint with --resume auto")


def log_window(run: Run, window: list[dict[str, torch.Tensor]], bar) -> dict:
    """Mean of each loss over the window and over ranks; one log line, one JSON line, the bar's postfix."""
    names = sorted(window[0])
    means = distributed.all_reduce_mean(torch.stack([sum(w[n] for w in window) / len(window) for n in names]))
    entry = {"step": run.state.step, "epoch": round(run.state.epoch + run.state.batch /
                                                     run.sampler.batches_per_epoch, 4),
             **{n: round(float(v), 5) for n, v in zip(names, means, strict=True)},
             "loss": round(float(means.sum()), 5), "lr": run.step_lr,
             **({"temp": round(run.model.temp.item(), 5)} if hasattr(run.model, "temp") else {})}
    if run.world.is_main:
        with (run.output / "log.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        bar.set_postfix({n: f"{entry[n]:.3f}" for n in [*names, "loss"]})
        log.info("step %d  %s", run.state.step, "  ".join(f"{n} {entry[n]:.4f}" for n in [*names, "loss"]))
    return entry


def run_steps(run: Run, module: nn.Module, until: int | None = None) -> list[dict]:
    """Optimizer steps up to `until` (default: the end); checkpoints every `save_every`; returns log entries."""
    until = run.total_steps if until is None else min(until, run.total_steps)
    stream, window, entries = batches(run), [], []
    bar = tqdm(total=run.total_steps, initial=run.state.step, disable=not run.world.is_main, unit="step",
               dynamic_ncols=True)
    while run.state.step < until:
        window.append(optimizer_step(run, module, stream))
        run.state.step += 1
        bar.update(1)
        last = run.state.step == until
        if run.state.step % run.cfg.log_every == 0 or last:
            entries.append(log_window(run, window, bar))
            window = []
        if run.world.is_main and (run.state.step % run.cfg.save_every == 0 or last):
            checkpoint.save(run.output / checkpoint.LAST, run.model, run.optimizer, run.scheduler, run.state,
                            run.cfg.to_dict())
    bar.close()
    return entries


def wrap(run: Run) -> nn.Module:
    module = ObjectiveModule(run.model, build_objective(run.cfg.model.family, run.cfg.objective))
    if run.world.size == 1:
        return module
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **no_buffer_sync())


def no_buffer_sync() -> dict:
    """Queues are identical on every rank by construction; broadcasting them every step is waste
    (and would hide a bug that made them differ). torch >= 2.12 renamed the switch."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


RUN_FILES = (checkpoint.LAST, "config.json", "log.jsonl")  # what says a folder holds a run


def _check_output(output: Path, resume: str | None) -> None:
    """A fresh run (no --resume) never writes into a folder that holds a run: it replaced that run's last
    checkpoint, config and exports, and appended to its log."""
    if output.exists() and not output.is_dir():
        raise InvalidInputError(f"output {output} is a file; name a folder for the run")
    found = [name for name in RUN_FILES if (output / name).exists()]
    if resume is None and found:
        if checkpoint.LAST in found:
            raise InvalidInputError(f"output {output} already holds a training run ({', '.join(found)}); pass "
                                    "--resume auto to continue it, or another output folder")
        raise InvalidInputError(f"output {output} holds a training run that saved no checkpoint "
                                f"({', '.join(found)}); pass --resume auto to start it again there, or "
                                "another output folder")


def train(cfg: TrainConfig, resume: str | None = None, until: int | None = None) -> Path:
    """Train (or resume) and, at the end, export the retrieval model (and the captioner) under output."""
    run = setup(cfg, resume)
    if run.world.is_main:
        (run.output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    run_steps(run, wrap(run), until)
    if run.world.is_main and run.state.step >= run.total_steps:
        for folder in FAMILIES[cfg.model.family].export(run.model, run.tokenizer, run.output):
            readable(folder)
    return run.output


def export_checkpoint(path: str | Path, out: str | Path, captioner: bool = True, overwrite: bool = False
                      ) -> list[Path]:
    """Export a training checkpoint: `out/retrieval` and, for BLIP with a decoder, `out/captioner`.

    The models are written into a staging folder inside `out` first; a folder of `out` they would replace
    that is not empty is refused unless `overwrite`, and is then swapped for the new one whole (no stale file
    of an older model stays beside the new weights)."""
    from .config import from_dict

    payload = checkpoint.read(path)
    cfg = from_dict(payload["config"])
    if not captioner and FAMILIES[cfg.model.family].captioner_only:
        raise InvalidInputError(f"{path} is a {cfg.model.family} checkpoint: its export is a captioner and nothing "
                                "else; leave out --no-captioner")
    _check_run_folder(Path(path), cfg)
    try:
        model, tokenizer = prepare_model(cfg, [], Path(path).parent, is_main=False)  # the run's tokenizer/ is beside
    except ModelLoadError as exc:  # it builds the model from what the run started from, then loads the weights
        starts = [f"{k}={v}" for k, v in (("model.init_from", cfg.model.init_from), ("model.vision_from",
                  cfg.model.vision_from), ("model.language_model", cfg.model.language_model)) if v]
        if not starts:
            raise
        raise ModelLoadError(f"exporting {path} builds its model from what its run started from "
                             f"({', '.join(starts)}), and {exc}; put it back where the run found it") from exc
    checkpoint.load_weights(payload, model, path)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as exc:
        raise InvalidInputError(f"output {out}: {exc.strerror or exc}") from exc
    try:
        written = [readable(p) for p in FAMILIES[cfg.model.family].export(model, tokenizer, staging, captioner)]
        targets = [out / p.name for p in written]
        taken = [t for t in targets if t.exists() and not (t.is_dir() and not any(t.iterdir()))]
        if taken and not overwrite:
            raise InvalidInputError(f"output {out} already holds {', '.join(t.name + '/' for t in taken)}; pass "
                                    "--overwrite to replace it, or another output folder")
        for new, target in zip(written, targets, strict=True):
            try:
                if target.exists() or target.is_symlink():
                    os.replace(target, staging / f"replaced-{target.name}")  # removed with the staging folder
                os.replace(new, target)
            except OSError as exc:
                raise InvalidInputError(f"output {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def _check_run_folder(path: Path, cfg: TrainConfig) -> None:
    """A checkpoint's word-level vocabulary is not inside it: the run built it from its captions and saved it
    beside the checkpoint. (InstructBLIP's grown Q-Former vocabulary, `qformer_tokenizer/`, is needed only
    where the stage-1 tokenizer was word-level; a subword one exports without it.)"""
    own_vocabulary = FAMILIES[cfg.model.family].prepare is None and not (cfg.model.tokenizer or cfg.model.init_from)
    if own_vocabulary and not (path.parent / "tokenizer").is_dir():
        raise InvalidInputError(f"checkpoint {path}: the tokenizer/ folder its run saved is not beside it; export "
                                "it from its run folder, or copy that folder next to it")
