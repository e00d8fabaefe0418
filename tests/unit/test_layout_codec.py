import pytest
import torch

from proto import codec
from proto.layout import Layout


def _model():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 3))


def test_layout_covers_float_state_and_round_trips():
    m = _model()
    layout = Layout.from_module(m)
    names = [l.name for l in layout]
    assert "1.num_batches_tracked" not in names and "1.running_mean" in names
    assert [l.is_buffer for l in layout if l.name.startswith("1.running")] == [True, True]
    vec = layout.flatten(m.state_dict())
    assert vec.shape == (layout.d,) and layout.d == sum(t.numel() for k, t in m.state_dict().items() if t.is_floating_point())
    m2 = _model()
    layout.load_into(m2, vec)
    for k, t in m.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t, m2.state_dict()[k])
    assert Layout.from_json(layout.to_json()) == layout and Layout.from_json(layout.to_json()).hash() == layout.hash()
    with pytest.raises(ValueError, match="elements"):
        layout.unflatten(torch.zeros(layout.d + 1))


def test_codec_round_trip_and_refusals():
    t = torch.randn(300_000)
    buf = codec.tensor_bytes(t)
    h = codec.tensor_header(buf, (t.numel(),))
    chunks = list(codec.iter_chunks(buf, 1 << 16))
    assert len(chunks) == -(-len(buf) // (1 << 16))
    assert torch.equal(codec.decode_stream(h, chunks, expected_bytes=len(buf)), t)
    with pytest.raises(codec.CodecError) as e:
        codec.decode_stream(h, chunks[:-1])
    assert e.value.reason == "truncated"
    with pytest.raises(codec.CodecError) as e:
        codec.decode_stream(h, chunks + [b"\0\0\0\0"])
    assert e.value.reason == "oversized"
    flipped = bytearray(chunks[0]); flipped[5] ^= 1
    with pytest.raises(codec.CodecError) as e:
        codec.decode_stream(h, [bytes(flipped)] + chunks[1:])
    assert e.value.reason == "checksum"
    with pytest.raises(codec.CodecError) as e:
        codec.Assembler(h, expected_bytes=len(buf) - 4)
    assert e.value.reason == "size"
    h64 = codec.tensor_header(buf, (t.numel(),)); h64.dtype = "float64"
    with pytest.raises(codec.CodecError) as e:
        codec.Assembler(h64)
    assert e.value.reason == "dtype"
