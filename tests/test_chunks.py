"""Image batches encoded on the CPU in fp32 as chunks, one single-threaded torch per thread (models/chunks.py)."""

import threading

import pytest
import torch

from blipsearch.retrieval.models.chunks import encode_in_chunks


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
    out = encode_in_chunks(encode, batch)
    torch.testing.assert_close(out, batch * 2, rtol=0, atol=0)
    assert sorted(size for *_, size, _ in encode.calls) == [4, 4, 4, 4]  # 2 chunks per thread, 2 threads
    assert all(name.startswith("encode") and threads == 1 and inference
               for name, threads, _, inference in encode.calls)
    assert torch.get_num_threads() == 2  # the caller's own setting is untouched


@torch.inference_mode()
def test_tuples_are_joined_element_by_element(two_torch_threads):
    batch = torch.arange(5, dtype=torch.float32)[:, None]
    features, embeddings = encode_in_chunks(lambda b: (b + 1, torch.cat([b, b], dim=1)), batch)
    torch.testing.assert_close(features, batch + 1, rtol=0, atol=0)
    torch.testing.assert_close(embeddings, torch.cat([batch, batch], dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["bf16", "grad", "one thread", "one image"])
def test_where_chunks_were_not_measured_or_cannot_pay_the_batch_runs_whole_on_the_callers_thread(
        two_torch_threads, case):
    batch = torch.ones(1 if case == "one image" else 6, 3, dtype=torch.bfloat16 if case == "bf16" else torch.float32)
    if case == "one thread":
        torch.set_num_threads(1)
    encode = Recorder()
    if case == "grad":
        encode_in_chunks(encode, batch)
    else:
        with torch.inference_mode():
            encode_in_chunks(encode, batch)
    assert [(name, size) for name, _, size, _ in encode.calls] == [(threading.current_thread().name,
                                                                    batch.shape[0])]


@torch.inference_mode()
def test_an_error_in_one_chunk_reaches_the_caller_as_it_is(two_torch_threads):
    batch = torch.arange(8, dtype=torch.float32)[:, None]
    with pytest.raises(ValueError, match="image 5 is broken"):
        encode_in_chunks(Recorder(fail_on=5), batch)


@pytest.mark.parametrize("directory", ["tiny_model_dir", "tiny_blip2_dir"])
def test_a_models_encodings_in_chunks_equal_the_batch_encoded_whole(directory, request, two_torch_threads):
    from blipsearch.retrieval.models import load_model

    model = load_model(str(request.getfixturevalue(directory)), "cpu", "fp32")
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
    torch.testing.assert_close(chunked.features, whole.features, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.embeddings, whole.embeddings, rtol=0, atol=1e-5)
