"""`manifest.json`: what an index holds and how it was made, and the checks made against it.

Two parts, kept apart in code and side by side in the file:
  `Identity`  what the stored vectors mean: model id + revision + family, shapes, codec, preprocessing.
              Fixed when the index is created; a model that does not match it is refused.
  `RunState`  bookkeeping of the indexing runs: generation, the `writing` flag, feature segments.

The file is written atomically (a reader sees the old manifest or the new one). Every reader validates
it and turns anything unexpected into one `IndexDamagedError` line that says how to rebuild.
"""

from __future__ import annotations

import json
import os
import shlex
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path

from blipsearch.retrieval.errors import IndexDamagedError, ModelMismatchError, StoreError, first_line
from blipsearch.retrieval.models.base import ModelInfo

from . import codec
from .location import Location, location_of

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def default_location() -> Path:
    """$BLIPSEARCH_INDEX, else the user data folder (e.g. ~/.local/share/blipsearch/index)."""
    if os.environ.get("BLIPSEARCH_INDEX"):
        return Path(os.path.expanduser(os.environ["BLIPSEARCH_INDEX"]))
    import platformdirs

    return platformdirs.user_data_path("blipsearch") / "index"


def rebuild_hint(model_id: str | None) -> str:
    model = shlex.quote(model_id) if model_id else "MODEL"
    return f"rebuild it with `blipsearch index --rebuild --model {model} FOLDER...`"


@dataclass(frozen=True)
class Identity:
    """What the stored vectors mean. JSON form: the nested objects of manifest.json."""

    model_id: str
    revision: str
    family: str
    embed_dim: int
    vectors_per_image: int
    feature_tokens: int
    feature_dim: int
    codec: str
    preprocessing: dict

    @classmethod
    def of(cls, info: ModelInfo) -> Identity:
        return cls(info.model_id, info.revision, info.family, info.embed_dim, info.vectors_per_image,
                   info.feature_tokens, info.feature_dim, codec.CODEC,
                   json.loads(json.dumps(info.preprocessing.to_dict())))  # tuples as lists, as stored

    @property
    def record_bytes(self) -> int:
        return codec.packed_bytes(self.feature_tokens, self.feature_dim)

    def to_json(self) -> dict:
        return {
            "model": {"id": self.model_id, "revision": self.revision, "family": self.family},
            "embedding": {"dim": self.embed_dim, "vectors_per_image": self.vectors_per_image},
            "features": {"tokens": self.feature_tokens, "dim": self.feature_dim, "codec": self.codec},
            "preprocessing": self.preprocessing,
        }

    @classmethod
    def from_json(cls, data: dict) -> Identity:
        model, embedding, features = data["model"], data["embedding"], data["features"]
        identity = cls(model["id"], model["revision"], model["family"], embedding["dim"],
                       embedding["vectors_per_image"], features["tokens"], features["dim"], features["codec"],
                       data["preprocessing"])
        ints = (identity.embed_dim, identity.vectors_per_image, identity.feature_tokens, identity.feature_dim)
        strings = (identity.model_id, identity.revision, identity.family, identity.codec)
        if not (all(type(n) is int and n > 0 for n in ints) and all(isinstance(s, str) for s in strings)
                and isinstance(identity.preprocessing, dict)):
            raise ValueError("model or shape fields of the wrong type")
        return identity


@dataclass
class RunState:
    """Bookkeeping of indexing runs. JSON form: top-level keys of manifest.json."""

    generation: int = 0  # finished runs; the snapshot mirrors this generation
    writing: bool = False  # a run is under way, or the last one was killed: readers use the tables
    current_segment: int = 0  # feature segment this run appends to (0: none chosen yet)
    next_segment: int = 1  # segment ids are never reused: an older snapshot may still name one
    retired_segments: list[int] = field(default_factory=list)  # deleted at the start of the next run
    damaged: str | None = None  # why the index must be rebuilt (e.g. a --rebuild was cut short)
    captioner: str | None = None  # the captioner runs use, as `index --captions` last named it (None: no captions)
    # names one build of the index: a new index (or a --rebuild) gets a new one, so a reader tells a rebuilt
    # index from the one it opened where their generations coincide (None: written before builds were named)
    build: str | None = None
    created: str | None = None
    updated: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        state = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        counters = (state.generation, state.current_segment, state.next_segment, *state.retired_segments)
        if not (all(type(n) is int and n >= 0 for n in counters) and isinstance(state.writing, bool)
                and all(v is None or isinstance(v, str) for v in (state.captioner, state.build))):
            raise ValueError("run fields of the wrong type")
        return state


