"""Indexing on a Ray cluster (`blipsearch index --ray [ADDRESS]`): the plan and the index of pipeline.py, with
reading and encoding spread over Ray Data.

    driver   scan and plan (pipeline.plan): unchanged files are not read, vanished ones removed
    tasks    read, hash, read metadata, decode new contents (pipeline.read_file): CPU tasks of `map_batches`
    actors   an actor pool, each loading the model once (one GPU each where the cluster has GPUs): encode a
             batch and write its feature records as one new segment (a file, or an object on s3://)
    write    Ray Data writes the image rows, then the file rows, as Lance fragments, each table in one commit
             (lance-ray's `write_lance`); the driver then prunes, compacts and writes the snapshot as any run does

A killed driver stops the job. What it committed stays: a table commit is whole or absent. Segments written
without the rows that name them are freed by the next run; rows of changed files are deleted just before their
new rows are written, so a driver killed in between leaves those files unindexed until the next run, which
reads them again and reuses their stored features. The index stays usable throughout.

Captions are not written here: a later single-process `blipsearch index --captions` run captions what a Ray
run added, without encoding anything again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lance_ray
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from blipsearch.retrieval.errors import InvalidInputError, StoreError, first_line

from . import codec
from .features import segments_at
from .location import location_of
from .pipeline import UNREACHABLE_REASON, IndexOptions, IndexSummary, plan, read_file, skip_file
from .scan import FileStat
from .store import FILES_SCHEMA, IndexWriter, images_schema

log = logging.getLogger(__name__)

READ_BATCH = 32  # files per read task
# What a read task asks of a node's memory beside its CPU: one photo read and decoded at a time (a 50 MP PNG
# decodes to 150 MB) and READ_BATCH model inputs. It also keeps decoding out of the encoder actors: Ray Data
# fuses a task map into the next map wherever their requests agree, and an encoder actor on a small node asks
# for one CPU, as a read task does.
READ_TASK_MEMORY = 256 * 2**20


@dataclass
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray instance
    model: str = ""  # what each actor loads (hub id or folder every node can read)
    device: str = "auto"
    precision: str = "auto"
    actors: int | None = None  # encoder actors; None: one per GPU, else one per 8 CPUs (at least one)
    batch_size: int = 64  # images per encoder call, and per feature segment
    reduced_decode: bool = True


_INPUT = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("old_hash", pa.string())])


def index_on_ray(roots: Sequence[str | Path], store: IndexWriter, options: IndexOptions, ray_options: RayOptions,
                 preprocessing) -> IndexSummary:
    """One run, as `pipeline.index_folders`, with Ray Data doing the reading and encoding."""
    summary = IndexSummary()
    _, changed = plan(roots, store, options, summary)
    if changed:
        _start_ray(ray_options, options.progress)
        try:
            _encode_changed(changed, store, options, ray_options, preprocessing, summary)
        except ray.exceptions.RayError as exc:  # a task or actor failed: the cause, in one line
            cause = getattr(exc, "cause", None) or exc
            raise StoreError(f"the Ray job failed ({first_line(cause)}); what it committed is kept, run again "
                             "once the cause is fixed") from exc
    store.prune_images()
    summary.discount_moves()
    store.finish()
    return summary


def _start_ray(ray_options: RayOptions, progress: bool) -> None:
    """Connect (or start a local instance); Ray Data reports through its progress bars only where asked."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
        # the driver's object-storage settings travel with the job: its workers read and write the same places
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        try:
            ray.init(address=ray_options.address, log_to_driver=False, include_dashboard=False,
                     logging_level=logging.WARNING, runtime_env={"env_vars": env})
        except Exception as exc:  # no cluster at the address, a version mismatch, ...
            where = f" at {ray_options.address}" if ray_options.address else ""
            raise InvalidInputError(f"cannot start or reach Ray{where} ({first_line(exc)}); check --ray ADDRESS "
                                    "or RAY_ADDRESS") from exc
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)


