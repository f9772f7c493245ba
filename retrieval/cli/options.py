"""Options shared by several commands, and the loading they imply."""

from __future__ import annotations

import click

from ..device import DEVICES, PRECISIONS


def not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An option given as "" is refused: `--index "$UNSET"` in a script would otherwise fall back to the
    default index (or model) and write to or search that one."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty: name one, or leave the option out for the default")
    return value


index_option = click.option(
    "--index", "index_path", metavar="FOLDER|s3://BUCKET/PREFIX", envvar="BLIPSEARCH_INDEX", callback=not_empty,
    help="Index folder, or a prefix in S3-compatible object storage. Default: $BLIPSEARCH_INDEX, else the user "
         "data folder (see `blipsearch status`).")
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="auto picks cuda, then mps, then cpu.")
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="auto: bf16 on CPUs with bf16 units and on recent GPUs, fp16 on other GPUs, else fp32; a `query` of "
         "texts with a BLIP model on an x86 Linux CPU: fp32 in numpy, without torch (it starts faster). int8 (CPU): "
         "fp32 with the image encoder's linear layers in int8, indexing 1.3-1.6x faster on an AVX2 CPU, checked "
         "against fp32 on the first batch (a captioner runs fp32).")


def model_option(help_text: str):
    return click.option("--model", "model_name", metavar="HUB_ID|DIR", default=None, callback=not_empty,
                        help=help_text)


def index_location(index_path: str | None):
    """The `Location` of --index (a folder or s3://bucket/prefix)."""
    from blipsearch.indexer.location import location_of
    from blipsearch.indexer.manifest import default_location

    return location_of(index_path or default_location())


def load(model_name: str, device: str, precision: str, with_vision: bool = True):
    from ..models import load_model

    return load_model(model_name, device=device, precision=precision, with_vision=with_vision)
