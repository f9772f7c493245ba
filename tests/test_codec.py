import numpy as np
import torch

from blipsearch.indexer import codec


def test_int8_features_round_trip_within_half_a_step():
    torch.manual_seed(0)
    # channels of very different range and offset, as after a LayerNorm's gain and bias
    features = torch.randn(3, 17, 32) * torch.logspace(-2, 1, 32) + torch.linspace(-5, 5, 32)
    packed = codec.pack(features)
    assert len(packed[0].values) + len(packed[0].scale) + len(packed[0].offset) == codec.packed_bytes(17, 32)
    for i, p in enumerate(packed):
        restored = codec.unpack(p.values, p.scale, p.offset, 17, 32)
        step = np.frombuffer(p.scale, np.float16).astype(np.float32)
        error = np.abs(restored - features[i].numpy())
        assert (error <= step / 2 + 1e-3 * np.abs(features[i].numpy()) + 1e-6).all()
        assert error.max() > 0  # it is lossy: the bound above is the claim


def test_constant_channel_survives():
    features = torch.ones(1, 4, 8) * 3.0
    p = codec.pack(features)[0]
    np.testing.assert_allclose(codec.unpack(p.values, p.scale, p.offset, 4, 8), 3.0, atol=1e-3)


def test_records_unpack_into_one_array_as_each_map_alone():
    torch.manual_seed(1)
    packed = codec.pack(torch.randn(3, 17, 32) * 4 + 1)
    records = [memoryview(p.record()) for p in packed]  # as the reader hands them (views of its file)
    together = codec.unpack_records(records, 17, 32)
    assert together.shape == (3, 17, 32) and together.dtype == np.float32
    for p, got in zip(packed, together, strict=True):  # the affine map, written out
        values = np.frombuffer(p.values, np.int8).reshape(17, 32).astype(np.float32)
        scale, offset = (np.frombuffer(b, np.float16).astype(np.float32) for b in (p.scale, p.offset))
        np.testing.assert_array_equal(got, values * scale + offset)
    empty = codec.unpack_records([], 17, 32)
    assert empty.shape == (0, 17, 32) and empty.dtype == np.float32
