"""The names in an index (a folder or an object prefix, see location.py), and which may be used as one.

    manifest.json   what the index holds and the state of its runs (manifest.py)
    files.lance     one row per indexed file (store.py)
    images.lance    one row per distinct content (store.py)
    features/       ITM token features in segment files (features.py)
    snapshot/       what queries read (snapshot.py)
    .lock           held by the one process that writes

Anything else in the folder means it is not ours to write or delete, except the files that desktops and
network file systems drop everywhere (`.DS_Store`, `Thumbs.db`, `.nfs*`, ...), which are ignored.
"""

from __future__ import annotations

from pathlib import Path

from blipsearch.retrieval.errors import IndexDamagedError, IndexMissingError, InvalidInputError, first_line, printable

from . import snapshot
from .features import FOLDER as FEATURES
from .location import LOCK, Location, location_of
from .manifest import MANIFEST, Manifest, read_manifest, rebuild_hint, recorded_model

FILES, IMAGES = "files", "images"
DATA_NAMES = frozenset({f"{FILES}.lance", f"{IMAGES}.lance", FEATURES, snapshot.FOLDER})
INDEX_NAMES = DATA_NAMES | {MANIFEST, MANIFEST + ".tmp", LOCK, snapshot.FOLDER + ".tmp", snapshot.FOLDER + ".old"}
_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".directory", ".localized"})
_JUNK_PREFIXES = (".nfs", "._", ".fuse_hidden", ".smbdelete")


def is_junk(name: str) -> bool:
    """Files that desktops and network file systems leave in any folder they show."""
    return name in _JUNK_NAMES or name.startswith(_JUNK_PREFIXES)


def check_folder(path: Location | Path | str) -> None:
    """Refuse a location holding anything but an index (and junk): it is not ours to write into or delete."""
    foreign = _foreign(path)
    if foreign:
        raise InvalidInputError(f"{path} holds files that are not a blipsearch index ({foreign}); "
                                "choose another --index location")


def _foreign(path: Location | Path | str) -> str | None:
    """The names (the first three) in a location that are neither an index's nor junk; None where there are none."""
    names = location_of(path).names() or []
    foreign = sorted(name for name in names if name not in INDEX_NAMES and not is_junk(name))
    if not foreign:
        return None
    return ", ".join(printable(name) for name in foreign[:3]) + (f" and {len(foreign) - 3} more"
                                                                 if len(foreign) > 3 else "")


def disk_bytes(path: Location | Path | str) -> int:
    """Bytes of the files of the index."""
    return location_of(path).size()


def has_data(path: Location | Path | str) -> bool:
    location = location_of(path)
    return any(location.exists(name) for name in DATA_NAMES)


def no_manifest(path: Location) -> IndexDamagedError:
    """A folder with index data but no manifest: refused, never silently taken for a new index."""
    return IndexDamagedError(f"the index at {path} has lost its {MANIFEST} (its data is still there, but what "
                             f"it means is not); {rebuild_hint(recorded_model(path))}")


def pending_tables(path: Location, manifest: Manifest) -> list[str]:
    """The tables a new index's first run has not made yet (stopped while the model loaded, a full disk while
    it made them: no committed version), where any it made holds no row: such an index is empty, not damaged,
    and the next run makes them. [] otherwise: a table that exists but cannot be read is damage, for
    `_Tables.read` to report."""
    if manifest.run.generation != 0:  # first: the listing below reads object storage
        return []
    unmade = [name for name in (FILES, IMAGES) if not path.exists(f"{name}.lance/_versions")]
    made = [name for name in (FILES, IMAGES) if name not in unmade]
    if not unmade or not made:
        return unmade
    import lancedb

    try:
        db = lancedb.connect(path.lance_uri)
        return [] if any(db.open_table(name).count_rows() for name in made) else unmade
    except Exception:  # LanceDB: a made table that cannot be read
        return []


def tables_pending(path: Location, manifest: Manifest) -> bool:
    """`pending_tables` has any: a new index whose first run has not made its tables yet."""
    return bool(pending_tables(path, manifest))


def read_index_manifest(path: Location | Path | str) -> Manifest:
    """The manifest of a usable index: raises where there is none, or where it says the index is damaged."""
    path = location_of(path)
    manifest = read_manifest(path)
    if manifest is None:
        if has_data(path):
            raise no_manifest(path)
        if not path.remote and Path(str(path)).is_file():
            raise IndexMissingError(f"no index at {path}: it is a file; name an index folder (a new one is made "
                                    "by `blipsearch index FOLDER --index NEW_FOLDER`)")
        foreign = _foreign(path)
        if foreign:  # a folder of photos named as the index: `index` would refuse it too
            raise IndexMissingError(f"no index at {path}: it holds other files ({foreign}); name the index "
                                    "folder with --index")
        raise IndexMissingError(f"no index at {path}; create one with `blipsearch index FOLDER`")
    if manifest.run.damaged:
        raise IndexDamagedError(f"the index at {path} is damaged ({manifest.run.damaged}); {manifest.hint()}")
    return manifest


def damaged_table(path: Location, manifest: Manifest, exc: BaseException) -> IndexDamagedError:
    return IndexDamagedError(f"the index at {path} has a missing or damaged table ({first_line(exc)}); "
                             f"{manifest.hint()}")
