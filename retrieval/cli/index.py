"""`blipsearch index FOLDER...`"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from .. import DEFAULT_CAPTIONER, DEFAULT_MODEL
from ..errors import BlipsearchError, InvalidInputError, ModelLoadError, one_line
from . import EXIT_SKIPPED, main
from .options import device_option, index_location, index_option, load, model_option, not_empty, precision_option


@main.command("index")
@click.argument("folders", nargs=-1, required=True)
@model_option("Model to embed with (hub id or local directory). Default: the index's model, or "
              f"{DEFAULT_MODEL} for a new index.")
@index_option
@device_option
@precision_option
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Images per encoder batch (and per index commit). Default: 16 on CPU, 64 on GPU.")
@click.option("--workers", type=click.IntRange(0, 64), default=None,
              help="Decoding threads that run ahead of the encoder (0: decode in line). Default: 1 on CPU "
                   "(the encoder needs every core), 2 on GPU. Not used by --ray (Ray decodes in its tasks).")
@click.option("--exact-decode", is_flag=True,
              help="Decode JPEGs at full size before resizing (slower; by default they decode at reduced scale).")
@click.option("--rebuild", is_flag=True,
              help="Drop the index first: to switch models, or to repair a damaged index.")
@click.option("--allow-empty", is_flag=True,
              help="Let a folder that is now empty, or deleted, remove its indexed files (kept by default: an "
                   "unmounted drive).")
@click.option("--captions/--no-captions", default=None,
              help="Write a caption per image (for keyword and hybrid search); the index remembers the choice "
                   "for later runs. Default: as the last run chose (off for a new index).")
@click.option("--captioner", "captioner_name", metavar="HUB_ID|DIR", default=None, callback=not_empty,
              help=f"BLIP captioning model (implies --captions). Default: the index's, else {DEFAULT_CAPTIONER}.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Read and encode on Ray Data: on the cluster at ADDRESS (auto, ray://HEAD:10001), else at "
                   "$RAY_ADDRESS, else on a local Ray instance. Writes no captions.")
@click.option("--ray-actors", type=click.IntRange(1), default=None,
              help="Encoder actors for --ray (each loads the model once). Default: one per GPU, else one per 8 CPUs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def index_command(folders, model_name, index_path, device, precision, batch_size, workers, exact_decode, rebuild,
                  allow_empty, captions, captioner_name, ray_address, ray_actors, quiet):
    """Embed every image under FOLDERS (recursively) into the index.

    Unchanged files are skipped, changed ones re-encoded, deleted ones removed, and moved or copied
    files reuse their stored features. Interrupting loses at most the batch in flight; run again to
    finish. Exit status 3 means done, with some files skipped (each named on stderr). FOLDERS may be
    s3://bucket/prefix addresses (AWS credentials and AWS_ENDPOINT_URL from the environment).

    With --captions each image also gets a caption (once per content; images indexed before get theirs
    on this run), and the date it was taken (EXIF, else the file's time) is kept for every file.
    """
    from blipsearch.indexer.pipeline import IndexOptions, index_folders
    from blipsearch.indexer.reader import IndexReader
    from blipsearch.indexer.scan import resolve_roots
    from blipsearch.indexer.store import IndexWriter, model_to_write

    location = index_location(index_path)
    resolve_roots(folders, allow_empty)  # a missing folder, a damaged or foreign index: all fail before the model loads
    _check_ray(ray_address, ray_actors, captions, captioner_name)
    if captions is False and captioner_name is not None:
        raise InvalidInputError("--captioner names the model for --captions; drop one of --captioner and --no-captions")
    recorded = _recorded_captioner(location)  # before a --rebuild drops the manifest
    chosen = _chosen_captioner(recorded, captions, captioner_name)  # a new one checked before the model loads
    model_name = model_to_write(location, model_name, rebuild) or DEFAULT_MODEL
    model = load(model_name, device, precision)
    store = IndexWriter.open(location, model.info, rebuild=rebuild)
    captioner = _captioner(store, recorded, chosen, device, precision)
    options = IndexOptions(
        batch_size=batch_size or (64 if model.device.type != "cpu" else 16),
        workers=workers,
        progress=not quiet, reduced_decode=not exact_decode, allow_empty=allow_empty,
        on_skip=lambda path, reason: _say(f"skipped {path}: {reason}"), captioner=captioner)
    started = time.perf_counter()
    try:
        if ray_address is None:
            summary = index_folders(folders, model, store, options)
        else:
            summary = _index_on_ray(folders, model_name, model, store, options, ray_address, ray_actors, batch_size,
                                    device, precision)
            if captioner is not None:
                _say("captions are not written by --ray runs: run `blipsearch index` without --ray to caption "
                     "the new images (nothing is encoded again)")
    finally:
        store.close()
    seconds = time.perf_counter() - started
    rate = f" ({summary.indexed / seconds:.1f} images/s)" if summary.indexed else ""
    files, _ = IndexReader.open(location).counts()
    for path, reason in summary.uncaptioned:
        _say(f"no caption for {path}: {reason}")
    captioned = f", captioned {summary.captioned}" if captioner is not None else ""
    _say(f"indexed {summary.indexed}, reused {summary.reused} (moved or copied), unchanged "
         f"{summary.unchanged}, removed {summary.removed}, skipped {len(summary.skipped)}{captioned} in "
         f"{seconds:.1f} s{rate}; the index at {location} holds {files} files")
    check = getattr(model, "int8_check", None)  # --precision int8: a failed check was logged when it happened
    if check is not None and check.passed:
        _say(check.describe())
    if summary.skipped:
        sys.exit(EXIT_SKIPPED)


def _check_ray(address: str | None, actors: int | None, captions: bool | None, captioner: str | None) -> None:
    if address is None:
        if actors is not None:
            raise InvalidInputError("--ray-actors is for --ray runs; add --ray or drop --ray-actors")
        return
    if captions or captioner is not None:
        raise InvalidInputError("--ray runs write no captions: drop --captions/--captioner, and caption with a "
                                "`blipsearch index --captions` run afterwards")
    try:
        import lance_ray  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise InvalidInputError("--ray needs Ray Data and lance-ray, the ray extra: pip install -e '.[ray]' in the "
                                "blipsearch checkout") from None


def _index_on_ray(folders, model_name: str, model, store, options, address: str, actors: int | None,
                  batch_size: int | None, device: str, precision: str):
    from blipsearch.indexer.cluster import RayOptions, index_on_ray

    name = _absolute_name(model_name) if Path(os.path.expanduser(model_name)).exists() else model_name
    ray_options = RayOptions(address=address or None, model=name, device=device, precision=precision, actors=actors,
                             batch_size=batch_size or 64, reduced_decode=options.reduced_decode)
    return index_on_ray(folders, store, options, ray_options, model.info.preprocessing)


def _recorded_captioner(location) -> str | None:
    from blipsearch.indexer.manifest import read_manifest

    try:
        manifest = read_manifest(location)
    except BlipsearchError:
        return None  # damaged: IndexWriter.open says so (or --rebuild repairs it)
    return manifest.run.captioner if manifest is not None else None


def _chosen_captioner(recorded: str | None, captions: bool | None, name: str | None) -> str | None:
    """The run's captioner's name (None: no captions): as asked, else as the index remembers. One not
    remembered yet is refused now if its config shows no captioner: at the run's first new image that left
    the run unfinished, and could abort the process (exit 134)."""
    from ..models.captioner import check_captioner

    if captions is False:
        return None
    chosen = recorded
    if name is not None or captions:
        chosen = _absolute_name(name) if name is not None else recorded or DEFAULT_CAPTIONER
    if chosen is not None and chosen != recorded:
        try:
            check_captioner(chosen)
        except ModelLoadError as exc:  # the library's words speak of "a model": say which flag names this one
            raise ModelLoadError(f"the captioner of --captions: {exc} (--captioner DIR)") from exc
    return chosen


def _captioner(store, recorded: str | None, chosen: str | None, device: str, precision: str):
    """The run's captioner (None: no captions); remembered for the next run at once (a run that is killed
    still leaves the choice), and forgotten again where it fails to load (else every later run would fail on
    it). Loaded only when the run has something to caption."""
    from blipsearch.indexer.pipeline import CaptionerSource

    store.remember_captioner(chosen)
    if chosen is None:
        return None

    def load():
        from ..models.captioner import load_captioner

        try:
            return load_captioner(chosen, device=device, precision=precision)
        except Exception:  # not Ctrl-C: a run that is stopped keeps the choice
            store.remember_captioner(recorded)
            raise

    return CaptionerSource(chosen, load)


def _absolute_name(name: str) -> str:
    """A local folder by its absolute path (a later run from elsewhere finds it, and one folder has one name);
    a hub id as given."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise InvalidInputError(f"--captioner {name}: no such folder; name a captioner folder or a hub id "
                                "such as Salesforce/blip-image-captioning-base")
    return name


def _say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"blipsearch: {one_line(line)}", file=sys.stderr)
