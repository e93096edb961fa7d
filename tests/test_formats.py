import pytest
import torch

import decdec
from decdec.formats import packed_row_bytes, weight_from_tensors


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 576])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 1 << bits, (5, n), dtype=torch.uint8)
    packed = decdec.pack_codes(codes, bits)
    assert packed.shape == (5, packed_row_bytes(n, bits))
    assert torch.equal(decdec.unpack_codes(packed, bits, n), codes)


def test_bit_stream_layout():
    # 4 bits: code i in byte i // 2, low nibble for even i
    assert decdec.pack_codes(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x03]]
    # 3 bits: codes 5, 6, 7 -> bits 101 | 110 << 3 | 111 << 6 = 0b1_11110101 -> bytes 0xF5, 0x01
    assert decdec.pack_codes(torch.tensor([[5, 6, 7]], dtype=torch.uint8), 3).tolist() == [[0xF5, 0x01]]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("in_features,group_size", [(576, 128), (256, 128), (300, 64), (128, 128)])
def test_uniform_round_trip_error_bound(bits, in_features, group_size):
    w = torch.randn(48, in_features)
    q = decdec.UniformWeight.quantize(w, bits, group_size)
    groups = -(-in_features // group_size)
    assert q.scales.shape == (48, groups) and q.scales.dtype == torch.float16
    assert q.zeros.dtype == torch.uint8 and int(q.zeros.max()) < (1 << bits)
    err = (q.dequantize() - w).abs()
    scale_per_col = q.scales.float().repeat_interleave(group_size, 1)[:, :in_features]
    # rounding costs half a step; the integer zero point can shift the grid by another half step
    assert torch.all(err <= scale_per_col * 1.0001)
    assert (err / scale_per_col).mean() < 0.3
    codes = q.codes()
    assert int(codes.max()) < (1 << bits)


def test_uniform_partial_group_uses_its_own_range():
    w = torch.zeros(1, 130)
    w[0, 128:] = torch.tensor([100.0, -100.0])  # only the partial last group is wide
    w[0, :128] = torch.linspace(-1, 1, 128)
    q = decdec.UniformWeight.quantize(w, 4, 128)
    assert (q.dequantize()[0, :128] - w[0, :128]).abs().max() < 0.1


def test_uniform_clip_bounds_the_range():
    w = torch.randn(4, 128)
    clip = torch.full((4, 1), 0.5)
    assert q_range(decdec.UniformWeight.quantize(w, 4, 128, clip=clip)) <= 1.0 + 1e-3


def q_range(q):
    deq = q.dequantize()
    return (deq.amax() - deq.amin()).item()


def test_uniform_bad_input():
    with pytest.raises(ValueError, match="bit width"):
        decdec.UniformWeight.quantize(torch.randn(4, 128), 2, 128)
    with pytest.raises(ValueError, match="group size"):
        decdec.UniformWeight.quantize(torch.randn(4, 64), 4, 128)
    with pytest.raises(ValueError, match="floating-point"):
        decdec.UniformWeight.quantize(torch.randn(4), 4, 128)


@pytest.mark.parametrize("bits", [3, 4])
def test_lut_nearest_and_round_trip(bits):
    w = torch.randn(16, 200)
    lut = torch.sort(torch.randn(16, 1 << bits), dim=1).values
    q = decdec.LUTWeight.quantize_nearest(w, lut, bits)
    deq = q.dequantize()
    lut16 = lut.half().float()
    best = (w.unsqueeze(-1) - lut16.unsqueeze(1)).abs().amin(-1)
    assert torch.allclose((deq - w).abs(), best)
    same = weight_from_tensors(q.tensors(), q.metadata())
    assert torch.equal(same.dequantize(), deq)


def test_tensors_metadata_round_trip_and_shape_check():
    q = decdec.UniformWeight.quantize(torch.randn(8, 576), 3, 128)
    again = weight_from_tensors(q.tensors(), q.metadata())
    assert torch.equal(again.dequantize(), q.dequantize())
    bad = dict(q.tensors(), scales=q.scales[:, :2])
    with pytest.raises(ValueError, match="scales"):
        weight_from_tensors(bad, q.metadata())
    with pytest.raises(ValueError, match="unknown weight format"):
        weight_from_tensors(q.tensors(), dict(q.metadata(), format="gptq"))
