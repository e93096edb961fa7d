"""GPU tests of the decode-attention kernel against its fp32 definition (skipped without CUDA +
decdec._C): fresh random inputs, output poisoned before each run, head sizes and groups of real
models, masks, garbage under the mask, strided (windowed) caches, many splits, counters left at zero,
bitwise repeats, graph capture; and a model's decode steps with the kernel against SDPA."""
import pytest
import torch

import decdec
from decdec import ops
from decdec.attention import counters, decode_attention_reference
from decdec.generation import DecodeSession
from decdec.synthetic import write_synthetic_model

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def run_kernel(q, k, v, mask, scale):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    poison = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)  # the output's block
    del poison
    out = ops.decode_attention(q, k, v, mask, scale, counters(DEV))
    torch.cuda.synchronize()
    assert counters(DEV).count_nonzero() == 0, "the kernel left a counter set"
    return out


def inputs(batch, heads, kv_heads, head_dim, positions, dtype, seed, cache=None):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, device=DEV, dtype=dtype, generator=gen)
    cache = cache or positions
    k, v = (torch.randn(batch, kv_heads, cache, head_dim, device=DEV, dtype=dtype, generator=gen)[:, :, :positions]
            for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (9, 3, 64), (8, 1, 256), (32, 32, 96),
                                                       (16, 1, 80), (4, 2, 16),
                                                       (16, 1, 256)])  # > 48 KB of shared memory
def test_matches_reference(dtype, heads, kv_heads, head_dim):
    for batch, positions in ((1, 1), (1, 300), (3, 64), (1, 5000), (2, 777)):
        q, k, v = inputs(batch, heads, kv_heads, head_dim, positions, dtype, seed=positions + head_dim)
        for mask in (None, "prefix", "random"):
            m = None
            if mask == "prefix":  # a static cache written up to some position
                m = torch.arange(positions, device=DEV)[None, :] < torch.tensor([[positions // 2 + 1]], device=DEV)
                m = m.expand(batch, positions).contiguous()
            elif mask == "random":
                m = torch.rand(batch, positions, device=DEV) < 0.3
                m[:, -1] = True
            out = run_kernel(q, k, v, m, head_dim ** -0.5)
            ref = decode_attention_reference(q, k, v, m, head_dim ** -0.5)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert not out.isnan().any() and err < TOL[dtype], (batch, positions, mask, err)


def test_strided_cache_and_query():
    """A window of a longer cache (strided positions) and a query that is a view of [B, 1, H, D]."""
    q4 = torch.randn(2, 1, 32, 128, device=DEV, dtype=torch.float16).transpose(1, 2)  # [B, H, 1, D] view
    q = q4[:, :, 0]
    _, k, v = inputs(2, 32, 8, 128, 512, torch.float16, seed=3, cache=2048)
    assert not k.is_contiguous()
    mask = torch.ones(2, 512, dtype=torch.bool, device=DEV)
    mask[0, 300:] = False
    out = run_kernel(q, k, v, mask, 0.088)
    ref = decode_attention_reference(q, k, v, mask, 0.088)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-3)


def test_fully_masked_sequence_gives_zeros():
    q, k, v = inputs(2, 8, 2, 64, 4000, torch.float16, seed=4)
    mask = torch.zeros(2, 4000, dtype=torch.bool, device=DEV)
    mask[0, 17] = True
    out = run_kernel(q, k, v, mask, 0.125)
    assert out[1].abs().max() == 0
    torch.testing.assert_close(out[0].float(), v[0, :, 17].float().repeat_interleave(4, 0), rtol=0, atol=1e-3)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
@pytest.mark.parametrize("positions", [40, 300, 5000])
def test_masked_positions_may_hold_anything(garbage, positions):
    """Unwritten cache slots hold whatever was there (the kernel reads a block's first tile before
    its mask): NaN or inf under the mask must not reach the output."""
    q, k, v = inputs(2, 32, 8, 128, positions, torch.float16, seed=positions)
    mask = torch.rand(2, positions, device=DEV) < 0.5
    mask[:, 0] = True
    hidden = ~mask[:, None, :, None]
    out = run_kernel(q, k.masked_fill(hidden, garbage), v.masked_fill(hidden, garbage), mask, 0.088)
    ref = decode_attention_reference(q, k, v, mask, 0.088)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-3)


def test_repeats_are_bitwise_identical_and_graphs_replay():
    q, k, v = inputs(1, 32, 8, 128, 9000, torch.bfloat16, seed=5)
    mask = torch.rand(1, 9000, device=DEV) < 0.9
    first = run_kernel(q, k, v, mask, 0.1)
    for _ in range(100):
        assert torch.equal(ops.decode_attention(q, k, v, mask, 0.1, counters(DEV)), first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, k, v, mask, 0.1, counters(DEV))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), decode_attention_reference(q, k, v, mask, 0.1).float(), rtol=0, atol=1e-2)
    assert counters(DEV).count_nonzero() == 0


def test_bad_arguments_raise():
    q, k, v = inputs(1, 8, 2, 64, 10, torch.float16, seed=6)
    work = counters(DEV)
    with pytest.raises(TypeError, match="differs"):
        ops.decode_attention(q, k.float(), v, None, 1.0, work)
    with pytest.raises(RuntimeError, match="whole group"):
        ops.decode_attention(q[:, :7], k, v, None, 1.0, work)
    with pytest.raises(RuntimeError, match="mask must be"):
        ops.decode_attention(q, k, v, torch.ones(1, 11, dtype=torch.bool, device=DEV), 1.0, work)
    with pytest.raises(TypeError, match="bool"):
        ops.decode_attention(q, k, v, torch.ones(1, 10, device=DEV), 1.0, work)
    with pytest.raises(RuntimeError, match="head_dim"):
        big = torch.randn(1, 2, 10, 320, device=DEV, dtype=torch.float16)
        ops.decode_attention(torch.randn(1, 8, 320, device=DEV, dtype=torch.float16), big, big, None, 1.0, work)


def test_model_decode_steps_match_sdpa(tmp_path):
    write_synthetic_model(tmp_path, "tiny", bits=3)
    model = decdec.load_prepared(tmp_path, "cuda", mode="none")
    prompt = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    logits = []
    for use_kernel in (True, False):
        session = DecodeSession(model, 96, cuda_graph=True, window_base=32, decode_attention=use_kernel)
        tokens = session.generate(prompt, 60).tokens if use_kernel else tokens
        session.prefill(prompt)
        logits.append(torch.stack([session.step(torch.tensor([[t]], device=DEV)).float().clone() for t in tokens]))
        assert session.graph_error is None and session.graphs_captured == 3
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-2, atol=1e-2)
