"""The library API: open an index once (its model loaded and checked), then search it.

The CLI, the HTTP server and the benchmarks all call this; none of them wires the reader, the model and
the searcher itself.

    index = Index.open(Path("~/photos-index"))
    index.search("a beach", Options(top=5))
    index.search([Term("a beach"), Term("sunset"), Term("people", weight=-1)])
    index.search_image(Path("query.jpg")), index.similar("/photos/a.jpg"), index.status()

Composed queries (as rclip's `--add` / `--subtract`): each term is a text or an image with a signed weight.
The ITC query vector is the normalised weighted sum of the terms' normalised embeddings; an image term of
BLIP-2 (32 vectors) enters as the normalised mean of its vectors. A query of one image alone keeps all its
vectors (an image then scores 1 with itself, as `query --image` always did).
Re-rank: where at least one text term has a positive weight, each candidate scores its ITC cosine with the
composed vector plus the weighted ITM match logit of every text term (negative terms subtract theirs), and
its match probability is that of the first positive text term; other queries rank by ITC alone.

Errors are `InvalidInputError`s; a `FieldError` names the option it is about (`top`, `image`, `under`...),
which the CLI turns into its flag and the server into its parameter.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dates import format_date
from .errors import (
    FieldError,
    ImageLoadError,
    IndexDamagedError,
    IndexMissingError,
    InvalidInputError,
    StoreError,
    printable,
)
from .models.base import RetrievalModel, TextTokens
from .search import Filters, Hit, Searcher, SearchOptions, blank

if TYPE_CHECKING:
    import torch

    from blipsearch.indexer.location import Location

log = logging.getLogger(__name__)

Options = SearchOptions


@dataclass(frozen=True)
class Indexed:
    """An indexed file as an image term, by its path: its ITC vectors as stored in the index (no file is read,
    so a file on an unmounted drive serves too, and an image scores 1 with itself)."""

    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str | Path):
            raise FieldError("path", f"must be a file path, not {type(self.path).__name__}")
        object.__setattr__(self, "path", str(self.path))  # a Path names the same indexed file


ImageSource = Path | bytes | Indexed  # a file, its bytes (an upload; a bytearray or memoryview too), an indexed file


_DROPPED = object()  # the build of an index whose manifest is gone or marked damaged (a --rebuild dropping it)


class NotIndexedError(InvalidInputError):
    """A path that the index does not hold."""


# the size of a term's weight: a weight scales an ITM logit (about -10..10) and an embedding of norm 1, so
# these bounds keep every score well inside float32 (a weight of 1e30 once zeroed every cosine, 1e39 made NaN)
MIN_WEIGHT, MAX_WEIGHT = 1e-3, 1e3
MAX_TERMS = 16  # per query: 300 terms once held the server's one model for 11 s
# a one-shot index's first search within this long of its open answers from the view it opened (no re-read)
FRESH_VIEW_S = 1.0


@dataclass(frozen=True)
class Term:
    """One term of a query: a text or an image, with a weight (negative: less like this)."""

    text: str | None = None
    image: ImageSource | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if (self.text is None) == (self.image is None):
            raise InvalidInputError("a query term is a text or an image, not both or neither")
        if not (isinstance(self.weight, int | float | np.integer | np.floating) and not isinstance(self.weight, bool)
                and MIN_WEIGHT <= abs(self.weight) <= MAX_WEIGHT):
            raise FieldError("weight", f"must be a number of size {MIN_WEIGHT:g} to {MAX_WEIGHT:g} (negative: "
                                       "less like this)")
        if self.text is not None and not isinstance(self.text, str):
            raise FieldError("text", f"must be a text, not {type(self.text).__name__}")
        if self.image is not None and not isinstance(self.image, Path | str | bytes | bytearray | memoryview | Indexed):
            raise FieldError("image", f"must be a file path, the image's bytes or an Indexed file, not "
                                      f"{type(self.image).__name__}")
        if self.text is not None and blank(self.text):
            raise InvalidInputError("the query text is empty")


def weighted(spec: str) -> tuple[float, str]:
    """`"2:sunset"` -> (2.0, "sunset"); a prefix that is no number is part of the term (`"time: 5pm"`). A text
    that itself begins with a number and a colon needs its weight written: `"1:10:30 meeting"`."""
    head, sep, tail = spec.partition(":")
    try:
        return (float(head), tail) if sep and tail else (1.0, spec)
    except ValueError:
        return 1.0, spec


def weighted_path(spec: str) -> tuple[float, str]:
    """`weighted` for the path of an image file on this machine, `~` expanded; a file named by the whole of
    `spec` is taken as it is (`"12:30.png"`; `"2:12:30.png"` weighs it 2)."""
    try:
        whole = bool(spec.strip()) and Path(os.path.expanduser(spec)).is_file()
    except (OSError, ValueError):  # a name too long, a folder without permission, a NUL: not a file here
        whole = False
    if whole:
        return 1.0, os.path.expanduser(spec)
    weight, path = weighted(spec)
    return weight, os.path.expanduser(path) if path.strip() else path


def more_terms(add: Sequence[str] = (), subtract: Sequence[str] = (), add_images: Sequence[str] = (),
               subtract_images: Sequence[str] = (), indexed: bool = False) -> list[Term]:
    """The added and subtracted terms of a query, each `[WEIGHT:]TEXT` or `[WEIGHT:]PATH`, in that order;
    `indexed`: the paths name indexed files, searched by their stored vectors (`Indexed`: read as given, on
    no disk: a server's client learns nothing of its folders). A bad one is refused naming its field (`add`,
    `subtract`, `add_images`, `subtract_images`), not the query's text."""
    text = (weighted, lambda value, weight: Term(text=value, weight=weight), "text is empty")
    image = (weighted if indexed else weighted_path,
             lambda value, weight: Term(image=Indexed(value) if indexed else Path(value), weight=weight),
             "path is empty")
    terms = []
    for field, specs, sign, (parse, make, empty) in (("add", add, 1, text), ("subtract", subtract, -1, text),
                                                     ("add_images", add_images, 1, image),
                                                     ("subtract_images", subtract_images, -1, image)):
        for spec in specs:
            weight, value = parse(spec)
            if blank(value):
                raise FieldError(field, empty)
            try:
                terms.append(make(value, sign * weight))
            except FieldError as exc:  # its weight
                raise FieldError(field, f"{exc.field} {exc.problem}") from exc
    return terms


