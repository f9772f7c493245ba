"""Batches computed on the CPU (fp32, bf16) as chunks, one single-threaded torch per thread (models/chunks.py)."""

import threading

import pytest
import torch

from blipsearch.retrieval.models.chunks import run_in_chunks


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Recorder:
    """An encoder that returns its input and notes where and how each call ran."""

    def __init__(self, fail_on: int | None = None):
        self.calls = []
        self.lock = threading.Lock()
        self.fail_on = fail_on

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls.append((threading.current_thread().name, torch.get_num_threads(), batch.shape[0],
                               torch.is_inference_mode_enabled()))
        if self.fail_on is not None and self.fail_on in batch[:, 0].tolist():
            raise ValueError(f"image {self.fail_on} is broken")
        return batch * 2


@torch.inference_mode()
def test_a_batch_runs_as_chunks_on_single_threaded_threads_and_joins_in_order(two_torch_threads):
    batch = torch.arange(16, dtype=torch.float32)[:, None].repeat(1, 3)
    encode = Recorder()
    out = run_in_chunks(encode, batch, chunks_per_thread=2)
    torch.testing.assert_close(out, batch * 2, rtol=0, atol=0)
    assert sorted(size for *_, size, _ in encode.calls) == [4, 4, 4, 4]  # 2 chunks per thread, 2 threads
    assert all(name.startswith("encode") and threads == 1 and inference
               for name, threads, _, inference in encode.calls)
    assert torch.get_num_threads() == 2  # the caller's own setting is untouched


