"""Find a checkpoint (local directory or Hugging Face hub id) and load its parts with one-line errors.

A hub id is read from the local cache first; the network is tried only when the hub answers a quick
probe, so an offline machine gets an immediate, actionable error instead of half a minute of retries.
Everything is then loaded from one local folder (the directory, or the hub snapshot in the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ..errors import ModelLoadError, first_line

if TYPE_CHECKING:
    from .base import ModelInfo

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt")
_SETTLED_NS = 2_000_000_000  # a file modified this recently may still be written: hash it, cache it later
# What a retrieval checkpoint needs from a hub repository (configs, tokenizer, weights); older repositories
# (Salesforce's BLIP ones among them) hold PyTorch pickles only, fetched when no safetensors came.
_DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
DAMAGED_HINT = "if the file is damaged or incomplete, download the model again or re-export it"


@dataclass(frozen=True)
class Checkpoint:
    """Where a model's files come from."""

    name: str  # what the user passed
    source: str  # what from_pretrained receives: an absolute directory or a hub id
    is_local: bool

    @property
    def model_id(self) -> str:
        return self.source


def resolve(name: str) -> Checkpoint:
    """A local directory wins over a hub id of the same spelling."""
    path = Path(os.path.expanduser(name))  # (an unknown ~user stays as it is: Path.expanduser raises)
    if path.is_file():
        raise ModelLoadError(f"model {name} is a file; pass the folder that holds its config.json and weights "
                             "(written by save_pretrained or `blipsearch train`), or a hub id")
    if path.exists():
        exported = [sub for sub in ("retrieval", "captioner") if (path / sub / "config.json").is_file()]
        if exported and (path / "log.jsonl").is_file():  # a run folder: its config.json is the training config
            raise ModelLoadError(f"model {name} is a training run's folder; pass the model it exported: "
                                 + " or ".join(f"{os.path.join(name, sub)} ({sub})" for sub in exported))
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {name} has no config.json; pass a directory written by "
                                 "save_pretrained (or by `blipsearch train`) or a hub id")
        return Checkpoint(name, str(path.resolve()), True)
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return Checkpoint(name, name, False)
    raise ModelLoadError(f"model {name!r} is neither an existing directory nor a hub id like 'org/name'")


def fingerprint(directory: str | Path) -> str:
    """A content hash of a local checkpoint: every byte of config.json, the tokenizer's vocabulary and each
    weight file, so that any retraining or edit (one negated head) gives another revision.

    Each file's hash is cached by (path, size, mtime_ns, inode) in the user cache: a multi-GB checkpoint
    is read in full once, later loads only stat it.
    """
    directory = Path(directory)
    cache_path = _hash_cache_path()
    cache = _load_hash_cache(cache_path)
    known = dict(cache)
    digest = hashlib.sha256()
    for path in _identity_files(directory):
        digest.update(f"{path.name}:{_cached_file_hash(path, cache)}\n".encode())
    if cache != known:
        _save_hash_cache(cache_path, cache)
    return "sha256:" + digest.hexdigest()[:16]


def _identity_files(directory: Path) -> list[Path]:
    """What decides a checkpoint's outputs: its config, vocabulary and weights (sorted, so order is stable)."""
    named = [directory / n for n in ("config.json", *_VOCABULARY_FILES) if (directory / n).is_file()]
    return named + sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())


def _cached_file_hash(path: Path, cache: dict[str, Any]) -> str:
    """The file's sha256, from `cache` when its (size, mtime_ns, inode) are unchanged; updates `cache`."""
    stat = path.stat()  # before reading: a file changed meanwhile gets another stamp next time
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    entry = cache.get(key)
    if isinstance(entry, list) and len(entry) == 4 and entry[:3] == stamp and isinstance(entry[3], str):
        return entry[3]
    digest = hash_file(path)
    if time.time_ns() - stat.st_mtime_ns > _SETTLED_NS:
        cache[key] = [*stamp, digest]
    return digest


