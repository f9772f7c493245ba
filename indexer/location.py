"""Where an index lives: a local folder, or a prefix in S3-compatible object storage.

Both hold the same names (layout.py); what differs is how they are written:

                      local folder                          s3://bucket/prefix
    manifest.json     written to a temporary file, fsynced,  one PUT (S3 shows the old object or
                      renamed over the old one              the new one, never a part)
    *.lance           LanceDB, on the folder                 LanceDB, on the prefix (its commits are
                                                             conditional PUTs)
    features/         segment files, appended to            one object per segment, written once
                      (features.py)                         (features.py)
    snapshot/         a folder swapped in by rename          snapshot/<generation>/..., then the pointer
                                                             snapshot/snapshot.json; readers download a
                                                             generation once into their cache
    .lock             flock(2) on the file                   a lease object created with If-None-Match
                                                             and renewed while the run goes on

Object storage is reached with boto3 (the `s3` extra) and LanceDB's own client; both read the usual AWS
environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, AWS_REGION, and AWS_ENDPOINT_URL for
an S3-compatible server (MinIO, Ceph; AWS_ALLOW_HTTP=true where it speaks plain HTTP).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from blipsearch.retrieval.errors import IndexLockedError, InvalidInputError, StoreError, first_line, printable

from . import durable

log = logging.getLogger(__name__)

LOCK = ".lock"
SNAPSHOT = "snapshot"
LEASE_RENEW_S = 30.0  # a writer renews its lease this often
LEASE_STALE_S = 180.0  # a lease not renewed for this long was left by a writer that died: it may be taken over


class Location(ABC):
    """An index's storage. Names are relative, '/'-separated (e.g. "features/000001.bin")."""

    remote = False

    @property
    @abstractmethod
    def lance_uri(self) -> str:
        """What `lancedb.connect` takes."""

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """The whole file; `FileNotFoundError` where there is none."""

    @abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically and durably: a reader sees the old content or the new."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """A file, or a folder (prefix) with something in it."""

    @abstractmethod
    def names(self) -> list[str] | None:
        """The top-level names, None where the location does not exist yet."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """A file or a whole folder (prefix); nothing where absent."""

    @abstractmethod
    def size(self) -> int:
        """Bytes stored."""

    @abstractmethod
    def create(self) -> None:
        """Make the location exist (a folder; for a prefix, check that its bucket answers)."""

    @abstractmethod
    def lock(self) -> Callable[[], None]:
        """Become the one writer; returns the release. Raises `IndexLockedError` where another holds it."""

    @abstractmethod
    def publish_snapshot(self, write: Callable[[Path], None], generation: int) -> None:
        """`write(folder)` fills a folder with the snapshot of `generation`; make it the one readers find."""

    def check_writer(self) -> None:
        """Raise `StoreError` where this process may no longer write (its lock on object storage is lost); a
        folder's lock (flock) cannot be lost."""
        return None

    @abstractmethod
    def snapshot_folder(self, refresh: bool = False) -> Path | None:
        """A local folder holding the current snapshot, None where there is none. `refresh`: the one given
        before would not load, so fetch it again where it is a copy (a remote index's cache)."""