def _encode_changed(changed: list[FileStat], store: IndexWriter, options: IndexOptions, ray_options: RayOptions,
                    preprocessing, summary: IndexSummary) -> None:
    from ray.data import ActorPoolStrategy

    stored = store.file_records()
    identity = store.manifest.identity
    known = ray.put(frozenset(store.known_hashes()))
    # contents stored by a killed run before any file row named them: their files count as indexed
    unnamed = frozenset(store.known_hashes() - {record.hash for record in stored.values()})
    ids = _SegmentIds.remote(store.manifest.run.next_segment)
    rows = pa.table({"path": [f.path for f in changed], "size": [f.size for f in changed],
                     "mtime_ns": [f.mtime_ns for f in changed],
                     "old_hash": [stored[f.path].hash if f.path in stored else None for f in changed]}, schema=_INPUT)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = ray_options.actors or gpus or max(1, cpus // 8)
    per_actor = {"num_gpus": 1} if gpus else {"num_cpus": max(1, min(8, cpus // (actors + 1)))}
    ds = ray.data.from_arrow(rows).repartition(max(1, len(changed) // READ_BATCH))
    # decoding runs in tasks beside the encoder actors, not inside them one after the other (READ_TASK_MEMORY)
    ds = ds.map_batches(_read_batch, batch_format="pyarrow", batch_size=READ_BATCH, num_cpus=1,
                        memory=READ_TASK_MEMORY,
                        fn_kwargs={"known": known, "preprocessing": preprocessing,
                                   "reduced_decode": ray_options.reduced_decode})
    ds = ds.map_batches(_Encoder, batch_format="pyarrow", batch_size=ray_options.batch_size,
                        compute=ActorPoolStrategy(min_size=1, max_size=actors),
                        fn_constructor_kwargs={"options": ray_options, "location": _absolute(store.path),
                                               "record_bytes": identity.record_bytes, "ids": ids,
                                               "unnamed": unnamed},
                        **per_actor)
    out = ds.materialize()
    width = identity.embed_dim * identity.vectors_per_image
    skipped = _count(out, options, summary)
    store.segments_taken(ray.get(ids.next.remote()))
    images = out.map_batches(_image_rows, batch_format="pyarrow", fn_kwargs={"width": width})
    _write(images, store, "images", images_schema(width))
    # as the single-process path: a file read again gets a new row; a skipped one keeps its row unless it changed
    # (one whose storage did not answer keeps its row: nothing is known of it)
    stale = [f.path for f in changed if f.path in stored and not skipped.get(f.path, "").startswith(
        UNREACHABLE_REASON) and (f.path not in skipped or (stored[f.path].size, stored[f.path].mtime_ns) != (
            f.size, f.mtime_ns))]
    store.delete_files(stale)
    summary.removed += sum(path in skipped for path in stale)  # a changed file that no longer decodes left
    _write(out.map_batches(_file_rows, batch_format="pyarrow"), store, "files", FILES_SCHEMA)
    store.external_commits()
    duplicates = store.drop_duplicate_images()
    if duplicates:
        log.info("%d identical new contents were encoded by more than one batch: extra rows dropped", duplicates)


def _absolute(location) -> str:
    """The index as Ray workers, started in other folders or on other machines, find it."""
    return location.url if location.remote else str(location.path.absolute())


def _write(rows, store: IndexWriter, table: str, schema: pa.Schema) -> None:
    """Rows as Lance fragments written by Ray tasks, committed to the table once."""
    store.path.check_writer()  # as every write of the single-process path (store._writes)
    if not rows.count():
        return
    try:
        lance_ray.write_lance(rows, store.table_uri(table), schema=schema, mode="append")
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc
        raise StoreError(f"cannot write the {table} table of the index at {store.path} ({first_line(cause)}); "
                         "run again (what was committed before is kept)") from exc


def _count(out, options: IndexOptions, summary: IndexSummary) -> dict[str, str]:
    """Count the run's files into `summary`, report the skipped ones; returns their paths and reasons."""
    counts = {row["kind"]: row["count()"] for row in out.groupby("kind").count().take_all()}
    summary.indexed += counts.get("indexed", 0)
    summary.reused += counts.get("reused", 0)
    if counts.get("reused"):  # their contents: the moves among the removed paths (IndexSummary.discount_moves)
        reused = out.map_batches(lambda t: t.filter(pc.equal(t["kind"], "reused")).select(["hash"]),
                                 batch_format="pyarrow")
        summary.reused_hashes += [row["hash"] for row in reused.take_all()]
    summary.unchanged += counts.get("touched", 0)
    skipped = out.map_batches(lambda t: t.filter(pc.equal(t["kind"], "skipped")).select(["path", "reason"]),
                              batch_format="pyarrow")
    paths = {}
    for row in skipped.take_all():
        skip_file(row["path"], row["reason"], options, summary)
        paths[row["path"]] = row["reason"]
    return paths


def _read_batch(batch: pa.Table, known, preprocessing, reduced_decode: bool) -> pa.Table:
    """In a CPU task: read, hash and (for new contents) decode each file of the batch."""
    known = _cached(known)
    out = {name: [] for name in ("hash", "taken", "camera", "width", "height", "pixels", "reason")}
    for path, size, mtime_ns in zip(*(batch[c].to_pylist() for c in ("path", "size", "mtime_ns")), strict=True):
        read, _ = read_file(FileStat(path, size, mtime_ns), known, preprocessing, reduced_decode)
        image = read.image
        out["hash"].append(read.digest)
        out["taken"].append(read.meta.taken if read.meta else None)
        out["camera"].append(read.meta.camera if read.meta else None)
        out["width"].append(image.width if image is not None else None)
        out["height"].append(image.height if image is not None else None)
        out["pixels"].append(image.pixels.tobytes() if image is not None and read.reason is None else None)
        out["reason"].append(read.reason)
    types = {"hash": pa.string(), "taken": pa.int64(), "camera": pa.string(), "width": pa.int32(),
             "height": pa.int32(), "pixels": pa.large_binary(), "reason": pa.string()}
    for name, values in out.items():
        batch = batch.append_column(pa.field(name, types[name]), pa.array(values, types[name]))
    return batch


_CACHE: dict = {}


def _cached(known):
    """The known hashes, fetched once per worker process (Ray Data may hand over the value itself)."""
    if not isinstance(known, ray.ObjectRef):
        return known
    if _CACHE.get("ref") != known:
        _CACHE.update(ref=known, value=ray.get(known))
    return _CACHE["value"]


class _Encoder:
    """An actor of the pool: the model, loaded once; each call encodes the new contents of one batch and
    writes their feature records as one new segment."""

    def __init__(self, options: RayOptions, location: str, record_bytes: int, ids, unnamed: frozenset[str]):
        from blipsearch.retrieval.device import keep_freed_memory
        from blipsearch.retrieval.models import load_model

        keep_freed_memory()  # as the CLI does: the actor's process never went through it
        self.model = load_model(options.model, device=options.device, precision=options.precision)
        self.segments = segments_at(location_of(location), record_bytes)
        self.ids, self.unnamed = ids, unnamed

    def __call__(self, batch: pa.Table) -> pa.Table:
        pre = self.model.info.preprocessing
        pixels, hashes = batch["pixels"].to_pylist(), batch["hash"].to_pylist()
        first = {}  # hash -> row of its first copy in this batch
        for row, (data, digest) in enumerate(zip(pixels, hashes, strict=True)):
            if data is not None:
                first.setdefault(digest, row)
        n = len(batch)
        embeddings, segment, slot = [None] * n, [None] * n, [None] * n
        if first:
            images = [np.frombuffer(pixels[row], np.uint8).reshape(pre.height, pre.width, 3) for row in first.values()]
            encoded = self.model.encode_images(self.model.pixel_values(images))
            records = [packed.record() for packed in codec.pack(encoded.features)]
            number = ray.get(self.ids.next.remote())
            slots = self.segments.append(number, records)
            for i, row in enumerate(first.values()):
                embeddings[row] = encoded.embeddings[i].numpy().astype(np.float32).ravel()
                segment[row], slot[row] = number, slots[i]
        width = len(next(e for e in embeddings if e is not None)) if first else 1
        flat = np.concatenate([e if e is not None else np.zeros(width, np.float32) for e in embeddings]) if n else \
            np.zeros(0, np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat), width,
                                                    mask=pa.array([e is None for e in embeddings]))
        kinds = [_kind(batch, row, row in first.values() or hashes[row] in self.unnamed) for row in range(n)]
        batch = batch.drop_columns(["pixels"]).append_column("embedding", vectors)
        batch = batch.append_column("segment", pa.array(segment, pa.int32()))
        batch = batch.append_column("slot", pa.array(slot, pa.int64()))
        return batch.append_column("kind", pa.array(kinds, pa.string()))


def _kind(batch: pa.Table, row: int, new: bool) -> str:
    """How the summary counts a file: indexed (its content encoded now, or stored by a killed run that named it
    in no file row), reused (moved or copied), touched (same bytes, new mtime), skipped."""
    if batch["reason"][row].as_py() is not None:
        return "skipped"
    if new or batch["pixels"][row].as_py() is not None:
        return "indexed"
    return "touched" if batch["old_hash"][row].as_py() == batch["hash"][row].as_py() else "reused"


def _image_rows(batch: pa.Table, width: int) -> pa.Table:
    rows = batch.filter(pc.is_valid(batch["segment"]))
    n = len(rows)
    return pa.table({
        "hash": rows["hash"], "embedding": rows["embedding"].cast(pa.list_(pa.float32(), width)),
        "segment": rows["segment"], "slot": rows["slot"], "width": rows["width"], "height": rows["height"],
        "caption": pa.nulls(n, pa.string()), "captioner": pa.nulls(n, pa.string()),
    }, schema=images_schema(width))


def _file_rows(batch: pa.Table) -> pa.Table:
    rows = batch.filter(pc.not_equal(batch["kind"], "skipped"))
    return pa.table({"path": rows["path"], "size": rows["size"], "mtime_ns": rows["mtime_ns"], "hash": rows["hash"],
                     "taken": rows["taken"], "camera": rows["camera"], "meta": pa.array([True] * len(rows))},
                    schema=FILES_SCHEMA)


@ray.remote(num_cpus=0)
class _SegmentIds:
    """Hands out feature segment ids, each once, from the index's first free one."""

    def __init__(self, first: int):
        self.value = first

    def next(self) -> int:
        self.value += 1
        return self.value - 1
