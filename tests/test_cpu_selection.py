"""The CPU selection kernel (decdec._cpu) against the reference selection, bit for bit, on fresh
random inputs; skipped where the kernel is not built (it is optional)."""
from __future__ import annotations

import pytest
import torch

from decdec import ops
from decdec.batched import fast_select
from decdec.selection import rank_envelope, select_channels
from helpers import special_inputs

pytestmark = pytest.mark.skipif(not ops.cpu_selection_available(), reason="decdec._cpu is not built")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [5, 576, 1024, 1536, 2600])
def test_selection_identical_to_reference(dtype, d):
    torch.manual_seed(d)
    env = rank_envelope(torch.randn(64, d) * torch.rand(d) * 3)
    x = special_inputs(37, d, env, dtype)  # ties, zeros, NaN, beyond the envelope, on the edges
    for k_chunk in (0, 1, 3, 8, 64, 500, 1023, 1024):
        got = ops.select_channels(x, env, k_chunk)
        assert torch.equal(got, select_channels(x, k_chunk, env)), (d, k_chunk)


@pytest.mark.parametrize("env", [torch.zeros(1500), torch.full((1500,), 0.5), torch.linspace(3, 0, 1500),
                                 torch.full((1500,), float("nan"))])
def test_selection_with_degenerate_envelopes(env):
    x = torch.randn(4, 1500)
    x[1, ::3] = float("nan")
    x[2] = float("nan")  # a quota of 1 from a chunk without a number: the first channel
    for k_chunk in (1, 16, 1024):
        assert torch.equal(ops.select_channels(x, env, k_chunk), select_channels(x, k_chunk, env))


def test_fast_select_uses_it_with_the_same_result():
    torch.manual_seed(0)
    env = rank_envelope(torch.randn(64, 900) * 2)
    x = torch.randn(2, 300, 900)
    assert torch.equal(fast_select("decdec", x, 16, env), select_channels(x, 16, env))


def test_bad_input_raises():
    env = torch.rand(64)
    with pytest.raises(RuntimeError, match="k_chunk"):
        ops.select_channels(torch.randn(2, 64), env, 2000)
    with pytest.raises(RuntimeError, match="envelope"):
        ops.select_channels(torch.randn(2, 64), torch.rand(63), 8)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.select_channels(torch.randn(64, 2).t(), env, 8)
    with pytest.raises(TypeError, match="float32"):
        ops.select_channels(torch.randn(2, 64).double(), env, 8)
