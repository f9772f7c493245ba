"""`python -m blipsearch.training train CONFIG` (also under torchrun)."""

from .cli import cli

cli(prog_name="python -m blipsearch.training")
