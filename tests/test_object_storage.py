"""An index on S3-compatible object storage (`--index s3://bucket/prefix`), against a local moto server."""

import json

import boto3
import pytest

from blipsearch.indexer import location as location_module
from blipsearch.indexer.location import ObjectPrefix, cache_folder
from blipsearch.indexer.reader import IndexReader
from blipsearch.indexer.store import IndexWriter
from blipsearch.retrieval.errors import IndexLockedError, StoreError

from photos import make_folder
from runner import blipsearch, one_line_error

QUERY = "a red dog on the beach"


def ranked(index, *args):
    out = blipsearch("query", QUERY, "--json", "--top", "9", "--candidates", "9", *args, index=index).stdout
    return [(r["path"], round(r["score"], 5), r["itm_prob"]) for r in json.loads(out)["results"]]


def keys(bucket: str, prefix: str = "") -> dict[str, int]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


@pytest.fixture
def photos(tmp_path):
    make_folder(tmp_path / "photos" / "a", 5, seed=1)
    make_folder(tmp_path / "photos" / "b", 4, seed=2)
    return tmp_path / "photos"


def test_an_index_on_s3_answers_as_a_local_one(tmp_path, photos, s3_bucket, tiny_model_dir):
    remote = f"s3://{s3_bucket}/indexes/photos"
    for index in (tmp_path / "local", remote):
        blipsearch("index", str(photos), "--model", str(tiny_model_dir), "-q", "--batch-size", "4", index=index)
    assert ranked(remote) == ranked(tmp_path / "local")
    stored = keys(s3_bucket, "indexes/photos/")
    names = {k[len("indexes/photos/"):].split("/")[0] for k in stored}
    assert names == {"manifest.json", "files.lance", "images.lance", "features", "snapshot"}  # the lock is gone
    segments = sorted(k for k in stored if "/features/" in k)
    assert len(segments) == 3  # 9 images in commits of 4: one object per commit
    status = json.loads(blipsearch("status", "--json", index=remote).stdout)
    assert (status["files"], status["images"], status["index"]) == (9, 9, remote)
    assert status["bytes"] == sum(stored.values()) and status["damaged"] is None


def test_runs_on_s3_are_incremental_and_queries_follow_them(tmp_path, photos, s3_bucket, tiny_model_dir):
    remote = f"s3://{s3_bucket}/idx"
    blipsearch("index", str(photos), "--model", str(tiny_model_dir), "-q", index=remote)
    first = ranked(remote)
    again = blipsearch("index", str(photos), "-q", index=remote)
    assert "indexed 0, reused 0 (moved or copied), unchanged 9, removed 0" in again.stderr
    assert ranked(remote) == first
    (photos / "a" / "img000.png").unlink()
    (photos / "b" / "img000.png").rename(photos / "b" / "moved.png")
    make_folder(photos / "c", 1, seed=3)
    changed = blipsearch("index", str(photos), "-q", index=remote)
    assert "indexed 1, reused 1 (moved or copied), unchanged 7, removed 1" in changed.stderr
    paths = {p for p, _, _ in ranked(remote)}
    assert str(photos / "b" / "moved.png") in paths and str(photos / "c" / "img000.png") in paths
    assert str(photos / "a" / "img000.png") not in paths
    for index in (tmp_path / "local",):
        blipsearch("index", str(photos), "--model", str(tiny_model_dir), "-q", index=index)
    assert ranked(remote) == ranked(tmp_path / "local")
    (photos / "a" / "img001.png").unlink()
    blipsearch("index", str(photos), "-q", index=remote)  # a third generation
    # the current snapshot and the one before it stay (a query may have started on that); older ones go
    generations = {k.split("/")[2] for k in keys(s3_bucket, "idx/snapshot/") if k.count("/") == 3}
    assert generations == {"2", "3"}
    assert {p for p, _, _ in ranked(remote)} == {str(p) for p in photos.rglob("*.png")}
    assert sorted(p.name.split("-")[0] for p in cache_folder(ObjectPrefix(remote)).iterdir()) == ["2", "3"]


def test_the_server_shows_photos_indexed_from_object_storage(tmp_path, photos, s3_bucket, tiny_model_dir):
    """Every thumbnail and original of an `s3://` photo was a 404 ("No such file or directory")."""
    from fastapi.testclient import TestClient

    from blipsearch.retrieval.api import Index
    from blipsearch.retrieval.server import app as server

    client = boto3.client("s3")
    for path in sorted(photos.rglob("*.png")):
        client.upload_file(str(path), s3_bucket, f"library/{path.relative_to(photos)}")
    blipsearch("index", f"s3://{s3_bucket}/library", "-q", "--model", str(tiny_model_dir), index=tmp_path / "index")
    served = TestClient(server.create_app(Index.open(tmp_path / "index", device="cpu"), tmp_path / "thumbs"))
    first = served.get("/api/search", params={"q": "a photo", "top": 1}).json()["results"][0]["path"]
    assert first.startswith(f"s3://{s3_bucket}/library/")
    original = served.get("/api/original", params={"path": first})
    key = first.removeprefix(f"s3://{s3_bucket}/")
    assert original.status_code == 200 and original.content == client.get_object(Bucket=s3_bucket,
                                                                                 Key=key)["Body"].read()
    thumbnail = served.get("/api/thumbnail", params={"path": first})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert served.get("/api/original", params={"path": f"s3://{s3_bucket}/library/nope.png"}).status_code == 404