@dataclass
class Result:
    path: str
    copies: list[str]  # other paths with the same content
    score: float
    itc: float | None  # None: found by keyword alone
    itm_prob: float | None
    size: int  # bytes of `path`, as indexed
    mtime_ns: int  # its modification time, as indexed
    date: int = 0  # wall-clock seconds: EXIF date taken, else the modification time
    exif_dated: bool = False
    camera: str | None = None
    caption: str | None = None

    @property
    def modified(self) -> str:
        return datetime.fromtimestamp(self.mtime_ns / 1e9, UTC).isoformat(timespec="seconds")

    @property
    def date_text(self) -> str:
        return format_date(self.date)

    def to_json(self, details: bool = False) -> dict:
        """`query --json`'s row (valid UTF-8 for any name); `details` adds size, modification date, camera."""
        row = {"path": printable(self.path), "score": round(self.score, 6),
               "itc": None if self.itc is None else round(self.itc, 6),
               "itm_prob": None if self.itm_prob is None else round(self.itm_prob, 6),
               "caption": self.caption, "date": self.date_text, "date_source": "exif" if self.exif_dated else "file"}
        if self.copies:
            row["copies"] = [printable(p) for p in self.copies]
        return row | ({"size": self.size, "modified": self.modified, "camera": self.camera} if details else {})


@dataclass
class _View:
    """One generation of the index as the API sees it: the reader, and a path -> hash map made on first use
    (a one-off query never pays for it)."""

    reader: object  # IndexReader
    _hash_of: dict[str, str] | None = None

    def hash_of(self, path: str) -> str | None:
        if self._hash_of is None:
            self._hash_of = self.reader.files()
        return self._hash_of.get(path)


