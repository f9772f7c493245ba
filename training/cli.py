"""Click commands of the training package: `train`, `capfilt`, `export`, `train-lm`.

They attach to `blipsearch` (the engine's CLI) and also run as `python -m blipsearch.training ...`, which
is what `torchrun` starts: `torchrun --nproc_per_node 2 -m blipsearch.training train CONFIG`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from blipsearch.retrieval.cli import EXIT_SKIPPED
from blipsearch.retrieval.errors import BlipsearchError


def _show_training_logs() -> None:
    """Per-loss log lines are the point of `train`: show them even at the CLI's default verbosity."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger = logging.getLogger("blipsearch.training")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set optim.lr=3e-4 --set data.train=pairs.json (repeatable).")
@click.option("--output", type=click.Path(file_okay=False), help="Run folder (overrides the config's output).")
@click.option("--resume", metavar="auto|CHECKPOINT",
              help="Continue a run: 'auto' takes OUTPUT/checkpoint-last.pt when there is one.")
def train_command(config: str | None, overrides: tuple[str, ...], output: str | None, resume: str | None) -> None:
    """Train or fine-tune BLIP, BLIP-2 stage 1 (model.family: blip-2), BLIP-2 stage 2 (blip-2-lm) or
    InstructBLIP (instructblip) from a YAML/JSON CONFIG (see training/configs/).

    Writes checkpoints and log.jsonl to the run folder, then the exported Hugging Face models: OUTPUT/retrieval
    (for `blipsearch index --model`; BLIP and BLIP-2 stage 1) and OUTPUT/captioner (for `blipsearch index
    --captions --captioner`; BLIP with a decoder, stage 2 and InstructBLIP).
    """
    from . import distributed
    from .config import load_config
    from .loop import train

    _show_training_logs()
    cfg = load_config(config, [*overrides, *([f"output={output}"] if output else [])])
    if not cfg.data.train and not cfg.data.mixture:
        raise BlipsearchError("no training data: set data.train (or data.mixture) in CONFIG or pass "
                              "--set data.train=FILE_OR_FOLDER")
    try:
        path = train(cfg, resume=resume)
        is_main = distributed.current().is_main
    finally:
        distributed.teardown()
    if is_main:
        for name, use in (("retrieval", "blipsearch index --model"), ("captioner", "blipsearch index --captioner")):
            if (path / name).is_dir():  # stage 2 and InstructBLIP export a captioner alone
                click.echo(f"{name} model: {path / name}  ({use})")


@click.command("capfilt")
@click.argument("source", type=click.Path(exists=True))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--captioner", required=True, help="BlipForConditionalGeneration checkpoint (directory or hub id).")
@click.option("--filter", "filter_model", required=True, help="Retrieval checkpoint whose ITM head filters.")
@click.option("--images", type=click.Path(file_okay=False), help="Folder that SOURCE's image paths are relative to.")
@click.option("--split", default="train", show_default=True, help="Split of a Karpathy SOURCE.")
@click.option("--samples", type=click.IntRange(1), default=1, show_default=True, help="Synthetic captions per image.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Nucleus sampling mass.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Keep captions whose ITM match probability is above.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
def capfilt_command(source, out, captioner, filter_model, images, split, samples, top_p, threshold, device,
                    seed) -> None:
    """Caption the images of SOURCE (annotation JSON or caption folder), filter web and synthetic captions
    with ITM, and write the kept pairs to OUT as a LAVIS training JSON."""
    from blipsearch.retrieval.device import select_device
    from blipsearch.retrieval.models import load_model

    from .capfilt import Captioner, capfilt

    _show_training_logs()
    torch_device = select_device(device)
    report = capfilt(source, out, Captioner(captioner, torch_device), load_model(filter_model, torch_device),
                     images=images, split=split, samples=samples, top_p=top_p, threshold=threshold, seed=seed)
    click.echo(f"{report.images} images: kept {report.web_kept}/{report.web_total} web and "
               f"{report.synthetic_kept}/{report.synthetic_total} synthetic captions -> {out}"
               + (f"; skipped {report.skipped} images that cannot be read (each named above)" if report.skipped
                  else ""))
    if report.skipped:
        sys.exit(EXIT_SKIPPED)


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--captioner/--no-captioner", default=True, show_default=True,
              help="Also write OUT/captioner when the model has a decoder.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT/retrieval and OUT/captioner when they exist (each swapped whole for the new one).")
def export_command(checkpoint: str, out: str, captioner: bool, overwrite: bool) -> None:
    """Export a training CHECKPOINT to Hugging Face format: OUT/retrieval (+ OUT/captioner)."""
    from .loop import export_checkpoint

    for path in export_checkpoint(checkpoint, out, captioner, overwrite):
        click.echo(str(Path(path)))


@click.command("train-lm")
@click.argument("annotations", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--steps", type=click.IntRange(1), default=1500, show_default=True)
@click.option("--hidden", type=click.IntRange(8), default=128, show_default=True, help="Width of the model.")
@click.option("--layers", type=click.IntRange(1), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT where it holds files (swapped whole for the new model).")
def train_lm_command(annotations: str, out: str, steps: int, hidden: int, layers: int, seed: int,
                     overwrite: bool) -> None:
    """Pre-train a small language model (an OPT over the words of ANNOTATIONS' captions and question/answer
    texts) for offline BLIP-2 stage 2 and InstructBLIP runs: their `model.language_model`."""
    from .text_lm import TextLMConfig, pretrain_lm, texts_of

    _show_training_logs()
    heads = 4 if hidden % 4 == 0 else 1
    path = pretrain_lm(texts_of(annotations), out, TextLMConfig(hidden=hidden, layers=layers, heads=heads,
                                                                ffn=4 * hidden, steps=steps, seed=seed),
                       overwrite)
    click.echo(str(path))


COMMANDS = (train_command, capfilt_command, export_command, train_lm_command)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BlipsearchError as exc:  # one line, exit status 1, as the blipsearch CLI
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """BLIP training: pre-train or fine-tune, bootstrap captions (CapFilt), export to Hugging Face format."""
    import os

    from ..retrieval.device import keep_freed_memory

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()  # large activations reuse freed memory instead of faulting in fresh pages


for _command in COMMANDS:
    cli.add_command(_command)