def test_a_segment_lost_or_cut_short_on_s3_is_damage_that_queries_and_the_server_name(
        tmp_path, photos, s3_bucket, tiny_model_dir):
    """It read as "changed during the query; run it again" (run again: the same), or as a network problem to check
    AWS_ENDPOINT_URL for, and the server's status called the index healthy."""
    from fastapi.testclient import TestClient

    from blipsearch.retrieval.api import Index
    from blipsearch.retrieval.server import app as server

    remote = f"s3://{s3_bucket}/dmg"
    blipsearch("index", str(photos), "--model", str(tiny_model_dir), "-q", "--batch-size", "4", index=remote)
    served = TestClient(server.create_app(Index.open(remote, device="cpu"), tmp_path / "thumbs"))
    first, second, _ = sorted(k for k in keys(s3_bucket, "dmg/") if "/features/" in k)
    client = boto3.client("s3")
    client.delete_object(Bucket=s3_bucket, Key=first)
    data = client.get_object(Bucket=s3_bucket, Key=second)["Body"].read()
    client.put_object(Bucket=s3_bucket, Key=second, Body=data[:1000])
    result = blipsearch("query", QUERY, "--candidates", "9", index=remote, expect=1)
    one_line_error(result, f"the index at {remote} is damaged: feature segment", "rebuild it with")
    status = served.get("/api/status")
    assert status.status_code == 503 and "is damaged: feature segment" in status.json()["damaged"]


def test_an_emptied_s3_prefix_keeps_its_files_unless_allowed(tmp_path, photos, s3_bucket, tiny_model_dir):
    """Object storage keeps no empty folders: a prefix whose photos were all deleted was "no such object or
    prefix", so `--allow-empty` could never remove its files."""
    client = boto3.client("s3")
    for path in sorted(photos.rglob("*.png")):
        client.upload_file(str(path), s3_bucket, f"library/{path.relative_to(photos)}")
    library = f"s3://{s3_bucket}/library"
    blipsearch("index", library, "-q", "--model", str(tiny_model_dir), index=tmp_path / "index")
    for key in [k for k in keys(s3_bucket, "library/b/")]:
        client.delete_object(Bucket=s3_bucket, Key=key)
    one_line_error(blipsearch("index", f"{library}/b", "-q", index=tmp_path / "index", expect=1),
                   "no such object or prefix")
    removed = blipsearch("index", f"{library}/b", "-q", "--allow-empty", index=tmp_path / "index")
    assert "removed 4" in removed.stderr
    assert json.loads(blipsearch("status", "--json", index=tmp_path / "index").stdout)["files"] == 5
    one_line_error(blipsearch("index", "s3://no-such-bucket-here/b", "-q", "--allow-empty", index=tmp_path / "index",
                              expect=1), "s3://no-such-bucket-here")


def test_a_second_writer_is_refused_until_the_lease_is_stale(s3_bucket, tiny_model, monkeypatch):
    remote = f"s3://{s3_bucket}/idx"
    first = IndexWriter.open(remote, tiny_model.info)
    with pytest.raises(IndexLockedError, match=r"another blipsearch process \(.*\) is writing to the index at s3:"):
        IndexWriter.open(remote, tiny_model.info)
    monkeypatch.setattr(location_module, "LEASE_STALE_S", 0.0)  # as if the first writer had died long ago
    second = IndexWriter.open(remote, tiny_model.info)
    assert first.path._lease.renew() is False  # the first writer's next renewal finds the lease gone ...
    with pytest.raises(StoreError, match=r"lost its lock on the index at s3://.*another writer took the lock over"):
        first.finish()  # ... and it writes nothing more
    first.close()  # releasing deletes nothing of the second's
    assert "idx/.lock" in keys(s3_bucket)
    second.finish()
    second.close()
    assert "idx/.lock" not in keys(s3_bucket)
    assert IndexReader.open(remote).counts() == (0, 0)


