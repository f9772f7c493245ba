"""`blipsearch index --ray`: Ray Data on a local instance writes the index a single-process run writes."""

import itertools
import json
import shutil
import warnings
from pathlib import Path

import boto3
import lance_ray
import pytest
import ray

from photos import make_folder
from runner import blipsearch, one_line_error

QUERY = "a red dog on the beach"


@pytest.fixture(scope="module", autouse=True)
def local_ray(s3_endpoint):
    """One local instance for the module, started where the S3 server's settings are in the environment."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def answers(index) -> list[tuple[str, float, float]]:
    """(file name under the photo root, score, ITM probability) of every indexed image, best first."""
    out = blipsearch("query", QUERY, "--json", "--top", "20", "--candidates", "20", index=index).stdout
    return [("/".join(Path(r["path"]).parts[-2:]), r["score"], r["itm_prob"]) for r in json.loads(out)["results"]]


def assert_same_answers(ours: list, theirs: list) -> None:
    """The same files, each with its score and ITM probability within 1e-4, in the same order wherever two
    neighbours' scores differ by more than that. Not bit-equal: in fp32 (the precision on CPUs without bf16
    units) a GEMM's rounding depends on the batch and the thread count (Ray's workers run other batches on
    one thread), ~1e-7 in an embedding, and the feature maps' int8 codec (fp16 scales) can turn that into
    ~1e-5 in a score; bf16 runs gave bit-equal answers."""
    assert sorted(a[0] for a in ours) == sorted(b[0] for b in theirs)
    values = {name: rest for name, *rest in theirs}
    for name, *rest in ours:
        assert rest == pytest.approx(values[name], abs=1e-4), name
    position = {b[0]: i for i, b in enumerate(theirs)}
    for (first, score, _), (second, next_score, _) in itertools.pairwise(ours):
        if score - next_score > 2e-4:
            assert position[first] < position[second], (first, second)


def summary(result) -> str:
    return result.stderr.strip().splitlines()[-1].split(" in ")[0]


def index_both(photos, tmp_path, *extra, model=()):
    """The same run single-process and on Ray; returns both summaries."""
    single = blipsearch("index", str(photos), "-q", *model, *extra, index=tmp_path / "single")
    on_ray = blipsearch("index", str(photos), "-q", "--ray", *model, *extra, index=tmp_path / "ray")
    return summary(single), summary(on_ray)


def test_ray_indexes_as_a_single_process_run_does(tmp_path, tiny_model_dir, monkeypatch):
    photos = tmp_path / "photos"
    make_folder(photos / "a", 5, seed=1)
    make_folder(photos / "b", 4, seed=2)
    shutil.copy(photos / "a" / "img001.png", photos / "b" / "copy.png")  # one content, two files
    # decoding runs in its own tasks, not fused into the encoder actors (this instance's actors ask for one CPU,
    # as a read task does), and through none of the arguments Ray deprecated (`ray_remote_args_fn`, bare remote
    # arguments; Ray's own context still warns of its settings' old names: not ours)
    plans = []
    materialize = ray.data.Dataset.materialize
    monkeypatch.setattr(ray.data.Dataset, "materialize", lambda self: plans.append(out := materialize(self)) or out)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="`ray_remote_args")
        single, on_ray = index_both(photos, tmp_path, model=("--model", str(tiny_model_dir)))
    stats = plans[0].stats()
    assert "MapBatches(_read_batch)" in stats and "MapBatches(_Encoder)" in stats, stats
    assert "MapBatches(_read_batch)->MapBatches(_Encoder)" not in stats, stats
    assert single == on_ray == "blipsearch: indexed 10, reused 0 (moved or copied), unchanged 0, removed 0, skipped 0"
    assert_same_answers(answers(tmp_path / "ray"), answers(tmp_path / "single"))
    # a second run on Ray: moved, deleted, new and touched files, as the single-process path sees them
    (photos / "a" / "img000.png").rename(photos / "b" / "moved.png")
    (photos / "a" / "img002.png").unlink()
    make_folder(photos / "c", 2, seed=3)
    (photos / "c" / "broken.png").write_bytes(b"not a picture")
    (photos / "b" / "img003.png").write_bytes(b"broken now")  # a stored file that no longer decodes: it leaves
    single, on_ray = _rerun(photos, tmp_path)
    assert single == on_ray == "blipsearch: indexed 2, reused 1 (moved or copied), unchanged 7, removed 2, skipped 2"
    assert_same_answers(answers(tmp_path / "ray"), answers(tmp_path / "single"))
    status = json.loads(blipsearch("status", "--json", index=tmp_path / "ray").stdout)
    assert (status["files"], status["images"]) == (10, 9)


def _rerun(photos, tmp_path):
    single = blipsearch("index", str(photos), "-q", index=tmp_path / "single", expect=3)
    on_ray = blipsearch("index", str(photos), "-q", "--ray", index=tmp_path / "ray", expect=3)
    assert f"blipsearch: skipped {photos / 'c' / 'broken.png'}: " in on_ray.stderr
    return summary(single), summary(on_ray)


def test_ray_indexes_the_demo_folder_as_a_single_process_run_does(tmp_path):
    """The README's demo, on Ray: the demo folder (60 scenes) with the committed demo model."""
    from benchmark_scripts import scenes

    scenes().write_demo_folder(tmp_path / "demo")
    demo_model = Path(__file__).parents[1] / "training" / "demo_model"
    single, on_ray = index_both(tmp_path / "demo", tmp_path, model=("--model", str(demo_model)))
    assert single == on_ray
    for text in ("a large red circle left of a large blue square", "a small green triangle"):
        got, expected = (json.loads(blipsearch("query", text, "--json", "--top", "60", index=tmp_path / name).stdout)
                         for name in ("ray", "single"))
        assert len(got["results"]) == len(expected["results"]) == 60
        named = [[(Path(r["path"]).name, r["score"], r["itm_prob"]) for r in answer["results"]]
                 for answer in (got, expected)]
        assert_same_answers(*named)  # the scores within 1e-4 (see there: fp32 rounding follows the batches)
        unscored = [{r["path"]: {k: v for k, v in r.items() if k not in ("score", "itc", "itm_prob")}
                     for r in answer["results"]} for answer in (got, expected)]
        assert unscored[0] == unscored[1]
        itc = [{r["path"]: r["itc"] for r in answer["results"]} for answer in (got, expected)]
        assert all(abs(itc[0][path] - itc[1][path]) < 1e-4 for path in itc[1])