@torch.inference_mode()
def test_batches_split_alike_and_tuples_join_element_by_element(two_torch_threads):
    batch = torch.arange(5, dtype=torch.float32)[:, None]
    ids = torch.arange(5)[:, None] * 10
    sizes = []
    features, rows = run_in_chunks(lambda b, i: sizes.append(len(b)) or (b + 1, torch.cat([b, i], dim=1)), batch, ids)
    assert sorted(sizes) == [2, 3]  # one chunk per thread by default
    torch.testing.assert_close(features, batch + 1, rtol=0, atol=0)
    torch.testing.assert_close(rows, torch.cat([batch, ids], dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["fp16", "bf16 with AMX", "grad", "one thread", "one image",
                                  "batches of other lengths", "autocast", "a dispatch mode"])
def test_where_chunks_were_not_measured_or_cannot_pay_the_batch_runs_whole_on_the_callers_thread(
        two_torch_threads, case, monkeypatch):
    from contextlib import nullcontext

    from torch.utils.flop_counter import FlopCounterMode

    from blipsearch.retrieval.models import layers

    dtype = {"fp16": torch.float16, "bf16 with AMX": torch.bfloat16}.get(case, torch.float32)
    batch = torch.ones(1 if case == "one image" else 6, 3, dtype=dtype)
    monkeypatch.setattr(layers, "_has_amx", lambda: case == "bf16 with AMX")
    if case == "one thread":
        torch.set_num_threads(1)
    encode = Recorder()
    others = (torch.ones(2, 3),) if case == "batches of other lengths" else ()
    mode = {"autocast": torch.autocast("cpu", dtype=torch.bfloat16),  # would not reach the pool's threads
            "a dispatch mode": FlopCounterMode(display=False)}.get(case, nullcontext())
    with mode, torch.inference_mode(case != "grad"):
        run_in_chunks(lambda b, *_: encode(b), batch, *others)
    assert [(name, size) for name, _, size, _ in encode.calls] == [(threading.current_thread().name,
                                                                    batch.shape[0])]


def test_under_no_grad_the_chunks_run_in_inference_mode_and_join(two_torch_threads):
    batch = torch.arange(6, dtype=torch.float32)[:, None]
    encode = Recorder()
    with torch.no_grad():
        out = run_in_chunks(encode, batch)
    torch.testing.assert_close(out, batch * 2, rtol=0, atol=0)
    assert sorted(size for *_, size, _ in encode.calls) == [3, 3]
    assert all(inference for *_, inference in encode.calls)


@torch.inference_mode()
def test_an_error_in_one_chunk_reaches_the_caller_as_it_is(two_torch_threads):
    batch = torch.arange(8, dtype=torch.float32)[:, None]
    with pytest.raises(ValueError, match="image 5 is broken"):
        run_in_chunks(Recorder(fail_on=5), batch)


@pytest.mark.parametrize(("directory", "precision"), [("tiny_model_dir", "fp32"), ("tiny_blip2_dir", "fp32"),
                                                       ("tiny_model_dir", "bf16")])
def test_a_models_encodings_in_chunks_equal_the_batch_encoded_whole(directory, precision, request,
                                                                    two_torch_threads, monkeypatch):
    from blipsearch.retrieval.models import layers, load_model

    monkeypatch.setattr(layers, "_has_amx", lambda: False)  # bf16 chunks run without AMX (where measured)
    model = load_model(str(request.getfixturevalue(directory)), "cpu", precision)
    size = model.info.preprocessing.height
    pixels = torch.randn(7, 3, size, size, generator=torch.Generator().manual_seed(0))
    sizes = []
    hook = model.vision.register_forward_hook(lambda module, inputs, output: sizes.append(inputs[0].shape[0]))
    try:
        chunked = model.encode_images(pixels)
        assert sorted(sizes) == [1, 2, 2, 2]
        torch.set_num_threads(1)  # the whole batch on this thread
        whole = model.encode_images(pixels)
        assert sizes[4:] == [7]
    finally:
        hook.remove()
    # bf16: bit-identical where measured, yet a CPU's GEMM may block other row counts otherwise: an ulp
    close = {"rtol": 0, "atol": 1e-5} if precision == "fp32" else {"rtol": 2**-7, "atol": 2**-7}
    torch.testing.assert_close(chunked.features.float(), whole.features.float(), **close)
    torch.testing.assert_close(chunked.embeddings, whole.embeddings, **close)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_itm_scores_in_chunks_equal_the_candidates_scored_whole(tiny_model_dir, precision, two_torch_threads,
                                                                 monkeypatch):
    from blipsearch.retrieval.models import layers, load_model

    monkeypatch.setattr(layers, "_has_amx", lambda: False)  # bf16 chunks run without AMX (where measured)
    tiny_model = load_model(str(tiny_model_dir), torch.device("cpu"), precision, with_vision=False)  # torch's side
    features = torch.randn(6, tiny_model.info.feature_tokens, tiny_model.info.feature_dim,
                           generator=torch.Generator().manual_seed(1)).to(tiny_model.dtype)
    rows = []
    itm_logits = tiny_model.text.itm_logits
    tiny_model.text.itm_logits = lambda ids, mask, image: rows.append(len(image)) or itm_logits(ids, mask, image)
    try:
        for tokens in (tiny_model.tokenize(["a red dog"]), tiny_model.tokenize(["a red dog on the beach"] * 6)):
            chunked = tiny_model.itm_scores(tokens, features)
            torch.set_num_threads(1)
            whole = tiny_model.itm_scores(tokens, features)
            torch.set_num_threads(2)
            close = {"rtol": 0, "atol": 1e-5} if precision == "fp32" else {"rtol": 2**-7, "atol": 2**-7}
            torch.testing.assert_close(chunked, whole, **close)
            assert sorted(rows) == [3, 3, 6]
            rows.clear()
    finally:
        del tiny_model.text.itm_logits


@torch.inference_mode()
def test_pool_threads_stay_single_threaded_and_threads_started_later_keep_the_default(two_torch_threads):
    from concurrent.futures import ThreadPoolExecutor

    from blipsearch.retrieval.models import chunks

    chunks._POOLS.clear()  # a pool made afresh in this test (the old one's threads stay idle)
    encode = Recorder()
    run_in_chunks(encode, torch.ones(4, 3))
    assert ThreadPoolExecutor(1).submit(torch.get_num_threads).result() == 2  # the default, not the pool's 1
    chunks._in_new_thread(torch.set_num_threads, 3)  # the default changes; this thread keeps 2, so the same pool
    try:
        run_in_chunks(encode, torch.ones(8, 3))
    finally:
        chunks._in_new_thread(torch.set_num_threads, 2)
    assert [threads for _, threads, _, _ in encode.calls] == [1] * 4
    assert len(chunks._POOLS) == 1 and len(chunks._POOLS[2]._threads) == 2  # both started when it was made


def test_a_failure_in_the_settings_thread_reaches_the_caller():
    from blipsearch.retrieval.models import chunks

    with pytest.raises(ZeroDivisionError):
        chunks._in_new_thread(lambda: 1 / 0)
