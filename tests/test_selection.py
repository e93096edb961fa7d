"""The selection semantics of DESIGN.md, checked against a literal per-token re-statement."""
import numpy as np
import pytest
import torch

import decdec
from decdec.selection import bucket_edges, chunk_quotas


def literal_select(x: np.ndarray, k_chunk: int, env: np.ndarray, C: int = 1024) -> list[int]:
    """DESIGN.md's selection for one token, written as plainly as possible (numpy float32)."""
    d = len(x)
    quotas = [k_chunk if start + C <= d else k_chunk * (d - start) // C for start in range(0, d, C)]
    k = sum(quotas)
    if k == 0:
        return []
    f32 = np.float32
    b_hi, b_lo = f32(env[0]), f32(env[k - 1])
    edges = [f32(b_hi - f32(f32(b_hi - b_lo) * f32(i)) / f32(15)) for i in range(16)]
    edges += [f32(f32(b_lo * f32(31 - i)) / f32(16)) for i in range(16, 32)]
    a = np.abs(x.astype(np.float32))
    chosen = []
    for c, start in enumerate(range(0, d, C)):
        idx = range(start, min(start + C, d))
        buckets = {}
        for j in idx:
            b = next((i for i in range(32) if a[j] >= edges[i]), 32)  # NaN matches nothing
            buckets.setdefault(b, []).append(j)
        left = quotas[c]
        for b in sorted(buckets):
            take = buckets[b][:left]  # indices are ascending: the lowest ones first
            chosen += take
            left -= len(take)
    return sorted(chosen)


def test_chunk_quotas_partial_last_chunk():
    assert chunk_quotas(2500, 8) == [8, 8, 3]  # floor(8 * 452 / 1024) = 3
    assert chunk_quotas(576, 64) == [36]
    assert chunk_quotas(576, 1) == [0]
    assert chunk_quotas(4096, 0) == [0, 0, 0, 0]
    assert chunk_quotas(4096, 1024) == [1024] * 4
    for bad in (-1, 1025):
        with pytest.raises(ValueError, match="k_chunk"):
            chunk_quotas(4096, bad)


def test_bucket_edges_follow_the_formula():
    e = bucket_edges(torch.tensor(3.0), torch.tensor(0.7)).numpy()
    assert e.dtype == np.float32 and e.shape == (32,)
    assert e[0] == np.float32(3.0)
    assert e[15] == pytest.approx(0.7, rel=1e-6)
    assert e[16] == np.float32(np.float32(0.7) * 15) / np.float32(16)
    assert e[31] == 0
    assert np.all(np.diff(e) <= 0)


@pytest.mark.parametrize("d,k_chunk", [(4096, 8), (2500, 16), (576, 64), (1024, 1), (3000, 1024), (700, 0),
                                       (1536, 3)])
def test_select_channels_matches_literal_rule(d, k_chunk):
    g = torch.Generator().manual_seed(d + k_chunk)
    calib = torch.randn(64, d, generator=g)
    env = decdec.rank_envelope(calib)
    x = torch.randn(5, d, generator=g) * 1.5  # some values beyond the calibration maximum
    x[0, :50] = 0.0  # zeros
    x[1, 10:20] = x[1, 5]  # ties
    x[2, ::7] = float("nan")  # NaN counts as the smallest value
    x[3] = x[3].round()  # many ties across buckets
    sel = decdec.select_channels(x, k_chunk, env)
    assert sel.dtype == torch.int64 and sel.shape == (5, decdec.num_selected(d, k_chunk))
    for t in range(5):
        assert sel[t].tolist() == literal_select(x[t].numpy(), k_chunk, env.numpy())


def test_select_channels_keeps_leading_shape_and_dtypes():
    env = decdec.rank_envelope(torch.randn(32, 2048))
    x = torch.randn(2, 3, 2048, dtype=torch.float16)
    sel = decdec.select_channels(x, 16, env)
    assert sel.shape == (2, 3, 32)
    flat = decdec.select_channels(x.reshape(6, 2048), 16, env)
    assert torch.equal(sel.reshape(6, 32), flat)
    assert torch.all(sel[..., 1:] > sel[..., :-1])  # ascending, no repeats


def test_select_channels_rejects_bad_input():
    env = decdec.rank_envelope(torch.randn(8, 512))
    with pytest.raises(ValueError, match="envelope"):
        decdec.select_channels(torch.randn(2, 256), 8, env)
    with pytest.raises(ValueError, match="k_chunk"):
        decdec.select_channels(torch.randn(2, 512), 2000, env)
    with pytest.raises(ValueError, match="floating"):
        decdec.select_channels(torch.ones(2, 512, dtype=torch.int32), 8, env)


def test_nan_is_taken_last():
    env = torch.ones(1024)
    x = torch.full((1, 1024), float("nan"))
    x[0, 100] = 0.0
    sel = decdec.select_channels(x, 2, env)
    assert sel[0].tolist() == [0, 100]  # the zero first, then the lowest-index NaN
    assert decdec.select_exact(x, 2)[0].tolist() == [0, 100]


def test_rank_envelope_definition():
    acts = torch.tensor([[3.0, -1.0, 0.5], [0.2, -4.0, 2.0]])
    assert decdec.rank_envelope(acts).tolist() == [4.0, 2.0, 0.5]
    with pytest.raises(ValueError):
        decdec.rank_envelope(torch.randn(3))


def test_exact_topk_per_chunk_and_global():
    x = torch.randn(4, 2048)
    per_chunk = decdec.select_exact(x, 8)
    for t in range(4):
        for c in range(2):
            chunk = x[t, c * 1024:(c + 1) * 1024].abs()
            want = set((chunk.topk(8).indices + c * 1024).tolist())
            got = {i for i in per_chunk[t].tolist() if c * 1024 <= i < (c + 1) * 1024}
            assert got == want
    glob = decdec.select_exact(x, 8, per_chunk=False)
    for t in range(4):
        assert set(glob[t].tolist()) == set(x[t].abs().topk(16).indices.tolist())


def test_exact_ties_take_lowest_index():
    x = torch.ones(1, 1024)
    assert decdec.select_exact(x, 4)[0].tolist() == [0, 1, 2, 3]


def test_approximate_selection_recalls_most_of_exact_topk():
    calib = torch.randn(256, 4096) * torch.linspace(0.2, 3, 4096)
    env = decdec.rank_envelope(calib)
    x = torch.randn(64, 4096) * torch.linspace(0.2, 3, 4096)
    approx, exact = decdec.select_channels(x, 32, env), decdec.select_exact(x, 32)
    recall = np.mean([len(set(a.tolist()) & set(e.tolist())) / e.numel() for a, e in zip(approx, exact)])
    assert recall > 0.8


def test_static_random_full():
    x = torch.randn(3, 2500)
    mean_sq = torch.rand(2500)
    static = decdec.select_static(x, 8, mean_sq)
    assert static.shape == (3, 19) and torch.equal(static[0], static[2])
    assert set(static[0].tolist()) >= {int(mean_sq[:1024].argmax())}
    rnd = decdec.select_random(x, 8, generator=torch.Generator().manual_seed(1))
    assert rnd.shape == (3, 19)
    counts = [(rnd[0] // 1024 == c).sum().item() for c in range(3)]
    assert counts == chunk_quotas(2500, 8)
    assert not torch.equal(rnd[0], rnd[1])
    assert decdec.select_full(x).shape == (3, 2500)
    assert decdec.select("none", x, 8) is None
    with pytest.raises(ValueError, match="unknown selection mode"):
        decdec.select("bogus", x, 8)
    with pytest.raises(ValueError, match="envelope"):
        decdec.select("decdec", x, 8)
