"""Find a checkpoint (local directory or Hugging Face hub id) and load its parts with one-line errors.

A hub id is read from the local cache first; the network is tried only when the hub answers a quick
probe, so an offline machine gets an immediate, actionable error instead of half a minute of retries.
"""

from __future__ import annotations

import hashlib
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


def from_pretrained(checkpoint: Checkpoint, loader: Any, **kwargs: Any) -> Any:
    """`loader.from_pretrained` with cache-first lookup and errors that say what to do."""
    if checkpoint.is_local:
        try:
            return loader.from_pretrained(checkpoint.source, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {checkpoint.name}: {_first_line(exc)}") from exc
    try:
        return loader.from_pretrained(checkpoint.source, local_files_only=True, **kwargs)
    except OSError:
        pass  # not cached (completely): try the hub below
    if not hub_reachable():
        raise ModelLoadError(
            f"cannot load model {checkpoint.name}: it is not in the local Hugging Face cache and the hub "
            "cannot be reached; pass a local model directory with --model PATH")
    try:
        return loader.from_pretrained(checkpoint.source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {checkpoint.name}: {_first_line(exc)}") from exc


def revision(checkpoint: Checkpoint, config: Any) -> str:
    """Hub commit hash, or a content fingerprint for a local directory."""
    if checkpoint.is_local:
        return fingerprint(checkpoint.source)
    return getattr(config, "_commit_hash", None) or "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
