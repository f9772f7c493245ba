"""`blipsearch eval` end to end on tiny fixtures, checked against a port of LAVIS's own evaluation code."""

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from blipsearch.indexer.images import load_image
from blipsearch.retrieval.annotations import AnnotatedImage, load_annotations
from blipsearch.retrieval.cli import evaluate as _registers_eval  # noqa: F401  (adds `eval` to main)
from blipsearch.retrieval.cli import main
from blipsearch.retrieval.errors import InvalidInputError
from blipsearch.retrieval.eval_cache import file_stamps, fill_cache, image_manifest, open_cache
from blipsearch.retrieval.eval_metrics import Recall
from blipsearch.retrieval.eval_report import RunInfo, format_table, published_for, to_json
from blipsearch.retrieval.evaluation import (
    EvalOptions,
    EvalResult,
    default_k_test,
    encode_captions,
    evaluate,
    itc_similarity,
    rerank,
    top_candidates,
)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle")


def _scene(colour: str, shape: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (120, 160, 200) if colour != "blue" else (200, 190, 150))
    draw = ImageDraw.Draw(image)
    box = (8, 6, size[0] - 8, size[1] - 6)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    return image


def _captions(colour: str, shape: str) -> list[str]:
    return [f"a {colour} {shape}", f"the {colour} {shape}", f"a photo of a {colour} {shape}",
            f"a picture of the {shape}", f"an image with a small {colour} {shape} on the left"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """6 images (PNG and JPEG, odd sizes) with 5 captions each, as LAVIS and as Karpathy files."""
    root = tmp_path_factory.mktemp("eval-data")
    (root / "images" / "test").mkdir(parents=True)
    lavis, karpathy = [], [{"filepath": "train", "filename": "x.jpg", "split": "train",
                            "sentences": [{"raw": "not in the test split"}]}]
    for i, colour in enumerate(COLOURS):
        shape = SHAPES[i % len(SHAPES)]
        name = f"{i:03d}_{colour}.{'png' if i % 2 else 'jpg'}"
        _scene(colour, shape, (40 + 4 * i, 30 + 2 * i)).save(root / "images" / "test" / name)
        lavis.append({"image": f"test/{name}", "caption": _captions(colour, shape), "image_id": i})
        karpathy.append({"filepath": "test", "filename": name, "split": "test",
                         "sentences": [{"raw": c} for c in _captions(colour, shape)]})
        if i == 2:
            karpathy.append({"filepath": "val", "filename": "v.jpg", "split": "restval",
                             "sentences": [{"raw": "restval counts as training data"}]})
    (root / "flickr30k_test.json").write_text(json.dumps(lavis))
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": karpathy, "dataset": "flickr30k"}))
    return root


def _run(args: list[str]):
    result = CliRunner().invoke(main, ["eval", *args])
    return result


def _eval_json(dataset: Path, model_dir: Path, ann: str, *extra: str) -> dict:
    result = _run(["--images", str(dataset / "images"), "--ann", str(dataset / ann), "--model", str(model_dir),
                   "--device", "cpu", "--precision", "fp32", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- a reference: LAVIS `compute_sim_matrix` + `report_metrics`, on features rounded as the cache stores them


def _reference(model, dataset: Path, k_test: int) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    items = load_annotations(dataset / "flickr30k_test.json")
    pixels = [load_image(dataset / "images" / it.image, model.info.preprocessing).pixels for it in items]
    images = model.encode_images(model.pixel_values(pixels))
    features = images.features.half().float()  # (I, T, H)
    captions = [c for it in items for c in it.captions]
    texts = model.encode_texts(captions)
    # (I, N): LAVIS's BLIP `image_feat @ text_feat.t()`; BLIP-2 `(image_feats @ text_feat.t()).max(dim=1)`
    itc = torch.einsum("ivd,nd->inv", images.embeddings, texts.embeddings).amax(dim=-1)
    itm = torch.stack([model.itm_scores(texts.tokens, features[i:i + 1].expand(len(captions), -1, -1))[:, 1]
                       for i in range(len(items))])  # (I, N) class-1 logits, every pair
    i2t, t2i = torch.full_like(itc, -100.0), torch.full_like(itc.T, -100.0)
    for i in range(itc.shape[0]):
        top = itc[i].topk(k_test).indices
        i2t[i, top] = itm[i, top] + itc[i, top]
    for t in range(itc.shape[1]):
        top = itc[:, t].topk(min(k_test, len(items))).indices
        t2i[t, top] = itm[top, t] + itc[top, t]
    image_of = np.repeat(np.arange(len(items)), 5)
    # (worst, best): the tiny random model scores some captions equal to 7 digits (ties LAVIS's argsort breaks by
    # the last bit), so each metric is a range: the true pairs ranked below or above scores within TIE of theirs
    return {name: tuple(_lavis_report_metrics(a, b, image_of, nudge) for nudge in (-TIE, TIE))
            for name, (a, b) in {"itc": (itc.numpy(), itc.T.numpy()), "rerank": (i2t.numpy(), t2i.numpy())}.items()}


TIE = 1e-5


def _lavis_report_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: np.ndarray,
                          nudge: float = 0.0) -> dict:
    """LAVIS `RetrievalTask._report_metrics`, verbatim in substance; `nudge` is added to the true pairs' scores
    first (to rank them below or above near-ties)."""
    img2txt = [np.flatnonzero(txt2img == i) for i in range(len(scores_i2t))]
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        score = score.copy()
        score[img2txt[index]] += nudge
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        score = score.copy()
        score[txt2img[index]] += nudge
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return dict(zip(("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"), tr + ir, strict=True))


def _assert_recall_matches(ours: dict, reference: tuple[dict, dict], keys) -> None:
    worst, best = reference
    for key in keys:
        assert worst[key] - 1e-9 <= ours[key] <= best[key] + 1e-9, (key, ours[key], worst[key], best[key])


ALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")


def test_both_annotation_forms_give_lavis_numbers(dataset, family_model_dir, family_model):
    """BLIP and BLIP-2 (ITC max over the queries, ITM averaged over them), against LAVIS's protocol."""
    lavis = _eval_json(dataset, family_model_dir, "flickr30k_test.json", "--k-test", "64")
    karpathy = _eval_json(dataset, family_model_dir, "dataset_flickr30k.json", "--k-test", "64")
    assert lavis["model"]["family"] == family_model.info.family
    assert (lavis["dataset"]["images"], lavis["dataset"]["texts"]) == (6, 30)
    # a LAVIS list does not say which split it holds (it said "test" for any file); a Karpathy file does
    assert (lavis["dataset"]["split"], karpathy["dataset"]["split"]) == (None, "test")
    keys = ("itc", "rerank", "itm_pairs", "candidate_pairs")
    assert {k: lavis[k] for k in keys} == {k: karpathy[k] for k in keys}
    # k_test above the pool: every pair is a candidate both ways, and ITM scores each one once.
    assert (lavis["candidate_pairs"], lavis["itm_pairs"]) == (6 * 30 + 30 * 6, 6 * 30)
    reference = _reference(family_model, dataset, k_test=30)
    _assert_recall_matches(lavis["itc"], reference["itc"], ALL_KEYS)
    _assert_recall_matches(lavis["rerank"], reference["rerank"], ALL_KEYS)


def test_small_k_test_matches_lavis_where_its_filler_does_not_decide(dataset, family_model_dir, family_model):
    ours = _eval_json(dataset, family_model_dir, "flickr30k_test.json", "--k-test", "5")
    assert ours["k_test"] == 5 and ours["candidate_pairs"] == 6 * 5 + 30 * 5
    assert 30 * 5 <= ours["itm_pairs"] < 6 * 5 + 30 * 5  # pairs in both directions' candidates count once
    reference = _reference(family_model, dataset, k_test=5)
    # LAVIS orders its -100 non-candidates arbitrarily; within the top 5 only candidates count.
    _assert_recall_matches(ours["rerank"], reference["rerank"], ("txt_r1", "txt_r5", "img_r1", "img_r5"))


def test_reranked_score_is_itm_logit_plus_itc_through_the_adapter(dataset, tiny_model, tmp_path):
    items = load_annotations(dataset / "flickr30k_test.json")
    root = dataset / "images"
    cache = open_cache(tmp_path, image_manifest(tiny_model, root, [it.image for it in items]))
    fill_cache(tiny_model, cache, root, [it.image for it in items], batch_size=4, workers=2)
    encoded = encode_captions(tiny_model, items, batch_size=7)  # batches padded to different lengths
    itc = itc_similarity(torch.from_numpy(np.array(cache.embeddings)), encoded.embeddings)
    i2t, t2i = top_candidates(itc, 4), top_candidates(itc.T, 3)
    i2t_fused, t2i_fused = rerank(tiny_model, cache, encoded.tokens, itc, i2t, t2i, batch_size=3)

    # Direct: every pair, one caption batch padded to its longest, features repeated per row.
    captions = [c for it in items for c in it.captions]
    pixels = [load_image(root / it.image, tiny_model.info.preprocessing).pixels for it in items]
    images = tiny_model.encode_images(tiny_model.pixel_values(pixels))
    texts = tiny_model.encode_texts(captions)
    cosine = images.embeddings[:, 0] @ texts.embeddings.T  # (I, N)
    assert torch.allclose(itc, cosine, atol=1e-5)

    def direct(features: torch.Tensor) -> torch.Tensor:  # (I, N) ITM class-1 logit + ITC cosine
        return torch.stack([tiny_model.itm_scores(texts.tokens, features[i].expand(len(captions), -1, -1))[:, 1]
                            for i in range(len(items))]) + cosine

    rounded, raw = direct(images.features.half().float()), direct(images.features)
    rows = torch.arange(6)[:, None].expand(-1, 4)
    # The cache stores float16: exact against rounded features, close against the raw ones.
    assert torch.allclose(i2t_fused, rounded[rows, i2t], atol=1e-5)
    assert torch.allclose(t2i_fused, rounded.T[torch.arange(30)[:, None].expand(-1, 3), t2i], atol=1e-5)
    assert torch.allclose(i2t_fused, raw[rows, i2t], atol=2e-3)


class _Interrupted(Exception):
    pass


class _DiesAfter:
    """The tiny model, killed after `batches` image batches, as a Ctrl-C or an OOM kill would."""

    def __init__(self, model, batches: int):
        self.model, self.left = model, batches

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_images(self, pixel_values):
        if self.left == 0:
            raise _Interrupted
        self.left -= 1
        return self.model.encode_images(pixel_values)


def test_cache_resumes_a_killed_run_with_identical_numbers(dataset, tiny_model, tmp_path):
    items = load_annotations(dataset / "flickr30k_test.json")
    root, options = dataset / "images", EvalOptions(k_test=4, image_batch=2, itm_batch=16, workers=2)
    fresh = evaluate(tiny_model, items, root, options)  # temporary cache
    assert fresh.images_encoded == 6
    with pytest.raises(_Interrupted):
        evaluate(_DiesAfter(tiny_model, batches=1), items, root, options, cache_dir=tmp_path)
    resumed = evaluate(tiny_model, items, root, options, cache_dir=tmp_path)
    assert resumed.images_encoded == 4  # the first batch of 2 was kept
    again = evaluate(tiny_model, items, root, options, cache_dir=tmp_path)
    assert again.images_encoded == 0
    assert (fresh.itc, fresh.rerank) == (resumed.itc, resumed.rerank) == (again.itc, again.rerank)
    assert len(list(tmp_path.iterdir())) == 1  # one entry for this model and image list


def test_limit_fills_the_full_runs_cache_and_a_changed_file_is_encoded_again(dataset, tiny_model, tmp_path):
    items = load_annotations(dataset / "flickr30k_test.json")
    root, options = dataset / "images", EvalOptions(k_test=4, image_batch=4, workers=1)
    limited = evaluate(tiny_model, items, root, options, cache_dir=tmp_path, limit=2)
    assert (limited.images, limited.texts, limited.images_encoded) == (2, 10, 2)
    assert evaluate(tiny_model, items, root, options, cache_dir=tmp_path).images_encoded == 4
    changed = tmp_path / "copy"
    changed.mkdir()
    for it in items:  # same names, one file re-saved with another size
        (changed / it.image).parent.mkdir(parents=True, exist_ok=True)
        (changed / it.image).write_bytes((root / it.image).read_bytes())
    first = evaluate(tiny_model, items, changed, options, cache_dir=tmp_path / "c2")
    (changed / items[0].image).write_bytes((root / items[0].image).read_bytes() + b"\0" * 7)
    second = evaluate(tiny_model, items, changed, options, cache_dir=tmp_path / "c2")
    assert (first.images_encoded, second.images_encoded) == (6, 1)
    # a file rewritten at the same size (uncompressed images of one shape all have one size): only its
    # modification time tells; the cache once kept its row and reported the old recall
    rewritten = changed / items[2].image
    os.utime(rewritten, ns=(rewritten.stat().st_atime_ns, rewritten.stat().st_mtime_ns + 10**9))
    third = evaluate(tiny_model, items, changed, options, cache_dir=tmp_path / "c2")
    assert third.images_encoded == 1
    assert file_stamps(changed, [items[2].image]).tolist() == [[rewritten.stat().st_size + 1,
                                                                  rewritten.stat().st_mtime_ns]]


def test_itc_similarity_takes_the_best_of_several_vectors_per_image(monkeypatch):
    import blipsearch.retrieval.evaluation as evaluation

    generator = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(5, 4, 8, generator=generator), dim=-1)  # (I, V, D)
    texts = torch.nn.functional.normalize(torch.randn(7, 8, generator=generator), dim=-1)
    expected = torch.stack([(images[:, v] @ texts.T) for v in range(4)]).amax(dim=0)
    assert torch.allclose(itc_similarity(images, texts), expected, atol=1e-6)
    monkeypatch.setattr(evaluation, "_ITC_CHUNK_ELEMENTS", 1)  # one image per chunk
    assert torch.allclose(itc_similarity(images, texts), expected, atol=1e-6)


def test_table_on_stdout_and_limit(dataset, tiny_model_dir):
    result = _run(["--images", str(dataset / "images"), "--ann", str(dataset / "dataset_flickr30k.json"),
                   "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32", "--limit", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{tiny_model_dir} on custom (test split): 3 images, 15 captions, k_test 128 "
                               "(capped at 3 images per caption, 15 captions per image)")
    assert lines[2].split() == ["TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "mean"]
    assert lines[3].startswith("ITC ") and lines[4].startswith("ITC + ITM re-rank")
    assert lines[5].split()[:8] == ["published"] + ["-"] * 7 and "none known" in lines[5]
    assert [line.split()[0] for line in lines[9:]] == ["image", "text", "ITC", "ITM"]
    assert "3 images encoded, 0 from cache" in lines[9]
    assert "45 distinct pairs for 90 candidates" in lines[12]  # 3 x 15 + 15 x 3, k_test above the pool


def test_missing_images_are_reported_before_the_model_loads(dataset, tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "test/000_red.jpg", "caption": ["a"]},
                               {"image": "test/nope.jpg", "caption": ["b"]}]))
    result = _run(["--images", str(dataset / "images"), "--ann", str(ann), "--model", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"blipsearch: error: 1 of 2 annotated images are missing under {dataset / 'images'}, e.g. test/nope.jpg; "
        "--images is the folder the annotation paths start in"]


def test_an_image_listed_twice_is_one_image_in_both_forms(tmp_path):
    """A Karpathy file made it two images of one file, which tied on every caption: each query missed at R@1."""
    lavis = [{"image": "a.png", "caption": "one"}, {"image": "b.png", "caption": "two"},
             {"image": "./a.png", "caption": ["three"]}]  # spelled another way: it was a second image
    karpathy = {"images": [{"split": "test", "filename": "a.png", "sentences": [{"raw": "one"}]},
                           {"split": "test", "filename": "b.png", "sentences": [{"raw": "two"}]},
                           {"split": "test", "filename": "a.png", "sentences": [{"raw": "three"}]}]}
    (tmp_path / "lavis.json").write_text(json.dumps(lavis))
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    for name in ("lavis.json", "karpathy.json"):
        read = [(i.image, i.captions) for i in load_annotations(tmp_path / name)]
        assert read == [("a.png", ["one", "three"]), ("b.png", ["two"])], name


def test_split_is_refused_for_a_lavis_list_which_holds_one(dataset, tmp_path):
    """`--split val` on a LAVIS file evaluated the whole file and reported it as the val split."""
    lavis = dataset / "flickr30k_test.json"
    result = _run(["--images", str(dataset / "images"), "--ann", str(lavis), "--split", "val",
                   "--model", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"blipsearch: error: annotation file {lavis} is a LAVIS list, which holds one "
                                     "split; a split ('val') can be chosen in a Karpathy file only: leave it out")
    assert [i.image for i in load_annotations(dataset / "dataset_flickr30k.json", "train")] == ["train/x.jpg",
                                                                                              "val/v.jpg"]
    assert len(load_annotations(lavis)) == len(load_annotations(dataset / "dataset_flickr30k.json")) == 6
    assert len(load_annotations(lavis, default_split="train")) == 6  # training's default passes a LAVIS file by


def test_an_image_that_does_not_decode_is_one_line_saying_what_to_do(dataset, tiny_model_dir, tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "bad.png").write_bytes(b"not an image")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "test/bad.png", "caption": ["a red square"]}]))
    result = _run(["--images", str(tmp_path), "--ann", str(ann), "--model", str(tiny_model_dir), "-q"])
    assert result.exit_code == 1
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"blipsearch: error: image {tmp_path / 'test' / 'bad.png'}: ") and line.endswith(
        "recall counts every annotated image: replace the file, or remove its entry from the annotation file")