class Index:
    """An index opened for searching, with its model loaded once. Thread-safe: one query runs the model at a
    time, while path look-ups, status and refreshes go on beside it (each works on the view it started with;
    a refresh swaps in a new view in one assignment)."""

    def __init__(self, location: Location, model: RetrievalModel | None, reader,
                 load: Callable[[], RetrievalModel] | None = None):
        """`model`, or None and `load`: the model is loaded by the first search that needs one."""
        self.location = location
        self._model, self._load = model, load
        self._view = _View(reader)
        self._model_lock = threading.Lock()  # one model, one query at a time
        self._refresh_lock = threading.Lock()  # one reopening at a time
        self._load_lock = threading.Lock()  # one deferred model load
        self._opened_at: float | None = None  # a one-shot open's manifest read: its first search may skip its own

    @property
    def model(self) -> RetrievalModel:
        """The model (loaded now where `Index.open(lazy=True)` deferred it; checked against the index then)."""
        return self._ensure_model()

    def _ensure_model(self) -> RetrievalModel:
        from blipsearch.indexer.manifest import check_model

        if self._model is None:
            with self._load_lock:  # not the refresh lock: status and refreshes go on while a model loads
                if self._model is None:
                    loaded = self._load()
                    check_model(self.reader.manifest, loaded.info, self.location)
                    self._model = loaded
        return self._model

    @property
    def model_id(self) -> str:
        """The model's id: the loaded one's, else the one the index was built with."""
        return self._model.info.model_id if self._model is not None else self.reader.manifest.identity.model_id

    @classmethod
    def open(cls, location: Location | Path | str | None = None, model: str | None = None, device: str = "auto",
             precision: str = "auto", with_vision: bool = True, lazy: bool = False, one_shot: bool = False
             ) -> Index:
        """Raises `IndexMissingError`, `IndexDamagedError`, `ModelLoadError` or `ModelMismatchError`.

        `with_vision=False` loads the text side only (quicker): such an index answers text terms only.
        `lazy=True` loads the model at the first search that needs one (a keyword search needs none), and
        raises the model's errors there. `one_shot=True`: the process answers a search or a few and exits, so
        what starts fastest is chosen (`load_model`'s `one_shot`), and a first search within `FRESH_VIEW_S` of
        the open answers from the view just opened, without reading the manifest again (a GET on object storage;
        a rebuild begun since is still caught, as in any search).
        """
        from blipsearch.indexer.location import Location, location_of
        from blipsearch.indexer.manifest import default_location
        from blipsearch.indexer.reader import IndexReader

        from .device import DEVICES, PRECISIONS

        for name, value in (("location", location), ("model", model)):
            if value is not None and not isinstance(value, str | Path | Location):
                raise FieldError(name, f"must be a path (or a hub id), not {type(value).__name__}")
        for name, value, choices in (("device", device, DEVICES), ("precision", precision, PRECISIONS)):
            if value not in choices:
                raise FieldError(name, f"must be one of {', '.join(choices)}, not {value!r}")
        location = location_of(location or default_location())
        read_at = time.monotonic()
        reader = IndexReader.open(location)

        def load() -> RetrievalModel:
            from .models import load_model

            return load_model(model or reader.manifest.identity.model_id, device=device, precision=precision,
                              with_vision=with_vision, one_shot=one_shot)

        index = cls(location, None, reader, load)
        index._opened_at = read_at if one_shot else None
        if not lazy:
            index._ensure_model()  # loaded and checked against the index now: its errors are the open's
        return index

    @property
    def reader(self):
        return self._view.reader

    @property
    def building(self) -> bool:
        """The view open is of a first run (or a --rebuild) under way, or stopped before it finished: searches
        answer from the images it has stored."""
        run = self._view.reader.manifest.run
        return run.writing and run.generation == 0

    # ---- queries ----------------------------------------------------------------------------------

    def search(self, query: str | Sequence[Term], options: Options | None = None) -> list[Result]:
        """Images that best match a text, or a composed query (see the module docstring)."""
        terms = [Term(text=query)] if isinstance(query, str) else \
            list(query) if isinstance(query, Iterable) and not isinstance(query, bytes | bytearray) else None
        if terms is None or not all(isinstance(t, Term) for t in terms):  # a list of texts: the likeliest slip
            raise FieldError("query", "must be a text, or a list of Term (Term(text=...), Term(image=...))")
        options = _checked(options)
        if not terms and not options.keyword:
            raise InvalidInputError("the query has no terms")
        if len(terms) > MAX_TERMS:  # the one check: the CLI's and the server's terms all come through here
            raise InvalidInputError(f"a query has at most {MAX_TERMS} terms (each text term is an ITM pass over "
                                    "every candidate)")
        opened_at, self._opened_at = self._opened_at, None
        if opened_at is None or time.monotonic() - opened_at >= FRESH_VIEW_S:  # (a one-shot's view is fresh)
            self.refresh()  # a run or a --rebuild in another process since the last query (one manifest read)
        view = self._view
        with self._model_lock:
            self._check_not_empty(view.reader)
            # keywords alone, and indexed files alone (their stored vectors), need no model
            needs_model = any(t.text is not None or not isinstance(t.image, Indexed) for t in terms)
            searcher = Searcher(self.model if needs_model else None, view.reader)
            if not terms:
                if options.min_prob is not None:
                    raise FieldError("min_prob", "needs a text term of positive weight to re-rank with")
                hits = searcher.search_keywords(options)
            elif len(terms) == 1 and terms[0].image is not None and terms[0].weight > 0:
                if options.min_prob is not None:
                    raise FieldError("min_prob", "needs a text term of positive weight to re-rank with")
                # by the best ITC cosine between any of its V vectors and any of an indexed image's (BLIP: one
                # each; BLIP-2: 32 query vectors each, so an image scores 1 with itself)
                hits = searcher.search_vector(self._image_vectors(view, terms[0].image), [], options)
            else:
                vector, texts = self._compose(view, terms)
                if options.min_prob is not None and not texts:
                    raise FieldError("min_prob", "needs a text term of positive weight to re-rank with")
                words = next((t.text for t in terms if t.text is not None and t.weight > 0), None)
                hits = searcher.search_vector(vector, texts, options, words=words)
            named = {t.image.path for t in terms if isinstance(t.image, Indexed) and t.weight > 0}
            results = self._results(view, hits, options.filters, named)
        if terms:  # keywords alone read no stored features
            self._check_same_build(view)
        if options.sort == "date":
            results.sort(key=lambda r: -r.date)
        return results

    def keyword_search(self, words: str, options: Options | None = None) -> list[Result]:
        """Images whose caption or paths hold every one of `words`, best BM25 first (no model involved)."""
        if not isinstance(words, str):
            raise FieldError("words", f"must be a text, not {type(words).__name__}")
        options = replace(_checked(options), keyword=words)
        return self.search([], options)

    def search_image(self, image: ImageSource, options: Options | None = None) -> list[Result]:
        return self.search([Term(image=image)], options)

    def holds_under(self, under: Sequence[str]) -> bool:
        """Whether the generation open here (as for `indexed`) holds a file under one of these folders
        (absolute paths, as `folders` gives), on disk now or not (an unplugged drive's files stay indexed)."""
        from blipsearch.indexer.scan import is_under

        if not isinstance(under, list | tuple) or not all(isinstance(f, str) and os.path.isabs(f) for f in under):
            raise FieldError("under", "must be a list of absolute folder paths (`api.folders(path)` gives one's)")
        return any(is_under(str(path), under) for path in self._view.reader.view.paths)

    def similar(self, path: str | Path, options: Options | None = None) -> list[Result]:
        """Images like the indexed file `path` (itself first), by its stored vectors (see `Indexed`)."""
        return self.search_image(Indexed(path), options)  # NotIndexedError for any other path

    def indexed(self, path: str | Path) -> tuple[str, str]:
        """(path, content hash) of an indexed file; raises `NotIndexedError` for any other path, and
        `StoreError` while the index's first run (or a --rebuild) has stored no image yet."""
        if not isinstance(path, str | Path):
            raise FieldError("path", f"must be a file path, not {type(path).__name__}")
        path, view = str(path), self._view
        digest = view.hash_of(path)
        if digest is None:
            self._check_not_building(view.reader)
            raise NotIndexedError(f"{printable(path)} is not in the index")
        return path, digest

    def status(self) -> dict:
        """`blipsearch status --json` of the generation open here (its tables are not re-checked)."""
        return index_status(self.location, self._view.reader)[0]

    def refresh(self) -> bool:
        """Pick up a generation that an indexing run in another process has finished; True if it did.

        While a run is under way the view of the last finished generation stays (its snapshot and feature
        segments stay valid until that run finishes); a view older than that is rebuilt from the tables, since
        a run starts by deleting the segments that the generation before the last retired. Raises
        `ModelMismatchError` if the index was rebuilt with another model.
        """
        from blipsearch.indexer.layout import read_index_manifest
        from blipsearch.indexer.manifest import check_model
        from blipsearch.indexer.reader import IndexReader

        with self._refresh_lock:
            run, ours = read_index_manifest(self.location).run, self.reader.manifest.run
            if run.build == ours.build and run.generation == ours.generation and (run.writing or not ours.writing):
                return False
            reader = IndexReader.open(self.location)
            if self._model is not None:  # (a model loaded later is checked then)
                check_model(reader.manifest, self._model.info, self.location)
            self._view = _View(reader)
            log.info("index at %s: generation %d opened", self.location, run.generation)
            return True

    # ---- internals --------------------------------------------------------------------------------

    def _check_same_build(self, view: _View) -> None:
        """A --rebuild numbers its feature segments from 1 again: one that began while a query read them may
        have handed it other images' features. The manifest names a new build from the rebuild's start."""
        from blipsearch.indexer.layout import read_index_manifest

        try:
            build = read_index_manifest(self.location).run.build
        except (IndexMissingError, IndexDamagedError):
            build = _DROPPED  # a rebuild drops the old index first: for a moment there is none, or a damaged one
        if build != view.reader.manifest.run.build:  # (an index older than build ids has None: not _DROPPED)
            raise StoreError(f"the index at {self.location} was rebuilt while this query ran; ask again once "
                             "the rebuild has finished")

    def _check_not_empty(self, reader) -> None:
        if reader.counts()[1] == 0:
            self._check_not_building(reader)
            raise InvalidInputError(f"the index at {self.location} is empty; add images with "
                                    "`blipsearch index FOLDER`")

    def _check_not_building(self, reader) -> None:
        if reader.counts()[1] == 0 and reader.manifest.run.writing and reader.manifest.run.generation == 0:
            raise StoreError(f"the index at {self.location} has no images yet: its first indexing run (or a "
                             "--rebuild) is under way, or stopped before storing any; wait for it, or run "
                             "`blipsearch index FOLDER`")

    def _compose(self, view: _View, terms: Sequence[Term]) -> tuple[np.ndarray, list[tuple[float, TextTokens]]]:
        """(D,) normalised weighted sum of the terms' normalised vectors, and the text terms to re-rank with."""
        total, texts = None, []
        for term in terms:
            if term.text is not None:
                encoded = self.model.encode_texts([term.text])
                vector = np.asarray(encoded.embeddings[0], dtype=np.float32)  # (D,)
                texts.append((term.weight, encoded.tokens))
            else:
                vector = _unit(self._image_vectors(view, term.image).mean(0, dtype=np.float32))
            total = term.weight * vector if total is None else total + term.weight * vector
        if float(np.linalg.norm(total)) < 1e-6:
            raise InvalidInputError("the query terms cancel out: change a weight or a term")
        positive = [i for i, (weight, _) in enumerate(texts) if weight > 0]
        if positive:  # the first positive text leads: its match probability is the one reported
            texts.insert(0, texts.pop(positive[0]))
        return _unit(total), texts if positive else []

    def _image_vectors(self, view: _View, image: ImageSource) -> np.ndarray:
        """(V, D) ITC vectors of an image term: stored (an `Indexed` file), else encoded."""
        if isinstance(image, Indexed):
            digest = view.hash_of(image.path)
            stored = None if digest is None else view.reader.stored_vectors(digest)
            if stored is None:
                raise NotIndexedError(f"{printable(image.path)} is not in the index")
            return stored
        return np.asarray(self.model.encode_images(self._pixels(image)).embeddings[0], dtype=np.float32)

    def _pixels(self, image: ImageSource) -> torch.Tensor:
        from blipsearch.indexer.images import load_image

        data = bytes(image) if isinstance(image, bytes | bytearray | memoryview) else None
        try:
            loaded = load_image("the uploaded image" if data is not None else image, self.model.info.preprocessing,
                                data=data)
        except ImageLoadError as exc:
            raise FieldError("image", f"cannot be read: {exc}" if data is not None else
                                      f"{printable(str(image))}: {exc}") from exc
        return self.model.pixel_values([loaded.pixels])

    @staticmethod
    def _results(view: _View, hits: list[Hit], where: Filters, named: set[str]) -> list[Result]:
        """Hits with their files, best first; copies outside the folders and dates asked for are not shown,
        nor hits without one. Of an image's copies, one that the query `named` (`similar` of a copy shows
        that copy) or whose path holds the keywords shows first (`--paths` prints it)."""
        reader = view.reader
        files = reader.files_by_hash([h.key for h in hits])
        words_missing = _words_missing(where.keyword) if where.keyword else lambda file: 0
        results = []
        for hit in hits:
            inside = [f for f in files.get(hit.key, []) if reader.passes(f, where)]
            inside.sort(key=lambda f: (f.path not in named, words_missing(f)))
            if inside:
                first, *copies = inside
                results.append(Result(first.path, [c.path for c in copies], hit.score, hit.itc, hit.itm_prob,
                                      first.size, first.mtime_ns, first.date, first.exif_dated, first.camera,
                                      reader.caption(hit.key)))
        return results