def test_a_driver_killed_between_commits_leaves_a_usable_index_that_the_next_run_completes(
        tmp_path, tiny_model_dir, monkeypatch):
    photos = tmp_path / "photos"
    make_folder(photos, 6, seed=4)
    shutil.copy(photos / "img000.png", photos / "zz-copy.png")  # the same content, in another encoder batch
    blipsearch("index", str(photos), "-q", "--model", str(tiny_model_dir), index=tmp_path / "single")
    write = lance_ray.write_lance

    def killed_at_the_file_rows(ds, uri, **kwargs):
        if uri.endswith("files.lance"):
            raise KeyboardInterrupt
        return write(ds, uri, **kwargs)

    monkeypatch.setattr(lance_ray, "write_lance", killed_at_the_file_rows)
    blipsearch("index", str(photos), "-q", "--ray", "--batch-size", "2", "--model", str(tiny_model_dir),
               index=tmp_path / "ray", expect=130)
    monkeypatch.undo()
    # image rows are stored, no file names them yet: nothing to show, and the query says why
    result = blipsearch("query", QUERY, index=tmp_path / "ray", expect=1)
    assert "has no images yet: its first indexing run (or a --rebuild) is under way, or stopped" in result.stderr
    again = blipsearch("index", str(photos), "-q", "--ray", index=tmp_path / "ray")
    assert summary(again) == "blipsearch: indexed 7, reused 0 (moved or copied), unchanged 0, removed 0, skipped 0"
    assert_same_answers(answers(tmp_path / "ray"), answers(tmp_path / "single"))
    # the copy was encoded twice by two batches of the killed run; the next writer kept one row per content
    status = json.loads(blipsearch("status", "--json", index=tmp_path / "ray").stdout)
    assert (status["files"], status["images"]) == (7, 6)


def test_ray_reads_photos_from_s3_into_an_index_on_s3(tmp_path, s3_bucket, tiny_model_dir):
    photos = tmp_path / "photos"
    make_folder(photos / "trip", 5, seed=5)
    client = boto3.client("s3")
    for path in sorted(photos.rglob("*.png")):
        client.upload_file(str(path), s3_bucket, f"library/{path.relative_to(photos)}")
    client.put_object(Bucket=s3_bucket, Key="library/.hidden.png", Body=b"skipped: hidden")
    remote = f"s3://{s3_bucket}/index"
    blipsearch("index", f"s3://{s3_bucket}/library", "-q", "--ray", "--model", str(tiny_model_dir), index=remote)
    blipsearch("index", str(photos), "-q", "--model", str(tiny_model_dir), index=tmp_path / "single")
    assert_same_answers(answers(remote), answers(tmp_path / "single"))
    paths = json.loads(blipsearch("query", QUERY, "--json", index=remote).stdout)["results"]
    assert all(r["path"].startswith(f"s3://{s3_bucket}/library/trip/img00") for r in paths)
    under = json.loads(blipsearch("query", QUERY, "--json", "--in", f"s3://{s3_bucket}/library/trip/",
                                  index=remote).stdout)["results"]
    assert under == paths
    assert json.loads(blipsearch("query", QUERY, "--json", "--in", f"s3://{s3_bucket}/library/tri",
                                 index=remote).stdout)["results"] == []
    # and the single-process path reads the same objects
    blipsearch("index", f"s3://{s3_bucket}/library", "-q", "--model", str(tiny_model_dir), index=tmp_path / "s3-single")
    assert_same_answers(answers(tmp_path / "s3-single"), answers(remote))


def test_ray_errors_are_one_line(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "photos", 1)
    result = blipsearch("index", str(tmp_path / "photos"), "--ray", "--captions", "--model", str(tiny_model_dir),
                        index=tmp_path / "index", expect=1)
    one_line_error(result, "--ray runs write no captions")
    result = blipsearch("index", str(tmp_path / "photos"), "--ray-actors", "2", "--model", str(tiny_model_dir),
                        index=tmp_path / "index", expect=1)
    one_line_error(result, "--ray-actors is for --ray runs")
    result = blipsearch("index", "s3://no-such-bucket-here/photos", "--ray", "--model", str(tiny_model_dir),
                        index=tmp_path / "index", expect=1)
    one_line_error(result, "s3://no-such-bucket-here/photos")