@pytest.mark.parametrize("entries", [
    [{"image": "test/000_red.jpg", "caption": []}],
    [{"image": "test/000_red.jpg", "caption": ["a red square", " "]}],
    [{"image": "test/000_red.jpg", "caption": ["a red square", "..."]}],  # cleaning empties it
])
def test_an_image_without_a_caption_with_words_is_refused_before_the_model_loads(dataset, tmp_path, entries):
    """An image with no caption silently left TR's count (TR@1 60.0 over 5 of 6 images); an empty caption
    was a query of nothing. Training reads such files as they are (its own rules)."""
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(entries))
    result = _run(["--images", str(dataset / "images"), "--ann", str(ann), "--model", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("blipsearch: error: annotated image test/000_red.jpg has no caption, or one "
                                     "that is empty once cleaned (BLIP's pre_caption); give each image captions "
                                     "with words, or remove it from the annotation file")


def test_a_caption_that_is_not_utf8_is_named_before_the_model_loads(dataset, tmp_path):
    """It was refused as a "query text" to "type again in a terminal", after the images were encoded."""
    ann = tmp_path / "ann.json"
    ann.write_text('[{"image": "test/000_red.jpg", "caption": "a \\ud800 dog"}]')
    result = _run(["--images", str(dataset / "images"), "--ann", str(ann), "--model", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "annotated image test/000_red.jpg has a caption that is not valid UTF-8 text" in result.stderr


def test_an_annotation_file_with_a_byte_order_mark_reads(tmp_path):
    (tmp_path / "ann.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"image": "a.png", "caption": "x"}]).encode())
    assert [i.image for i in load_annotations(tmp_path / "ann.json")] == ["a.png"]


def test_a_damaged_or_unreservable_cache_entry(dataset, tiny_model, tmp_path, monkeypatch):
    """An empty file in an entry made every later run print "Aborted!" (np.load's EOFError); a disk that
    filled while the memory maps wrote into the sparse files killed the process ("Bus error", exit 135)."""
    import errno

    from blipsearch.retrieval import eval_cache

    items = load_annotations(dataset / "flickr30k_test.json")
    root, options = dataset / "images", EvalOptions(k_test=4, image_batch=2, itm_batch=16, workers=2)
    first = evaluate(tiny_model, items, root, options, cache_dir=tmp_path / "c")
    [entry] = (tmp_path / "c").iterdir()
    (entry / "done.npy").write_bytes(b"")
    again = evaluate(tiny_model, items, root, options, cache_dir=tmp_path / "c")
    assert again.images_encoded == 6 and (again.itc, again.rerank) == (first.itc, first.rerank)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eval_cache.os, "posix_fallocate", full)
    with pytest.raises(InvalidInputError, match=r"the disk holding .* is full: the feature cache needs [0-9.]+ GB"):
        evaluate(tiny_model, items, root, options, cache_dir=tmp_path / "d")


def test_a_bad_annotation_file_is_one_line(dataset, tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text("{not json")
    result = _run(["--images", str(dataset / "images"), "--ann", str(ann)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"blipsearch: error: annotation file {ann} is not valid JSON (line 1)"


def test_default_k_test_follows_lavis():
    assert default_k_test("blip", "coco") == 256
    assert default_k_test("blip", "flickr30k") == 128
    assert default_k_test("blip", "custom") == 128
    assert default_k_test("blip-2", "coco") == default_k_test("blip-2", "flickr30k") == 128


def _result(images: int) -> EvalResult:
    recall = Recall(80.0, 95.0, 97.5, 60.0, 85.0, 90.0)
    return EvalResult(images=images, texts=5 * images, k_test=256, itc=recall, rerank=recall,
                      seconds={"image_encoding": 2.0, "text_encoding": 1.0, "itc": 0.5, "itm": 4.0},
                      images_encoded=images, itm_pairs=80, candidate_pairs=100)


def test_published_figures_sit_beside_ours_with_a_note_on_subsets():
    run = RunInfo("Salesforce/blip-itm-base-coco", "abc", "blip", "cpu", "bfloat16", "coco", "a.json", "img",
                  "test")
    published = published_for(run.model_id, run.dataset)
    assert (published.txt_r1, published.img_r1) == (82.0, 64.5)
    table = format_table(run, _result(5000), published).splitlines()
    assert table[5].split()[:8] == ["published", "82.0", "-", "-", "64.5", "-", "-", "-"]
    assert table[6] == ""  # full split: no note
    assert "5000-image test split; this run used 100 images" in format_table(run, _result(100), published)
    one = replace(_result(1), texts=1)
    assert "1 image, 1 caption, k_test" in format_table(run, one, published)  # it said "1 images, 1 captions"
    assert "1 image encoded, 0 from cache" in format_table(run, one, published)
    assert published_for("Salesforce/blip-itm-base-coco", "flickr30k") is None
    lavis = replace(run, annotations="data/coco_karpathy_test.json", split=None)  # its split is its file's
    table = format_table(lavis, _result(5000), published)
    assert table.startswith("Salesforce/blip-itm-base-coco on coco (coco_karpathy_test.json): 5000 images")
    assert table.splitlines()[6] == ""  # the test split's size: no note
    assert "5000-image test split; this run used 100 images of coco_karpathy_test.json)" in \
        format_table(lavis, _result(100), published)
    assert published_for("/models/my-blip", "coco") is None
    data = to_json(run, _result(100), published)
    assert data["published"]["txt_r1"] == 82.0 and data["itm_pairs_per_second"] == 20.0
    assert data["rerank"]["r_mean"] == pytest.approx((80 + 95 + 97.5 + 60 + 85 + 90) / 6)


def test_captions_are_cleaned_as_blip_does():
    from blipsearch.retrieval.evaluation import pre_caption

    assert pre_caption('A man (left) riding a "horse"; on the beach!!  ') == "a man left riding a horse on the beach"
    assert pre_caption(" ".join(["word"] * 40)) == " ".join(["word"] * 30)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
    (b'{"images": [{"split": "test", "filename": "a.png", "sentences": [{"raw": 5}]}]}', "needs 'split' and"),
    (b'{"images": [{"split": "test", "filename": 5, "sentences": [{"raw": "a"}]}]}', "needs 'split' and"),
    (b'{"images": [{"split": "test", "filename": "a.png", "sentences": "abc"}]}', "needs 'split' and"),
    (b'{"images": [null]}', "Karpathy annotation image 0 of"),
    (b'[{"image": null, "caption": "a"}]', "'image' must be a file name"),
    (b'[{"image": ["a.png"], "caption": "a"}]', "'image' must be a file name"),
    (b'[{"image": "a.png", "caption": null}]', "'caption' a text or a list of texts"),
])
def test_annotation_files_of_the_wrong_shape_are_one_line_naming_the_file(tmp_path, content, message):
    """Each once ended in a traceback (UnicodeDecodeError, AttributeError, TypeError) in eval, train or capfilt,
    or was read as a caption such as "None"."""
    (tmp_path / "ann.json").write_bytes(content)
    with pytest.raises(InvalidInputError, match=re.escape(message)) as refused:
        load_annotations(tmp_path / "ann.json")
    assert str(tmp_path / "ann.json") in str(refused.value) and "\n" not in str(refused.value)


TERM_DRIVER = """
import sys
from pathlib import Path
from blipsearch.retrieval import cli, evaluation

fifo, marker = sys.argv[1:3]

def fill_cache(*args, **kwargs):  # stops inside the run, its temporary feature folder made
    Path(marker).touch()
    open(fifo, "rb")

evaluation.fill_cache = fill_cache
sys.argv = ["blipsearch", *sys.argv[3:]]
cli.run()
"""


def test_sigterm_stops_eval_as_ctrl_c_does_and_its_temporary_features_go(dataset, tiny_model_dir, tmp_path):
    """SIGTERM ended the process outright: the temporary feature folder (4.4 GB on COCO) stayed behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "tmp").mkdir()
    os.mkfifo(tmp_path / "never-written")
    (tmp_path / "driver.py").write_text(TERM_DRIVER)
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "never-written"), str(tmp_path / "inside"),
         "eval", "--images", str(dataset / "images"), "--ann", str(dataset / "flickr30k_test.json"), "--model",
         str(tiny_model_dir), "--device", "cpu", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "inside").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [p.name[:16] for p in (tmp_path / "tmp").iterdir()] == ["blipsearch-eval-"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert (process.returncode, stderr.strip().splitlines()[-1]) == (143, "blipsearch: terminated"), stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_repeated_captions_are_encoded_once_and_tie_exactly(tiny_model, monkeypatch):
    """A batch's row order moved their embeddings' last bits, and with them which of two images with the same
    caption ranked first (ITC TR@1 50 or 0 by the file's order)."""
    items = [AnnotatedImage("a.png", ["A red dog.", "a blue cat"]), AnnotatedImage("b.png", ["a red dog"])]
    asked, encode = [], tiny_model.encode_texts
    monkeypatch.setattr(tiny_model, "encode_texts", lambda texts: asked.extend(texts) or encode(texts))
    encoded = encode_captions(tiny_model, items, batch_size=2, progress=False)
    assert asked == ["a red dog", "a blue cat"]
    assert torch.equal(encoded.embeddings[0], encoded.embeddings[2])
    assert torch.equal(encoded.tokens.input_ids[0], encoded.tokens.input_ids[2])
    assert encoded.image_of.tolist() == [0, 0, 1] and len(encoded.embeddings) == 3