def _words_missing(words: str):
    """A sort key of files: how many of `words` their path lacks (as the keyword index splits words)."""
    from blipsearch.indexer.keywords import tokens

    wanted = set(tokens(words))
    return lambda file: len(wanted - set(tokens(file.path)))


def _checked(options: Options | None) -> Options:
    """The options given (the defaults for None); anything else is a `FieldError`."""
    if options is not None and not isinstance(options, Options):
        raise FieldError("options", f"must be Options(...), not {type(options).__name__}")
    return options or Options()


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def folders(path: Path | str, gone: bool = False) -> list[str]:
    """`Options.under` for one folder: its absolute path as given, and where its links lead (an index stores
    a root's real path, and the link paths of linked folders below it); raises `FieldError("under", ...)`
    where there is no folder. `gone=True`: a path where nothing is now (an unplugged drive, a folder deleted
    since it was indexed) gives its paths too, as the index may still hold files from it (`holds_under`).
    An `s3://bucket/prefix` stands for itself."""
    if not isinstance(path, str | Path) or not str(path).strip():  # ("" read as the current folder)
        raise FieldError("under", "must name a folder (`.` for the current one)")
    if str(path).startswith("s3://"):
        return [str(path).rstrip("/")]
    expanded = os.path.expanduser(path)  # an unknown ~user stays as written
    try:
        resolved = Path(expanded).resolve()
        found = resolved.is_dir() or (gone and not os.path.exists(expanded))
    except (OSError, ValueError):  # ValueError: a NUL in the name
        found = False
    if not found:
        raise FieldError("under", f"{printable(str(path))}: no such folder")
    return list(dict.fromkeys([os.path.abspath(expanded), str(resolved)]))


