"""Training checkpoints that resume exactly: weights (with momentum copies and queues), optimizer,
schedule, position in the data, and the random state."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from blipsearch.retrieval.errors import InvalidInputError, first_line

log = logging.getLogger(__name__)

LAST = "checkpoint-last.pt"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch: int = 0  # this rank's batches of the current epoch already consumed


def save(path: Path, model, optimizer, scheduler, state: TrainState, config: dict) -> None:
    """Write atomically (temp file + rename), so an interrupted save never leaves a broken checkpoint."""
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "state": asdict(state), "config": config,
               "torch_rng": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    log.info("checkpoint at step %d written to %s", state.step, path)


def read(path: str | Path) -> dict:
    """A checkpoint `save` wrote. Read with torch's weights-only unpickler: tensors and plain containers
    only, so a `.pt` file from elsewhere cannot run code; anything else is one line naming the file."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickles it refuses: the one line below says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot read checkpoint {path}: {exc.strerror or first_line(exc)}") from exc
    except Exception as exc:  # pickle's, torch's and EOFError: not a file `save` wrote, or a damaged one
        raise InvalidInputError(f"cannot read checkpoint {path}: it is not a checkpoint that `blipsearch train` "
                                "wrote, or it is damaged") from exc
    if not isinstance(payload, dict) or not {"model", "config", "state"} <= payload.keys():
        raise InvalidInputError(f"{path} is not a checkpoint that `blipsearch train` wrote (it lacks the model, "
                                "config or state)")
    return payload


# what a resumed run may change: where and how it runs, how long, and the optimizer's settings (applied from
# the resumed step on: a run that diverged resumes at a lower rate); anything else changes what it trains
# (the checkpoints a run started from may move: the weights come from the checkpoint; a tokenizer or language
# model may not, as their vocabularies number the embedding rows the checkpoint holds)
RESUME_FREE = ("output", "device", "threads", "log_every", "save_every", "data.workers", "data.train", "data.images",
               "data.split", "data.mixture", "optim.epochs", "optim.max_steps", "optim.precision", "model.init_from",
               "model.vision_from", "model.qformer_from")
RESUME_APPLIED = ("optim.lr", "optim.min_lr", "optim.weight_decay", "optim.betas", "optim.warmup_steps",
                  "optim.clip_grad")


def restore(payload: dict, model, optimizer, scheduler, path: str | Path = "", config: dict | None = None
            ) -> TrainState:
    """Raises `InvalidInputError` where the checkpoint at `path` does not fit the model and optimizer, or
    where `config` (the run's, as `TrainConfig.to_dict`) changes what the checkpoint's run trained (see
    RESUME_FREE); the optimizer settings of `config` apply from here on (RESUME_APPLIED)."""
    changed = _changed(payload.get("config") or {}, config) if config is not None else []
    refused = [key for key in changed if key not in RESUME_FREE + RESUME_APPLIED]
    if refused:  # before the weights: a key that changes shapes is named, not "does not fit"
        raise InvalidInputError(f"checkpoint {path} was trained with other values of {', '.join(refused)}; resume "
                                "with the values it was trained with (its run folder's config.json), or start a "
                                "new run")
    load_weights(payload, model, path)
    try:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["torch_rng"])
        state = TrainState(**payload["state"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _foreign(path, exc) from exc
    if config is not None:  # always: a changed length (max_steps, epochs) changes the next step's rate too
        _apply_optim(optimizer, scheduler, config["optim"])
    if any(key in RESUME_APPLIED for key in changed):
        log.warning("resumed with changed %s: applied from step %d on", ", ".join(
            k for k in changed if k in RESUME_APPLIED), state.step + 1)
    return state


def _changed(saved: dict, now: dict) -> list[str]:
    """Dotted keys whose values differ, compared as values (1 and 1.0, a tuple and a list alike). A key the
    checkpoint's config lacks (written before that setting existed) counts as unchanged."""
    def flat(config: dict) -> dict:
        out = {}
        for key, value in config.items():
            if isinstance(value, dict) and key in ("model", "objective", "data", "optim"):
                out.update({f"{key}.{k}": _plain(v) for k, v in value.items()})
            else:
                out[key] = _plain(value)
        return out

    before, after = flat(saved), flat(now)
    return sorted(k for k in before.keys() & after.keys() if before[k] != after[k])


def _plain(value):
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def _apply_optim(optimizer, scheduler, optim: dict) -> None:
    """The configured peak rate, weight decay and betas replace the checkpoint's (the schedule's shape,
    warm-up and floor already come from the configuration: its function is not saved)."""
    for i, group in enumerate(optimizer.param_groups):  # `loop.param_groups`: decayed, then never decayed
        group["weight_decay"] = optim["weight_decay"] if i == 0 else 0.0
        group["betas"] = tuple(optim["betas"])
        group["initial_lr"] = optim["lr"]
    scheduler.base_lrs = [optim["lr"]] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = optim["lr"] * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def load_weights(payload: dict, model, path: str | Path = "") -> None:
    """The checkpoint's weights into `model`; `InvalidInputError` naming `path` where they do not fit it."""
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:  # missing, unexpected or other-shaped tensors
        raise _foreign(path, exc) from exc


def _foreign(path: str | Path, exc: BaseException) -> InvalidInputError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # load_state_dict's first line names the class only; its second says what did not fit
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else first_line(exc)
    return InvalidInputError(f"checkpoint {path} does not fit this run's model ({detail}): it was written by a run "
                             "of another model or configuration; resume it with the config it was trained with, "
                             "or start a new run")


def resolve_resume(resume: str | None, output: Path) -> Path | None:
    """`auto`: the output folder's last checkpoint if there is one; a path: that file; None: start fresh."""
    if resume is None:
        return None
    if resume == "auto":
        last = output / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        if path.is_dir():
            raise InvalidInputError(f"checkpoint {resume} is a folder: " + (
                f"name its checkpoint file ({path / LAST})" if (path / LAST).is_file() else
                f"it holds no {LAST} (a run writes one at its first save)"))
        raise InvalidInputError(f"checkpoint {resume} does not exist")
    return path