def test_a_writer_whose_lease_may_be_taken_over_any_moment_writes_nothing_more(s3_bucket, tiny_model):
    """A writer stopped (SIGSTOP) past the stale time and resumed committed one more batch to the LanceDB
    tables before its renewal thread found the lease gone: the other writer's rows and its own, twice."""
    writer = IndexWriter.open(f"s3://{s3_bucket}/idx", tiny_model.info)
    writer.path._lease.renewed -= location_module.LEASE_STALE_S  # its renewals stopped long enough
    with pytest.raises(StoreError, match=r"lost its lock on the index at s3://.*\(not renewed for \d+ s\)"):
        writer.upsert_files([])  # a LanceDB commit: checked as the feature writes are
    writer.close()


def test_object_storage_errors_are_one_line(photos, s3_bucket, tiny_model_dir):
    result = blipsearch("index", str(photos), "--model", str(tiny_model_dir), "-q", index="s3://no-such-bucket/x",
                        expect=1)
    one_line_error(result, "s3://no-such-bucket/x", "create the bucket")
    one_line_error(blipsearch("query", QUERY, index=f"s3://{s3_bucket}/none", expect=1), "no index at s3://")
    one_line_error(blipsearch("status", index="gs://bucket/x", expect=1), "gs://bucket/x", "s3://bucket/prefix")
    # LanceDB read ?, # and % as URL parts: two indexes shared their tables; // was a traceback
    for odd in ("q?z", "a//b", "x%41"):
        result = blipsearch("index", str(photos), "--model", str(tiny_model_dir), "-q", index=f"s3://{s3_bucket}/{odd}",
                            expect=1)
        one_line_error(result, f"s3://{s3_bucket}/{odd} holds ?, #, % or //")
    assert not keys(s3_bucket)  # refused before anything was written
    one_line_error(blipsearch("query", "--image", f"s3://{s3_bucket}/a.png", index=f"s3://{s3_bucket}/none",
                              expect=1), "--image reads a picture file on this machine, not an s3:// object")


def test_the_feature_store_benchmark_reads_back_what_it_wrote(tmp_path):
    """benchmarks/bench_object_store.py on a few records (it checks every record it reads against what it wrote)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_object_store.py"
    run = subprocess.run([sys.executable, str(script), "--records", "6", "--batch", "4", "--queries", "2",
                          "--candidates", "3"], capture_output=True, text=True, timeout=120, cwd=script.parent)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout[:run.stdout.rindex("}") + 1])
    assert report["store"] == "moto on localhost" and report["record_bytes"] == 446208
    assert report["object_storage"]["write_mb_per_s"] > 0 and report["local_folder"]["query_read_p50_ms"] >= 0


def test_a_rebuilt_index_is_never_answered_from_the_old_ones_cached_snapshot(tmp_path, s3_bucket, tiny_model_dir):
    remote = f"s3://{s3_bucket}/idx"
    make_folder(tmp_path / "old", 3, seed=1)
    make_folder(tmp_path / "new", 2, seed=2)
    blipsearch("index", str(tmp_path / "old"), "--model", str(tiny_model_dir), "-q", index=remote)
    assert {p for p, _, _ in ranked(remote)} == {str(p) for p in (tmp_path / "old").iterdir()}  # generation 1, cached
    blipsearch("index", str(tmp_path / "new"), "--rebuild", "-q", index=remote)  # generation 1 again
    assert {p for p, _, _ in ranked(remote)} == {str(p) for p in (tmp_path / "new").iterdir()}


def test_a_damaged_cached_copy_of_the_snapshot_is_downloaded_again(tmp_path, s3_bucket, tiny_model_dir):
    """A cached copy damaged on this machine was trusted for good: every query read the slower tables, and
    `status` advised an index run that, finding nothing changed, rewrote nothing."""
    remote = f"s3://{s3_bucket}/idx"
    make_folder(tmp_path / "photos", 3, seed=1)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=remote)
    first = ranked(remote)
    [cached] = cache_folder(ObjectPrefix(remote)).iterdir()
    (cached / "rows.npz").write_bytes(b"not a zip")
    status = json.loads(blipsearch("status", "--json", index=remote).stdout)
    assert status["snapshot"] is True and status["damaged"] is None
    assert (cached / "rows.npz").read_bytes() != b"not a zip"
    assert ranked(remote) == first


def test_a_commit_that_object_storage_fails_is_one_line():
    """LanceDB's 'Commit result for version 24 is unknown ... Generic S3 error' (the endpoint went down
    mid-run) was a traceback."""
    from blipsearch.indexer.store import _store_errors

    where = location_module.location_of("s3://b/idx")
    with pytest.raises(StoreError, match=r"^cannot write the index at s3://b/idx: Commit result for version 24 is "
                                         r"unknown.*; run again"), _store_errors(where):
        raise RuntimeError("Commit result for version 24 is unknown: Generic S3 error: connection refused")
    with pytest.raises(RuntimeError, match="a defect"), _store_errors(where):  # not the storage's
        raise RuntimeError("a defect")
