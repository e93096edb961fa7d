import pytest
import torch

import decdec
from decdec import DecDECLinear, SelectionGroup


def make_layer(d_in=2048, d_out=96, bits=3, mode="decdec", k_chunk=16, fmt="uniform", bias=False):
    w = torch.randn(d_out, d_in)
    if fmt == "uniform":
        q = decdec.UniformWeight.quantize(w, bits, 128)
    else:
        q = decdec.LUTWeight.quantize_nearest(w, torch.randn(d_out, 1 << bits).sort(1).values, bits)
    pack = decdec.quantize_residual(w - q.dequantize())
    calib = torch.randn(64, d_in)
    group = SelectionGroup("kind", decdec.rank_envelope(calib), calib.square().mean(0), mode=mode, k_chunk=k_chunk)
    b = torch.randn(d_out) if bias else None
    return DecDECLinear(q, b, pack, group), w, q, pack


@pytest.mark.parametrize("fmt", ["uniform", "lut"])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_step_equals_base_plus_correction(fmt, bias):
    layer, _, q, pack = make_layer(fmt=fmt, bias=bias)
    x = torch.randn(3, 1, 2048)
    sel = decdec.select_channels(x, 16, layer.selection.envelope)
    want = x @ q.dequantize().t() + decdec.residual_correction(x, sel, pack)
    if bias:
        want = want + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_full_mode_recovers_the_dequantized_residual_weight():
    layer, w, q, pack = make_layer(mode="full", k_chunk=0)
    x = torch.randn(1, 2048)
    want = x @ (q.dequantize() + decdec.dequantize_residual(pack)).t()
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    base_err = (x @ q.dequantize().t() - x @ w.t()).abs().mean()
    full_err = (layer(x) - x @ w.t()).abs().mean()
    assert full_err < base_err / 5


def test_prefill_skips_compensation_unless_decode_equivalent():
    layer, _, q, _ = make_layer()
    x = torch.randn(2, 5, 2048)
    torch.testing.assert_close(layer(x), x @ q.dequantize().t())
    layer.selection.compensate_prefill = True
    per_token = torch.stack([torch.cat([layer(x[b, t].reshape(1, 1, -1)) for t in range(5)], 1)[0]
                             for b in range(2)])
    torch.testing.assert_close(layer(x), per_token, rtol=1e-5, atol=1e-5)


def test_none_mode_and_k_chunk_zero_are_the_plain_quantized_layer():
    for mode, k in (("none", 16), ("decdec", 0)):
        layer, _, q, _ = make_layer(mode=mode, k_chunk=k)
        x = torch.randn(1, 1, 2048)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, q.dequantize()))


def test_group_selects_once_per_input_tensor():
    layer, *_ = make_layer()
    calls = []
    original = decdec.linear.select
    decdec.linear.select = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        x = torch.randn(1, 1, 2048)
        layer(x), layer(x)
        assert len(calls) == 1
        x.add_(1.0)  # an in-place change invalidates the cached selection
        layer(x)
        assert len(calls) == 2
    finally:
        decdec.linear.select = original


def test_scales_on_host_is_a_run_time_setting_off_by_default():
    """Where the CUDA path reads the residual scales: off (the GPU) by default, shown in the repr,
    part of what a captured decode step depends on; the reference path reads the same scales."""
    from decdec.generation import decdec_settings
    layer, *_ = make_layer()
    group = layer.selection
    assert group.scales_on_host is False and "scales_on_host=False" in repr(group)
    x = torch.randn(1, 1, 2048)
    out, settings = layer(x), decdec_settings([group])
    group.scales_on_host = True
    assert decdec_settings([group]) != settings
    assert torch.equal(layer(x), out)


def test_configure_validates():
    layer, *_ = make_layer()
    with pytest.raises(ValueError, match="k_chunk"):
        layer.selection.configure(k_chunk=2048)
    with pytest.raises(ValueError, match="unknown selection mode"):
        layer.selection.configure(mode="topk")
    no_calib = SelectionGroup("kind")
    with pytest.raises(ValueError, match="envelope"):
        no_calib.configure(mode="decdec", k_chunk=8)


def test_dtype_casts_keep_quantized_tensors_exact():
    layer, *_ = make_layer()
    scales = layer.q_scales.clone()
    env = layer.selection.envelope.clone()
    layer.to(torch.bfloat16)
    assert layer.q_scales.dtype == torch.float16 and torch.equal(layer.q_scales, scales)
    assert layer.selection.envelope.dtype == torch.float32 and torch.equal(layer.selection.envelope, env)
    assert layer(torch.randn(1, 2048, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bad_input_and_mismatched_residual():
    layer, *_ = make_layer()
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(1, 100))
    q = decdec.UniformWeight.quantize(torch.randn(8, 256), 4, 128)
    with pytest.raises(ValueError, match="residual"):
        DecDECLinear(q, None, decdec.quantize_residual(torch.randn(8, 128)))