@dataclass
class Manifest:
    identity: Identity
    run: RunState
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def new(cls, info: ModelInfo) -> Manifest:
        return cls(Identity.of(info), RunState(build=uuid.uuid4().hex, created=now(), updated=now()))

    def to_json(self) -> dict:
        run = {k: v for k, v in asdict(self.run).items() if k != "damaged" or v is not None}
        return {"schema_version": self.schema_version, **self.identity.to_json(), **run}

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """Raises ValueError, KeyError or TypeError on anything that is not a manifest."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return cls(Identity.from_json(data), RunState.from_json(data), data["schema_version"])

    def hint(self) -> str:
        return rebuild_hint(self.identity.model_id)


def read_manifest(path: Location | Path | str) -> Manifest | None:
    """The index's manifest, None where there is none; `IndexDamagedError` where it cannot be used."""
    path = location_of(path)
    try:
        data = json.loads(path.read_bytes(MANIFEST).decode("utf-8"))
    except FileNotFoundError:  # no index there (or no folder at all)
        return None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise _unreadable(path, exc) from exc
    try:
        manifest = Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    if manifest.schema_version > SCHEMA_VERSION:
        raise StoreError(f"the index at {path} was written by a newer blipsearch (schema "
                         f"{manifest.schema_version}); upgrade blipsearch")
    return manifest


def _unreadable(path: Path, exc: BaseException) -> IndexDamagedError:
    detail = f"missing field {exc}" if isinstance(exc, KeyError) else first_line(exc)
    return IndexDamagedError(f"the manifest of the index at {path} is damaged ({detail}); "
                             f"{rebuild_hint(recorded_model(path))}")


def recorded_model(path: Location | Path | str) -> str | None:
    """The index's model id, from its manifest or, where that is lost, from the snapshot's copy of it."""
    from .snapshot import snapshot_model

    path = location_of(path)
    try:
        return str(json.loads(path.read_bytes(MANIFEST).decode("utf-8"))["model"]["id"])
    except Exception:  # any damage: look for the copy
        return snapshot_model(path)


def write_manifest(path: Location | Path | str, manifest: Manifest) -> None:
    """Atomically and durably: a reader, or a machine after a power loss, sees the old manifest or the new one."""
    location_of(path).write_bytes(MANIFEST, json.dumps(manifest.to_json(), indent=2).encode("utf-8"))


def check_model(manifest: Manifest, info: ModelInfo, path: Location | Path) -> None:
    """Refuse vectors from another model, family, revision or preprocessing than the index holds."""
    stored, asked = manifest.identity, Identity.of(info)
    if stored == replace(asked, model_id=stored.model_id):  # the same files may be named two ways
        return
    if stored.revision == asked.revision:  # the same model, but the index says other shapes: a hand-edited manifest
        differ = [f.name for f in fields(Identity) if f.name != "model_id" and getattr(stored, f.name) !=
                  getattr(asked, f.name)]
        raise ModelMismatchError(f"the index at {path} records other {', '.join(differ)} than its model "
                                 f"{asked.model_id} gives; {rebuild_hint(asked.model_id)}")
    if stored.model_id == asked.model_id:
        raise ModelMismatchError(
            f"the model {asked.model_id} has changed since it built the index at {path} (revision "
            f"{stored.revision} then, {asked.revision} now): restore it, or {rebuild_hint(asked.model_id)}")
    raise ModelMismatchError(
        f"the index at {path} holds vectors of the {stored.family} model {stored.model_id} (revision "
        f"{stored.revision}), not of the {asked.family} model {asked.model_id} (revision {asked.revision}); "
        f"leave out --model to use the index's model, or {rebuild_hint(asked.model_id)} "
        "(or pick another --index)")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
