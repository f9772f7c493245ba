"""`manifest.json`: what an index holds and how it was made, and the checks made against it."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from blipsearch.retrieval.errors import ModelMismatchError, StoreError
from blipsearch.retrieval.models.base import ModelInfo

from . import codec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def default_location() -> Path:
    """$BLIPSEARCH_INDEX, else the user data folder (e.g. ~/.local/share/blipsearch/index)."""
    if os.environ.get("BLIPSEARCH_INDEX"):
        return Path(os.environ["BLIPSEARCH_INDEX"]).expanduser()
    import platformdirs

    return platformdirs.user_data_path("blipsearch") / "index"


def manifest_for(info: ModelInfo) -> dict:
    """The identity part of a manifest, JSON-shaped (lists, not tuples) so that it compares with a stored one."""
    return json.loads(json.dumps({
        "schema_version": SCHEMA_VERSION,
        "model": {"id": info.model_id, "revision": info.revision, "family": info.family},
        "embedding": {"dim": info.embed_dim, "vectors_per_image": info.vectors_per_image},
        "features": {"tokens": info.feature_tokens, "dim": info.feature_dim, "codec": codec.CODEC},
        "preprocessing": info.preprocessing.to_dict(),
    }))


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError):  # no index there (or no folder at all)
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"index manifest {path / MANIFEST} is unreadable ({exc}); "
                         "rebuild with `blipsearch index --rebuild FOLDER`") from exc


def write_manifest(path: Path, manifest: dict) -> None:
    """Atomically: a reader sees the old manifest or the new one, never half of one."""
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path / MANIFEST)


def read_model_id(path: Path) -> str | None:
    """The model an existing index was built with, or None where there is no index."""
    manifest = read_manifest(path)
    return manifest["model"]["id"] if manifest else None


def record_bytes(manifest: dict) -> int:
    return codec.packed_bytes(manifest["features"]["tokens"], manifest["features"]["dim"])


def check_model(manifest: dict, info: ModelInfo, path: Path) -> None:
    """Refuse vectors from another model, revision or preprocessing than the index holds."""
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise StoreError(f"index at {path} was written by a newer blipsearch (schema "
                         f"{manifest['schema_version']}); upgrade blipsearch")
    expected = manifest_for(info)
    model = manifest["model"]
    same = model["revision"] == info.revision and all(
        manifest[key] == expected[key] for key in ("embedding", "features", "preprocessing"))
    if not same:
        raise ModelMismatchError(
            f"index at {path} holds vectors of model {model['id']} (revision {model['revision']}), not of "
            f"{info.model_id} (revision {info.revision}); query without --model to use the index's model, "
            "or rebuild it with `blipsearch index --rebuild --model MODEL FOLDER...` (or pick another --index)")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
