"""`blipsearch query TEXT`"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..errors import InvalidInputError, printable
from . import main
from .options import device_option, index_location, index_option, load, model_option, precision_option


@main.command("query")
@click.argument("text", required=False)
@click.option("--image", "image_path", type=click.Path(path_type=Path), default=None,
              help="Query by an image instead of text (ITC similarity, no re-rank).")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="How many results.")
@click.option("--candidates", type=click.IntRange(1), default=64, show_default=True,
              help="ITC recall depth: how many images the ITM head re-ranks.")
@click.option("--no-rerank", is_flag=True, help="Rank by ITC cosine only (faster, less precise).")
@click.option("--min-prob", type=click.FloatRange(0, 1), default=None,
              help="Drop results whose ITM match probability is below P.")
@click.option("--in", "under", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Only results under DIR.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--paths", "as_paths", is_flag=True, help="Only paths, one per line, best first.")
@click.option("-0", "--null", "null", is_flag=True,
              help="Paths only, each ended by a NUL byte, not a newline (for `xargs -0`: names may hold newlines).")
@model_option("Model to query with. Default: the one the index was built with.")
@index_option
@device_option
@precision_option
def query_command(text, image_path, top, candidates, no_rerank, min_prob, under, as_json, as_paths, null,
                  model_name, index_path, device, precision):
    """Find the images that best match TEXT (or --image).

    Recall ranks every image by ITC similarity; the ITM head then re-ranks the best --candidates with
    cross-attention over their stored features. score = ITM match logit + ITC cosine, as in BLIP.
    """
    from blipsearch.indexer.manifest import check_model
    from blipsearch.indexer.reader import IndexReader

    from ..search import Searcher, SearchOptions

    if (text is None) == (image_path is None):
        raise InvalidInputError("give either a query TEXT or --image PATH")
    if image_path is not None and min_prob is not None:
        raise InvalidInputError("--min-prob filters on the ITM match probability of a text query; "
                                "--image ranks by ITC similarity only")
    as_paths = as_paths or null
    if as_json and as_paths:
        raise InvalidInputError("--json and --paths (or --null) exclude each other")
    folders = [_folder(under)] if under is not None else None
    options = SearchOptions(top=top, candidates=candidates, rerank=not no_rerank and text is not None,
                            min_prob=min_prob, under=folders)
    location = index_location(index_path)
    store = IndexReader.open(location)
    if store.counts()[1] == 0:
        raise InvalidInputError(f"the index at {location} is empty; add images with `blipsearch index FOLDER`")
    model = load(model_name or store.manifest.identity.model_id, device, precision,
                 with_vision=image_path is not None)
    check_model(store.manifest, model.info, location)
    searcher = Searcher(model, store)
    hits = (searcher.search_text(text, options) if text is not None
            else searcher.search_image(_query_pixels(model, image_path), options))
    paths = store.paths_by_hash([h.key for h in hits])
    rows = _rows(hits, paths, folders)
    query = text if text is not None else str(image_path)
    if as_paths:
        _print_paths(rows, b"\0" if null else b"\n")
    elif as_json:
        _print_json(query, model.info.model_id, rows)
    else:
        _print_table(rows)


def _folder(under: Path) -> str:
    path = under.expanduser().resolve()
    if not path.is_dir():
        raise InvalidInputError(f"--in {under}: no such folder")
    return str(path)


def _query_pixels(model, image_path: Path):
    from blipsearch.indexer.images import load_image

    from ..errors import ImageLoadError

    try:
        loaded = load_image(image_path, model.info.preprocessing)
    except ImageLoadError as exc:
        raise InvalidInputError(f"--image {image_path}: {exc}") from exc
    return model.pixel_values([loaded.pixels])


def _rows(hits, paths, folders) -> list[tuple]:
    """(hit, its files) best first; copies outside `--in` folders are not shown."""
    from blipsearch.indexer.scan import is_under

    rows = []
    for hit in hits:
        files = [p for p in paths.get(hit.key, []) if folders is None or is_under(p, folders)]
        if files:
            rows.append((hit, files))
    return rows


def _print_paths(rows, end: bytes) -> None:
    """The paths' own bytes, so that any name a file system allows reaches `xargs` intact."""
    sys.stdout.flush()
    for _, files in rows:
        sys.stdout.buffer.write(os.fsencode(files[0]) + end)
    sys.stdout.buffer.flush()


def _print_json(query: str, model_id: str, rows) -> None:
    """Valid UTF-8 JSON for any name: bytes that are not UTF-8 appear as \\xNN escapes."""
    results = [{"path": printable(files[0]), "score": round(hit.score, 6), "itc": round(hit.itc, 6),
                "itm_prob": None if hit.itm_prob is None else round(hit.itm_prob, 6)}
               | ({"copies": [printable(p) for p in files[1:]]} if len(files) > 1 else {}) for hit, files in rows]
    answer = {"query": printable(query), "model": printable(model_id), "results": results}
    click.echo(json.dumps(answer, ensure_ascii=False))


def _print_table(rows) -> None:
    if not rows:
        click.echo("no matching images", err=True)
        return
    click.echo(f"{'#':>3}  {'score':>7}  {'match':>5}  path")
    for rank, (hit, files) in enumerate(rows, 1):
        match = "    -" if hit.itm_prob is None else f"{hit.itm_prob:5.0%}"
        extra = f"  (+{len(files) - 1} copies)" if len(files) > 1 else ""
        name = printable(files[0]).replace("\n", "\\n")  # one line per result
        click.echo(f"{rank:>3}  {hit.score:7.3f}  {match}  {name}{extra}")
