import pytest
import torch

import decdec


def brute_force_row(r: torch.Tensor) -> tuple[float, torch.Tensor]:
    """DESIGN.md's scale search for one output channel, spelled out candidate by candidate."""
    m = r.abs().max().item() / 7
    best = None
    for i in range(32):
        first = torch.tensor(m, dtype=torch.float32) / 32
        cand = first + (torch.tensor(m, dtype=torch.float32) - first) * i / 31
        s = cand.half().float()
        q = torch.round(r / s).clamp(-7, 7) if s > 0 else torch.zeros_like(r)
        err = ((q * s - r) ** 2).mean().item()
        if best is None or err < best[0]:
            best = (err, s.item(), q)
    return best[1], best[2]


def test_scale_search_matches_brute_force():
    r = torch.randn(6, 40) * torch.tensor([1.0, 1e-3, 10.0, 0.5, 1e-6, 3.0]).unsqueeze(1)
    pack = decdec.quantize_residual(r)
    nib = pack.nibbles()
    for j in range(6):
        s, q = brute_force_row(r[j])
        assert pack.scales[j].item() == s
        assert torch.equal(nib[:, j].long() - 8, q.long())


def test_layout_one_row_per_input_channel_nibble_per_output():
    r = torch.randn(5, 3)  # out = 5 (odd), in = 3
    pack = decdec.quantize_residual(r)
    assert pack.packed.shape == (3, 3) and pack.packed.dtype == torch.uint8
    assert pack.scales.shape == (5,) and pack.scales.dtype == torch.float16
    nib = pack.nibbles()
    for c in range(3):
        for j in range(5):
            byte = pack.packed[c, j // 2].item()
            assert nib[c, j].item() == ((byte & 15) if j % 2 == 0 else (byte >> 4))
    assert int(nib.min()) >= 1 and int(nib.max()) <= 15  # q + 8 with q in -7..7


def test_zero_rows_get_zero_scale_and_nibble_eight():
    r = torch.randn(4, 16)
    r[2] = 0
    pack = decdec.quantize_residual(r)
    assert pack.scales[2].item() == 0
    assert torch.all(pack.nibbles()[:, 2] == 8)
    assert torch.all(decdec.dequantize_residual(pack)[2] == 0)


def test_dequantize_is_exact_and_error_is_bounded():
    r = torch.randn(64, 96)
    pack = decdec.quantize_residual(r)
    deq = decdec.dequantize_residual(pack)
    assert torch.equal(deq, (pack.nibbles().float() - 8).t() * pack.scales.float().unsqueeze(1))
    s = pack.scales.float().unsqueeze(1)
    clipped = (r.abs() - 7 * s).clamp(min=0)  # the MSE-optimal scale may clip the largest values
    assert torch.all((deq - r).abs() <= torch.maximum(s / 2, clipped) * 1.0001)
    assert ((deq - r).square().mean() / r.square().mean()) < 0.02


@pytest.mark.parametrize("tokens", [1, 7])
def test_residual_correction_equals_masked_dense_product(tokens):
    r = torch.randn(40, 3000) * 0.1
    pack = decdec.quantize_residual(r)
    x = torch.randn(2, tokens, 3000)
    env = decdec.rank_envelope(torch.randn(50, 3000))
    sel = decdec.select_channels(x, 16, env)
    corr = decdec.residual_correction(x, sel, pack)
    mask = torch.zeros_like(x).scatter_(-1, sel, 1.0)
    dense = (x * mask) @ decdec.dequantize_residual(pack).t()
    assert corr.shape == (2, tokens, 40) and corr.dtype == torch.float32
    torch.testing.assert_close(corr, dense, rtol=1e-5, atol=1e-5)


def test_residual_correction_checks_shapes():
    pack = decdec.quantize_residual(torch.randn(8, 16))
    with pytest.raises(ValueError, match="input channels"):
        decdec.residual_correction(torch.randn(1, 12), torch.zeros(1, 2, dtype=torch.long), pack)
    with pytest.raises(ValueError, match="do not match"):
        decdec.residual_correction(torch.randn(2, 16), torch.zeros(1, 2, dtype=torch.long), pack)
