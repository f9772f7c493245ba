"""`blipsearch status`"""

from __future__ import annotations

import json

import click

from . import main
from .options import index_location, index_option


@main.command("status")
@index_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def status_command(index_path, as_json):
    """Where the index is, which model built it, how many images it holds and its size on disk."""
    from blipsearch.indexer.reader import IndexReader

    location = index_location(index_path)
    store = IndexReader.open(location)
    files, images = store.counts()
    size = store.disk_bytes()
    manifest = store.manifest
    report = {
        "index": str(location), "model": manifest["model"]["id"], "revision": manifest["model"]["revision"],
        "files": files, "images": images, "bytes": size, "updated": manifest.get("updated"),
        "interrupted": store.interrupted,
        "embedding_dim": manifest["embedding"]["dim"], "feature_shape": [manifest["features"]["tokens"],
                                                                          manifest["features"]["dim"]],
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    per_image = f" (~{size / images / 1024:.0f} KB per image)" if images else ""
    for label, value in (
        ("index", report["index"]),
        ("model", f"{report['model']} (revision {report['revision']})"),
        ("images", f"{files} files, {images} distinct images"),
        ("size", f"{_human(size)} on disk{per_image}"),
        ("updated", report["updated"] or "never"),
    ):
        click.echo(f"{label:8} {value}")
    if store.interrupted:
        click.echo("note     an indexing run is under way, or the last one was interrupted: run "
                   "`blipsearch index` on your folders again to finish it")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