def location_of(where: Location | Path | str) -> Location:
    """A `Location` for a folder path or an `s3://bucket/prefix` address (an existing one passes through)."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    if text.startswith("s3://"):
        return ObjectPrefix(text)
    if "://" in text:
        raise InvalidInputError(f"the index location {text} is not supported: name a folder or s3://bucket/prefix")
    if "\0" in text:
        raise InvalidInputError(f"the index location {text!r} holds a NUL byte: name a folder")
    return Folder(Path(os.path.expanduser(text)))  # (Path.expanduser raises for an unknown ~user)


class Folder(Location):
    """An index in a local folder."""

    def __init__(self, path: Path):
        try:
            str(path).encode("utf-8")  # LanceDB and the manifest need the name in UTF-8
        except UnicodeEncodeError:
            raise InvalidInputError(f"the index location {printable(str(path))} is not valid UTF-8; "
                                    "choose another index folder") from None
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Folder) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def lance_uri(self) -> str:
        return str(self.path.absolute())  # the same folder for processes started elsewhere (Ray workers)

    def read_bytes(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except NotADirectoryError as exc:  # the index path is a file: no index there
            raise FileNotFoundError(str(self.path / name)) from exc

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.path / name
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        durable.replace(tmp, target)

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def names(self) -> list[str] | None:
        if self.path.is_file():
            raise InvalidInputError(f"the index location {self.path} is a file, not a folder; "
                                    "choose another index folder")
        try:
            return [p.name for p in self.path.iterdir()]
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise InvalidInputError(f"cannot read the index folder {self.path}: {exc.strerror or exc}") from exc

    def remove(self, name: str) -> None:
        target = self.path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def size(self) -> int:
        """Files a running writer deletes meanwhile count as 0."""
        total = 0
        for folder, _, names in os.walk(self.path):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(folder, name)).st_size
        return total

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the index folder {self.path}: {exc.strerror or exc}") from exc

    def lock(self) -> Callable[[], None]:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no advisory locks on this platform
        except OSError as exc:
            os.close(fd)
            raise IndexLockedError(f"another blipsearch process is writing to the index at {self.path}; "
                                   "wait for it to finish") from exc
        return lambda: os.close(fd)

    def publish_snapshot(self, write: Callable[[Path], None], generation: int) -> None:
        """Write into a fresh folder, then swap it in: readers see the old snapshot or the new one."""
        folder, tmp, old = (self.path / (SNAPSHOT + tail) for tail in ("", ".tmp", ".old"))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.replace(old)
        durable.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)

    def snapshot_folder(self, refresh: bool = False) -> Path | None:
        return self.path / SNAPSHOT  # the snapshot itself, not a copy: a damaged one waits for the next run


class ObjectPrefix(Location):
    """An index under `s3://bucket/prefix`."""

    remote = True

    def __init__(self, url: str):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise InvalidInputError(f"the index location {url} names no bucket: use s3://bucket/prefix")
        if any(c in prefix for c in "?#%") or "//" in prefix.strip("/"):  # LanceDB reads the address as a URL:
            raise InvalidInputError(f"the index location {url} holds ?, #, % or //, which LanceDB reads as part "
                                    "of a URL (its tables went elsewhere); name a prefix without them")
        self.url = "s3://" + bucket + ("/" + prefix.strip("/") if prefix.strip("/") else "")
        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client = None
        self._lease: _Lease | None = None  # held while this process writes the index

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPrefix) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def lance_uri(self) -> str:
        return self.url

    @property
    def client(self):
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise InvalidInputError("an index on s3:// needs boto3, the s3 extra: pip install -e '.[s3]' in the "
                                        "blipsearch checkout") from None
            self._client = boto3.client("s3", config=Config(max_pool_connections=32))
        return self._client

    def key(self, name: str) -> str:
        return self.prefix + name

    def _errors(self, doing: str):
        return _s3_errors(self, doing)

    def read_bytes(self, name: str) -> bytes:
        return self.read_range(name)

    def read_range(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """Bytes [start, start + length) of an object (all of it by default)."""
        kwargs = {} if length is None else {"Range": f"bytes={start}-{start + length - 1}"}
        with self._errors(f"read {name}"):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name), **kwargs)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(f"{self.url}/{name}") from None
            except self.client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":  # past the object's end: as a
                    return b""  # file read there, nothing (the caller sees a short object)
                raise

    def write_bytes(self, name: str, data: bytes, create: bool = False) -> None:
        """`create`: only where no object has the name (If-None-Match), else `StoreError`."""
        self._check_lease()
        with self._errors(f"write {name}"):
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data,
                                   **({"IfNoneMatch": "*"} if create else {}))

    def upload(self, name: str, source: Path) -> None:
        self._check_lease()
        with self._errors(f"write {name}"):
            self.client.upload_file(str(source), self.bucket, self.key(name))

    def _check_lease(self) -> None:
        """A writer whose lease another writer took over (it stalled past LEASE_STALE_S) writes nothing more;
        nor one whose last renewal is so old that it may be taken over any moment (a process stopped and
        resumed wrote one more batch before its renewal thread found the lease gone)."""
        lease = self._lease
        if lease is None:
            return
        # a renewal is due every LEASE_RENEW_S; an old one is not marked `lost`: release() deletes a lease still ours
        margin = max(LEASE_STALE_S - LEASE_RENEW_S, LEASE_RENEW_S)
        why = lease.lost or (f"not renewed for {_clock() - lease.renewed:.0f} s"
                             if _clock() - lease.renewed >= margin else None)
        if why:
            raise StoreError(f"this run lost its lock on the index at {self} ({why}): another writer may have "
                             "taken over; nothing more is written, run again once it is done")

    def check_writer(self) -> None:
        self._check_lease()

    def listing(self, folder: str = "") -> dict[str, int]:
        """name (relative to the index) -> size of every object below `folder`."""
        out = {}
        with self._errors("list the index"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.key(folder))
            for page in pages:
                for item in page.get("Contents", []):
                    out[item["Key"][len(self.prefix):]] = item["Size"]
        return out

    def exists(self, name: str) -> bool:
        with self._errors(f"look for {name}"):
            found = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(name), MaxKeys=1)
        return any(item["Key"] == self.key(name) or item["Key"].startswith(self.key(name) + "/")
                   for item in found.get("Contents", []))

    def names(self) -> list[str] | None:
        names = set()
        with self._errors("list the index"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix,
                                                                          Delimiter="/")
            for page in pages:
                names.update(p["Prefix"][len(self.prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
                names.update(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        return sorted(names) or None

    def remove(self, name: str) -> None:
        keys = [self.key(n) for n in self.listing(name) if n == name or n.startswith(name.rstrip("/") + "/")]
        with self._errors(f"delete {name}"):
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def size(self) -> int:
        return sum(self.listing().values())

    def create(self) -> None:
        with self._errors("reach the bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def lock(self) -> Callable[[], None]:
        self._lease = _Lease(self)
        return self._lease.acquire()

    def publish_snapshot(self, write: Callable[[Path], None], generation: int) -> None:
        """Upload the files under snapshot/<generation>/, then point snapshot/snapshot.json at them. Older
        generations but the one before go: a query that started on that one still finds it."""
        with tempfile.TemporaryDirectory(prefix="blipsearch-snapshot-") as tmp:
            write(Path(tmp))
            files = sorted(Path(tmp).iterdir())
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda f: self.upload(f"{SNAPSHOT}/{generation}/{f.name}", f), files))
            # the token names this upload in readers' caches: a rebuilt index counts its generations from 1 again
            pointer = {**json.loads((Path(tmp) / "snapshot.json").read_text()), "token": uuid.uuid4().hex}
            self.write_bytes(f"{SNAPSHOT}/snapshot.json", json.dumps(pointer).encode())
        for name in {n.split("/")[1] for n in self.listing(SNAPSHOT + "/") if n.count("/") == 2}:
            if name.isdigit() and int(name) < generation - 1:
                self.remove(f"{SNAPSHOT}/{name}")

    def snapshot_folder(self, refresh: bool = False) -> Path | None:
        """The current generation's snapshot, downloaded once into the user's cache folder (again where
        `refresh`: a cached copy that does not load was damaged on this machine, and nothing else mends it)."""
        try:
            pointer = json.loads(self.read_bytes(f"{SNAPSHOT}/snapshot.json"))
            generation, token = int(pointer["generation"]), str(pointer["token"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        folder = cache_folder(self) / f"{generation}-{token}"
        if refresh and folder.is_dir():  # set aside first: another reader may be downloading it afresh too
            aside = folder.with_name(f".stale-{uuid.uuid4().hex}")
            with contextlib.suppress(OSError):
                folder.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        if not folder.is_dir():  # folders appear whole (renamed into place), so one that is there is complete
            self._download(f"{SNAPSHOT}/{generation}/", folder)
        return folder

    def _download(self, prefix: str, folder: Path) -> None:
        names = [n for n in self.listing(prefix) if n.count("/") == 2]
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
            def fetch(name: str) -> None:
                (Path(tmp) / name.rsplit("/", 1)[1]).write_bytes(self.read_bytes(name))

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(fetch, names))
            try:
                Path(tmp).rename(folder)
                Path(tmp).mkdir()  # for TemporaryDirectory's clean-up
            except OSError:  # another reader put the same generation in place first: keep theirs
                pass
        generation = int(folder.name.split("-")[0])
        for old in folder.parent.iterdir():  # older generations of this index (and of any it was rebuilt from)
            if old.name.split("-")[0].isdigit() and old.name != folder.name and \
                    int(old.name.split("-")[0]) != generation - 1:
                shutil.rmtree(old, ignore_errors=True)


def cache_folder(location: ObjectPrefix) -> Path:
    """Where a remote index's snapshots are kept on this machine ($BLIPSEARCH_CACHE, else the user cache)."""
    import platformdirs

    root = Path(os.environ["BLIPSEARCH_CACHE"]) if os.environ.get("BLIPSEARCH_CACHE") else \
        platformdirs.user_cache_path("blipsearch")
    return root / "remote" / hashlib.sha256(location.url.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _s3_errors(location: ObjectPrefix, doing: str):
    """botocore's errors become one `StoreError` line naming the index and what to do."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as exc:
        from botocore.exceptions import BotoCoreError, ClientError

        if not isinstance(exc, BotoCoreError | ClientError):
            raise
        code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
        todo = {"NoSuchBucket": "create the bucket, or fix the s3:// address",
                "AccessDenied": "check the AWS credentials and the bucket's policy",
                "InvalidAccessKeyId": "check the AWS credentials"}.get(
            code, "check the address, AWS_ENDPOINT_URL and the credentials, then run again")
        raise StoreError(f"cannot {doing} of the index at {location}: {first_line(exc)}; {todo}") from exc


def _clock() -> float:
    """Seconds that go on while the machine sleeps (a suspended laptop's lease goes stale on the server):
    Linux's CLOCK_BOOTTIME; elsewhere the wall clock."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.time()


class _Lease:
    """The writer's lock on an object prefix: an object created only where none exists (If-None-Match),
    renewed every LEASE_RENEW_S by a thread, deleted on release. A lease not renewed for LEASE_STALE_S (by the
    server's clock) was left by a writer that died, and is taken over with If-Match on the ETag seen stale:
    every put writes a fresh token, so a renewal in between changes the ETag and the take-over fails, and
    of two takers only one wins. A writer that finds its lease taken over, or cannot renew it for
    LEASE_STALE_S, is `lost` and writes nothing more (ObjectPrefix checks it before each write)."""

    def __init__(self, location: ObjectPrefix):
        self.location, self.client, self.key = location, location.client, location.key(LOCK)
        self.etag: str | None = None
        self.lost: str | None = None  # why this writer no longer holds the lease
        self.renewed = _clock()  # last successful put
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self._stop = threading.Event()

    def _put(self, condition: dict) -> bool:
        from botocore.exceptions import ClientError

        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                           "token": uuid.uuid4().hex}).encode()  # a new ETag at every put
        try:
            self.etag = self.client.put_object(Bucket=self.location.bucket, Key=self.key, Body=body,
                                               **condition)["ETag"]
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def acquire(self) -> Callable[[], None]:
        with self.location._errors("lock"):
            if not self._put({"IfNoneMatch": "*"}) and not self._take_over():
                raise self._held()
        thread = threading.Thread(target=self._renew, name="blipsearch-lease", daemon=True)
        thread.start()
        return self.release

    def _take_over(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.location.bucket, Key=self.key)
        except ClientError:  # released meanwhile
            return self._put({"IfNoneMatch": "*"})
        server_now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        if (server_now - head["LastModified"]).total_seconds() < LEASE_STALE_S:
            return False
        log.warning("taking over the lock of %s, last renewed %s (its writer stopped)", self.location,
                    head["LastModified"])
        return self._put({"IfMatch": head["ETag"]})

    def _held(self) -> IndexLockedError:
        try:
            owner = json.loads(self.location.read_bytes(LOCK))
            who = f" ({owner['host']}, pid {owner['pid']}, since {owner['started']})"
        except Exception:
            who = ""
        return IndexLockedError(f"another blipsearch process{who} is writing to the index at {self.location}; "
                                f"wait for it to finish (a lock its writer stopped renewing frees itself after "
                                f"{LEASE_STALE_S:g} s)")

    def _renew(self) -> None:
        self.renewed = _clock()
        while not self._stop.wait(LEASE_RENEW_S) and self.renew():
            pass

    def renew(self) -> bool:
        """One renewal; False once the lease is lost (taken over, or not renewed for LEASE_STALE_S)."""
        try:
            if not self._put({"IfMatch": self.etag}):
                self.lost = "another writer took the lock over"
                log.error("the lock of %s was taken over by another writer", self.location)
                return False
            self.renewed = _clock()
        except Exception as exc:  # a network error: try again at the next tick, until the lease is stale
            log.warning("cannot renew the lock of %s: %s", self.location, first_line(exc))
            if _clock() - self.renewed >= LEASE_STALE_S:
                self.lost = f"not renewed for {LEASE_STALE_S:g} s"
                return False
        return True

    def release(self) -> None:
        self._stop.set()
        if self.lost:
            return  # not ours any more
        try:
            self.client.delete_object(Bucket=self.location.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as exc:  # the next writer waits until the lease is stale
            log.warning("cannot release the lock of %s (%s); the next run may wait up to %g s for it", self.location,
                        first_line(exc), LEASE_STALE_S)
