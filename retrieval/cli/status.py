"""`blipsearch status`"""

from __future__ import annotations

import json

import click

from ..errors import one_line
from . import main
from .options import index_location, index_option


@main.command("status")
@index_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def status_command(index_path, as_json):
    """Where the index is, which model built it, how many images it holds and its size on disk.

    The tables and feature files are checked too: a damaged index is reported as such (exit status 1).
    """
    from ..api import index_status

    report, damage = index_status(index_location(index_path))
    if as_json:
        click.echo(json.dumps(report))
    else:
        _print_report(report)
    if damage is not None:
        raise damage


def _print_report(report: dict) -> None:
    files, images, size = report["files"], report["images"], report["bytes"]
    per_image = f" (~{size / images / 1024:.0f} KB per image)" if images else ""
    for label, value in (
        ("index", report["index"]),
        ("model", f"{report['model']} ({report['family']}, revision {report['revision']})"),
        ("images", "unknown: the index is damaged" if files is None else f"{files} files, {images} distinct images"),
        ("captions", "unknown: the index is damaged" if report["captions"] is None else
         f"{report['captions']} by {report['captioner']}" if report["captioner"] else
         f"{report['captions']} (captioning is off)" if report["captions"] else "off (`index --captions` writes them)"),
        ("size", f"{_human(size)} on disk{per_image}"),
        ("updated", report["updated"] or "never"),
    ):
        click.echo(f"{label:8} {one_line(value)}")
    if report["damaged"]:
        click.echo("damaged  yes: see the error below")
    elif report["interrupted"]:
        click.echo("note     an indexing run is under way, or the last one was interrupted: run "
                   "`blipsearch index` on your folders again to finish it")
    elif report["snapshot"] is False:
        click.echo("note     the snapshot queries read is missing or damaged, so they read the tables (slower): "
                   "run `blipsearch index` on your folders again to rewrite it")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
