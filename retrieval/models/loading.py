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
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ModelLoadError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# What a retrieval checkpoint needs from a hub repository (configs, tokenizer, weights); older repositories
# (Salesforce's BLIP ones among them) hold PyTorch pickles only, fetched when no safetensors came.
_DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


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
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {name} has no config.json; pass a directory written by "
                                 "save_pretrained (or by `blipsearch train`) or a hub id")
        return Checkpoint(name, str(path.resolve()), True)
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return Checkpoint(name, name, False)
    raise ModelLoadError(f"model {name!r} is neither an existing directory nor a hub id like 'org/name'")


def fingerprint(directory: str | Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A cheap content fingerprint of a local checkpoint: config plus sampled chunks of each weight file.

    Training changes every weight, so sampled chunks detect a retrained model without reading gigabytes.
    """
    directory = Path(directory)
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for path in sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            for i in range(samples):
                f.seek(size * i // samples)
                digest.update(f.read(chunk))
    return "sha256:" + digest.hexdigest()[:16]


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
            "cannot be reached; pass a local model directory with --model PATH")
    try:
        directory = Path(snapshot_download(checkpoint.source, allow_patterns=_DOWNLOAD_PATTERNS))
        if not has_safetensors(directory):
            directory = Path(snapshot_download(checkpoint.source, allow_patterns=_PICKLE_PATTERNS))
        return directory
    except Exception as exc:  # network, authorisation, missing repository
        raise ModelLoadError(f"cannot download model {checkpoint.name}: {_first_line(exc)}") from exc


def from_pretrained(directory: Path, name: str, loader: Any, **kwargs: Any) -> Any:
    """`loader.from_pretrained(directory)` with one-line errors naming the model."""
    try:
        return loader.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name}: {_first_line(exc)}") from exc


def revision(checkpoint: Checkpoint, directory: Path) -> str:
    """Hub commit hash (the snapshot folder's name), or a content fingerprint for a local directory."""
    return fingerprint(directory) if checkpoint.is_local else directory.name


def read_config(directory: Path, name: str) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the config.json of model {name}: {exc}") from exc


def read_tensors(directory: Path, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The checkpoint's tensors whose names start with `prefixes`, from safetensors files (any shards)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model directory {directory} has no .safetensors weights")
    tensors = {}
    try:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)})  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError on damaged files
        raise ModelLoadError(f"cannot read the weights in {directory}: {_first_line(exc)}") from exc
    return tensors


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

    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(directory / "model.safetensors")
    except OSError as exc:
        log.info("could not cache converted weights in %s: %s", directory, exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
