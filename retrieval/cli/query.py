"""`blipsearch query TEXT`"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import InvalidInputError, one_line, printable
from . import finished_read_only, main
from .options import device_option, index_location, index_option, model_option, precision_option

if TYPE_CHECKING:
    from ..api import Result, Term


# library field -> the flag that sets it
FLAGS = {"add": "--add", "subtract": "--subtract", "add_images": "--add-image", "subtract_images": "--subtract-image",
         "top": "--top", "candidates": "--candidates", "min_prob": "--min-prob", "under": "--in",
         "keyword": "--keyword", "after": "--after", "before": "--before",
         "sort": "--sort"}


@main.command("query")
@click.argument("text", required=False)
@click.option("--image", "image_path", type=click.Path(path_type=Path), default=None,
              help="Query by an image instead of text (ITC similarity; re-ranked only with --add TEXT).")
@click.option("--add", "add", multiple=True, metavar="[W:]TEXT",
              help="Also like TEXT (weight W, default 1); repeatable.")
@click.option("--subtract", "subtract", multiple=True, metavar="[W:]TEXT",
              help="Less like TEXT (weight W, default 1); repeatable.")
@click.option("--add-image", "add_image", multiple=True, metavar="[W:]PATH",
              help="Also like the image at PATH; repeatable.")
@click.option("--subtract-image", "subtract_image", multiple=True, metavar="[W:]PATH",
              help="Less like the image at PATH; repeatable.")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="How many results.")
@click.option("--candidates", type=click.IntRange(1), default=64, show_default=True,
              help="ITC recall depth: how many images the ITM head re-ranks.")
@click.option("--no-rerank", is_flag=True, help="Rank by ITC cosine only (faster, less precise).")
@click.option("--min-prob", type=click.FloatRange(0, 1), default=None,
              help="Drop results whose ITM match probability is below P.")
@click.option("--in", "under", default=None, metavar="DIR",
              help="Only results under DIR (or an s3://bucket/prefix).")
@click.option("--keyword", metavar="WORDS", default=None,
              help="Only images whose caption or file path holds every one of WORDS; without TEXT, rank by them.")
@click.option("--after", metavar="DATE", default=None,
              help="Only photos taken (EXIF, else file time) on or after DATE: YYYY, YYYY-MM, YYYY-MM-DD[THH:MM[:SS]].")
@click.option("--before", metavar="DATE", default=None, help="Only photos taken before DATE (same forms).")
@click.option("--sort", type=click.Choice(["score", "date"]), default="score", show_default=True,
              help="Order of the results: best first, or the best --top newest first.")
@click.option("--hybrid/--no-hybrid", default=None,
              help="Fuse keyword hits of TEXT (captions, paths) with the vector recall. Default: where the index "
                   "has captions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--paths", "as_paths", is_flag=True, help="Only paths, one per line, best first.")
@click.option("-0", "--null", "null", is_flag=True,
              help="Paths only, each ended by a NUL byte, not a newline (for `xargs -0`: names may hold newlines).")
@model_option("Model to query with. Default: the one the index was built with.")
@index_option
@device_option
@precision_option
def query_command(text, image_path, add, subtract, add_image, subtract_image, top, candidates, no_rerank, min_prob,
                  under, keyword, after, before, sort, hybrid, as_json, as_paths, null, model_name, index_path, device,
                  precision):
    """Find the images that best match TEXT (or --image).

    Recall ranks every image by ITC similarity; the ITM head then re-ranks the best --candidates with
    cross-attention over their stored features. score = ITM match logit + ITC cosine, as in BLIP.

    Composed queries, as rclip's: `query "a beach" --add sunset --subtract people --add-image PATH`. The
    ITC query is the normalised weighted sum of the terms' normalised embeddings; the re-rank adds each
    text term's weighted ITM match logit (subtracted terms subtract theirs) when a positive text term exists.

    Where the index has captions (`index --captions`), TEXT also finds images by keyword (captions and file
    paths): the best keyword hits join the ITC candidates of the re-rank, or, with --no-rerank, the two lists
    are fused by reciprocal rank (--no-hybrid: vectors only).
    """
    from ..api import FieldError, Index
    from ..dates import date_range
    from ..device import small_pages_for_a_short_run
    from ..search import SearchOptions

    small_pages_for_a_short_run()  # one answer, then exit: no huge-page compaction stalls (its docstring)
    if text is not None and image_path is not None:
        raise InvalidInputError("give either a query TEXT or --image PATH, not both")
    if image_path is not None and str(image_path).startswith("s3:/"):  # (click's Path made "s3://b/k" "s3:/b/k")
        raise InvalidInputError("--image reads a picture file on this machine, not an s3:// object; copy it here "
                                "first")
    if text is None and image_path is None and keyword is None:
        raise InvalidInputError("give a query TEXT, --image PATH or --keyword WORDS")
    as_paths = as_paths or null
    if as_json and as_paths:
        raise InvalidInputError("--json and --paths (or --null) exclude each other")
    with flags():
        terms = _terms(text, image_path, add, subtract, add_image, subtract_image)
        start, end = date_range(after, before)
        within, gone = _within(under)
        options = SearchOptions(top=top, candidates=candidates, rerank=not no_rerank, min_prob=min_prob,
                                under=within, keyword=keyword, after=start, before=end, hybrid=hybrid, sort=sort)
        index = Index.open(index_location(index_path), model_name, device, precision,
                           with_vision=any(t.image is not None for t in terms),
                           lazy=not terms or gone is not None,  # keywords: no model; a bad --in: none before it
                           one_shot=True)
        if gone is not None and not index.holds_under(within):
            raise FieldError("under", f"{printable(under)}: no such folder, and the index holds no files under it")
        results = index.search(terms, options)
    if index.building:  # on stderr: --json and --paths stay as they are
        click.echo(f"blipsearch: the index's first run (or a --rebuild) is under way, or stopped: these results come "
                   f"from the {index.reader.counts()[1]} images it has stored", err=True)
    query = text if text is not None else str(image_path) if image_path is not None else keyword
    if as_paths:
        _print_paths(results, b"\0" if null else b"\n")
    elif as_json:
        answer = {"query": printable(query), "model": printable(index.model_id),
                  "results": [r.to_json() for r in results]}
        click.echo(json.dumps(answer, ensure_ascii=False))  # valid UTF-8 for any name
    else:
        _print_table(results)
    finished_read_only()


@contextmanager
def flags() -> Iterator[None]:
    """The library names fields (`top must be at least 1`); the command names its flags."""
    from ..api import FieldError

    try:
        yield
    except FieldError as exc:
        raise InvalidInputError(f"{FLAGS.get(exc.field, exc.field)} {exc.problem}") from exc


def _within(under: str | None) -> tuple[list[str] | None, Exception | None]:
    """--in's folders, and the error where there is no such folder: the index may still hold files from it (an
    unplugged drive, a folder deleted since the last run), so its paths filter alone (`folders(gone=True)`)."""
    from ..api import FieldError, folders

    if under is None:
        return None, None
    try:
        return folders(under), None
    except FieldError as exc:
        return folders(under, gone=True), exc  # (a blank or a file is refused again)


def _terms(text, image_path, add, subtract, add_image, subtract_image) -> list[Term]:
    """The query's terms: the main one first, then the added and subtracted ones (none: keywords alone)."""
    from ..api import Term, more_terms

    more = more_terms(add, subtract, add_image, subtract_image)
    if text is None and image_path is None:
        if more:
            raise InvalidInputError("--add and --subtract need a query TEXT or --image to add to")
        return []
    main_term = Term(text=text) if text is not None else Term(image=image_path)
    return [main_term, *more]


def _print_paths(results: list[Result], end: bytes) -> None:
    """The paths' own bytes, so that any name a file system allows reaches `xargs` intact."""
    sys.stdout.flush()
    for result in results:
        sys.stdout.buffer.write(os.fsencode(result.path) + end)
    sys.stdout.buffer.flush()


def _print_table(results: list[Result]) -> None:
    if not results:
        click.echo("no matching images", err=True)
        return
    captions = any(r.caption for r in results)
    click.echo(f"{'#':>3}  {'score':>7}  {'match':>5}  {'date':<10}  path" + ("  -- caption" if captions else ""))
    for rank, r in enumerate(results, 1):
        match = "    -" if r.itm_prob is None else f"{r.itm_prob:5.0%}"
        extra = f"  (+{len(r.copies)} copies)" if r.copies else ""
        name = one_line(r.path)  # one line per result, no escape sequences from a file name
        caption = f"  -- {one_line(r.caption)}" if r.caption else ""
        click.echo(f"{rank:>3}  {r.score:7.3f}  {match}  {r.date_text[:10]}  {name}{extra}{caption}")