def hash_file(path: Path) -> str:
    """sha256 of the whole file, streamed (hashlib reads it in chunks)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_cache_path() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("blipsearch") / "file-hashes.json"


def _load_hash_cache(path: Path) -> dict[str, Any]:
    """{absolute path: [size, mtime_ns, inode, sha256]}; empty when the cache is absent or damaged."""
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # absent, unreadable, not JSON, other shape
        if not isinstance(exc, FileNotFoundError):
            log.info("ignoring the file-hash cache %s: %s", path, first_line(exc))
        return {}
    return files if isinstance(files, dict) else {}


def _save_hash_cache(path: Path, files: dict[str, Any]) -> None:
    """Write the cache atomically, without the entries of files that are gone."""
    kept = {key: entry for key, entry in files.items() if os.path.exists(key)}
    text = json.dumps({"version": 1, "files": kept})
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint accepts a TCP connection; False offline or with HF_HUB_OFFLINE set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def local_directory(checkpoint: Checkpoint) -> Path:
    """The folder holding the checkpoint's files: the directory itself, or the hub snapshot in the cache.

    A hub id is looked up in the cache first and downloaded only when missing and the hub answers.
    """
    if checkpoint.is_local:
        return Path(checkpoint.source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(checkpoint.source, local_files_only=True))
    except Exception:  # huggingface_hub signals "not cached" with several exception types
        pass
    if not hub_reachable():
        raise ModelLoadError(
            f"cannot load model {checkpoint.name}: it is not in the local Hugging Face cache and the hub "
            "cannot be reached; pass the path of a local copy of it instead")
    try:
        directory = Path(snapshot_download(checkpoint.source, allow_patterns=_DOWNLOAD_PATTERNS))
        if not has_safetensors(directory):
            directory = Path(snapshot_download(checkpoint.source, allow_patterns=_PICKLE_PATTERNS))
        return directory
    except Exception as exc:  # network, authorisation, missing repository
        raise ModelLoadError(f"cannot download model {checkpoint.name}: {first_line(exc)}") from exc


def from_pretrained(directory: Path, name: str, loader: Any, **kwargs: Any) -> Any:
    """`loader.from_pretrained(directory)` with one-line errors naming the model."""
    try:
        return loader.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name}: {first_line(exc)}") from exc
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # torch.load of a damaged or cut-short file
        raise ModelLoadError(f"cannot load model {name}: {first_line(exc)}; {DAMAGED_HINT}") from exc


def revision(checkpoint: Checkpoint, directory: Path) -> str:
    """Hub commit hash (the snapshot folder's name), or a content fingerprint for a local directory."""
    if not checkpoint.is_local:
        return directory.name
    try:
        return fingerprint(directory)
    except OSError as exc:
        raise ModelLoadError(f"cannot read the files of model {checkpoint.name} ({first_line(exc)}); check that "
                             "they are readable") from exc


def read_config(directory: Path, name: str) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the config.json of model {name}: {exc}") from exc


@dataclass(frozen=True)
class WeightsSpec:
    """What one family's retrieval checkpoint must hold, and the transformers class that reads any format."""

    transformers_class: str  # e.g. "BlipForImageTextRetrieval"
    required: tuple[str, ...]  # top-level modules that must carry trained weights
    refusal: str  # ends the refusal of a checkpoint without them: what it is not, what to use instead


def read_state(name: str, directory: Path, info: ModelInfo, modules: tuple[str, ...],
               spec: WeightsSpec, dtypes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The tensors of `modules`: from safetensors (the checkpoint's own, or a converted copy in the user
    cache), else through transformers, which reads any format; that copy is then cached as safetensors.
    A checkpoint whose `spec.required` modules would stay at random initialisation is refused.
    A tensor whose name starts with a key of `dtypes` comes in that dtype (cast as it is read)."""
    dtypes = dtypes or {}
    if has_safetensors(directory):
        return _safetensors_state(directory, name, modules, spec, dtypes)
    converted = converted_directory(info.model_id, info.revision)
    if has_safetensors(converted):
        try:
            return _safetensors_state(converted, name, modules, spec, dtypes)
        except ModelLoadError as exc:  # a damaged cache is rebuilt, not reported as a damaged model
            log.warning("converting model %s again: its cached copy is unreadable (%s)", name, exc)
    state = state_via_transformers(directory, name, spec)
    save_converted(converted, state)
    return {key: _cast(key, tensor, dtypes) for key, tensor in state.items()}


def _safetensors_state(directory: Path, name: str, modules: tuple[str, ...], spec: WeightsSpec,
                       dtypes: Mapping[str, Any]) -> dict[str, Any]:
    present = {key.split(".")[0] for key in safetensors_keys(directory, name)}
    refuse_missing(name, set(spec.required) - present, spec)
    return read_tensors(directory, name, modules, dtypes)


def state_via_transformers(directory: Path, name: str, spec: WeightsSpec) -> dict[str, Any]:
    """All tensors, read by `spec.transformers_class` (any weight format); refuses untrained heads."""
    import transformers

    loader = getattr(transformers, spec.transformers_class)
    model, loading = from_pretrained(directory, name, loader, output_loading_info=True)
    missing = {key.split(".")[0] for key in loading.get("missing_keys", ())}
    missing |= {key.split(".")[0] for key, *_ in loading.get("mismatched_keys", ())}
    refuse_missing(name, missing, spec)
    return model.state_dict()


def refuse_missing(name: str, missing: set[str], spec: WeightsSpec) -> None:
    """Refuse checkpoints whose retrieval modules would be left at random initialisation."""
    absent = sorted(missing & set(spec.required))
    if absent:
        raise ModelLoadError(f"model {name} has no trained weights for {', '.join(absent)}: {spec.refusal}")


def read_tensors(directory: Path, name: str, prefixes: tuple[str, ...],
                 dtypes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's tensors whose names start with `prefixes`, from safetensors files (any shards); one
    whose name starts with a key of `dtypes` is cast to that dtype as it is read.

    safetensors checks each file's header; the data are then read with plain reads, a tensor at a time,
    not through safetensors' memory map: a mapped file keeps every page the load touched in the process's
    resident memory for as long as any tensor from it lives (for BLIP-2 ViT-g, whose Q-Former stays fp32,
    all 4.6 GB beside the 1.9 GB the bf16 ViT keeps). Memory then holds what the model keeps plus one tensor.
    """
    tensors = {}
    for path in _safetensors_files(directory):
        with open_safetensors(path, name) as f:
            keys = [k for k in f.keys() if k.startswith(prefixes)]  # noqa: SIM118
        tensors.update(_read_safetensors_data(path, name, keys, dtypes or {}))
    return tensors


# safetensors' dtype names -> torch's
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read_safetensors_data(path: Path, name: str, keys: list[str], dtypes: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors `keys` of one safetensors file (8-byte header length, JSON header, data), read in place."""
    import torch

    tensors = {}
    staging = torch.empty(0, dtype=torch.uint8)  # reused for tensors that get cast: fresh pages cost page faults
    try:
        with path.open("rb") as f:
            header, data_start = _safetensors_header(f)
            for key in keys:
                entry = header[key]
                begin, end = entry["data_offsets"]  # relative to the end of the header
                stored = getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
                cast = _target_dtype(key, dtypes) not in (None, stored)
                if cast and staging.numel() < end - begin:
                    staging = torch.empty(end - begin, dtype=torch.uint8)
                raw = staging[:end - begin] if cast else torch.empty(end - begin, dtype=torch.uint8)
                f.seek(data_start + begin)
                if f.readinto(raw.numpy()) != end - begin:
                    raise OSError(f"tensor {key} is cut short")
                tensors[key] = _cast(key, raw.view(stored).reshape(entry["shape"]), dtypes)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: sizes that do not fit the dtype
        raise ModelLoadError(f"cannot read the weights file {path} of model {name} ({first_line(exc)}); "
                             f"{DAMAGED_HINT}") from exc
    return tensors


def read_arrays(directory: Path, name: str, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The checkpoint's float tensors whose names start with `prefixes`, as float32 numpy arrays, from its
    safetensors files (any shards), without torch: what the numpy text tower (blip_text_numpy.py) reads.

    float32 tensors are read-only views of the file mapped into memory: nothing is read until a product
    touches it, and then straight from the page cache (BLIP-base's text side, 524 MB: a 0.27-0.55 s read and
    0.22 s of copies before, against ~0.25 s of page-ins spread over the first pass). Others (fp16, bf16) are
    converted into memory. As with any mapped weights (safetensors' own loader maps them too), a file cut
    short in place while a process uses it ends that process; replacing it (a new file renamed over it) is
    safe."""
    import mmap

    import numpy as np

    stored_as = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
    arrays = {}
    for path in _safetensors_files(directory):
        try:
            with path.open("rb") as f:
                header, data_start = _safetensors_header(f)
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            for key, entry in header.items():
                # integer buffers (older exports keep `position_ids`, I64) are no weights: the towers never ask
                if key == "__metadata__" or not key.startswith(prefixes) or entry["dtype"] not in stored_as:
                    continue
                dtype = np.dtype(stored_as[entry["dtype"]])
                begin, end = entry["data_offsets"]
                count = int(np.prod(entry["shape"], dtype=np.int64))
                if end - begin != count * dtype.itemsize:
                    raise ValueError(f"tensor {key}: {end - begin} bytes for shape {entry['shape']}")
                offset = data_start + begin
                if offset + end - begin > len(mapped):
                    raise OSError(f"tensor {key} is cut short")
                values = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(entry["shape"])
                if entry["dtype"] == "BF16":  # bf16 is the upper half of a float32
                    values = (values.astype(np.uint32) << 16).view(np.float32)
                elif entry["dtype"] != "F32" or offset % dtype.itemsize:
                    values = values.astype(np.float32)  # a copy: converted, or aligned for the BLAS
                arrays[key] = values
        except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: sizes that do not fit the shape
            raise ModelLoadError(f"cannot read the weights file {path} of model {name} ({first_line(exc)}); "
                                 f"{DAMAGED_HINT}") from exc
    return arrays


def _safetensors_header(f) -> tuple[dict, int]:
    """A safetensors file's JSON header (after its 8-byte length) and where its data start; offsets in the
    header count from there."""
    header_size = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(header_size)), 8 + header_size


def _target_dtype(key: str, dtypes: Mapping[str, Any]) -> Any:
    return next((d for prefix, d in dtypes.items() if key.startswith(prefix)), None)


def _cast(key: str, tensor: Any, dtypes: Mapping[str, Any]) -> Any:
    dtype = _target_dtype(key, dtypes)
    return tensor if dtype is None else tensor.to(dtype)


def safetensors_keys(directory: Path, name: str) -> set[str]:
    """The names of every tensor in the checkpoint's safetensors files (headers only)."""
    keys: set[str] = set()
    for path in _safetensors_files(directory):
        with open_safetensors(path, name) as f:
            keys.update(f.keys())
    return keys


@contextmanager
def open_safetensors(path: Path, name: str) -> Iterator[Any]:
    """`safe_open(path)` for its header (keys, metadata); a damaged, cut-short or unreadable file of model `name`
    is a one-line error. The numpy framework: the "pt" one imports torch, which a text query may not need."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read the weights file {path} of model {name} ({first_line(exc)}); "
                             f"{DAMAGED_HINT}") from exc


def _safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model directory {directory} has no .safetensors weights")
    return files


def has_safetensors(directory: Path) -> bool:
    return any(directory.glob("*.safetensors"))


def converted_directory(model_id: str, revision: str) -> Path:
    """Where a checkpoint without safetensors gets a safetensors copy, so later loads skip transformers."""
    import platformdirs

    key = hashlib.sha256(f"{model_id}@{revision}".encode()).hexdigest()[:16]
    return platformdirs.user_cache_path("blipsearch") / "converted" / key


def save_converted(directory: Path, state: dict[str, Any]) -> None:
    """Write `state` as directory/model.safetensors atomically; a cache that cannot be written is skipped."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state.items()}
    write_atomically(directory / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))


def write_atomically(target: Path, write: Callable[[Path], object]) -> bool:
    """`write(tmp)` then rename tmp to `target`, for caches: on failure log, leave no tmp, return False."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        tmp.replace(target)
        return True
    except OSError as exc:
        log.info("could not write the cache file %s: %s", target, first_line(exc))
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False