def index_status(location: Location | Path | str, reader=None) -> tuple[dict, IndexDamagedError | None]:
    """What `blipsearch status` reports, and the damage found (if any). No model is loaded. With an open
    `reader`, its counts are reported, and only its feature segments are checked again (not the tables)."""
    from blipsearch.indexer.layout import disk_bytes, read_index_manifest
    from blipsearch.indexer.reader import IndexReader
    from blipsearch.indexer.store import check_tables

    manifest = read_index_manifest(location)  # none, or unreadable: nothing to report but the error
    checked = reader is not None
    damage, files, images, captions = None, None, None, None
    try:
        reader = reader or IndexReader.open(location)
        files, images = reader.counts()
        captions = reader.caption_count()
        if checked:
            reader.check_features(remote=True)  # a segment lost or cut short since it opened (stats, or a LIST)
        else:
            check_tables(location, manifest)
    except IndexDamagedError as exc:
        damage = exc
    identity, run = manifest.identity, manifest.run
    return {
        "index": str(location), "model": identity.model_id, "revision": identity.revision,
        "family": identity.family, "files": files, "images": images, "captions": captions,
        "captioner": run.captioner, "bytes": disk_bytes(location),
        "updated": run.updated, "interrupted": run.writing, "damaged": None if damage is None else str(damage),
        # whether queries read the snapshot: not while a run is under way, nor where it is missing or damaged
        # (None: no run has finished yet, or the index is damaged)
        "snapshot": None if reader is None or damage is not None or run.generation == 0 else reader.from_snapshot,
        "embedding_dim": identity.embed_dim, "feature_shape": [identity.feature_tokens, identity.feature_dim],
    }, damage
