"""decdec.batched and decdec.recall: the batched decode-equivalent path selects exactly the
reference's channels, corrects like the reference, and gives the logits of token-by-token decoding."""
import json
from pathlib import Path

import pytest
import torch

import decdec
from decdec import ops
from decdec.batched import fast_residual_correction, fast_select, residual_rows, use_batched_compensation
from decdec.generation import cache_kwarg
from decdec.recall import RecallMeter, selection_recall
from decdec.residual import residual_correction
from helpers import load_script, prepare_by_hand, tiny_model

MODES = ["decdec", "exact", "exact-global", "random", "static"]


def awkward_input(d: int) -> torch.Tensor:
    """Activations with NaNs, a NaN row, zeros, exact ties and infinities."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 23, d, generator=g) * torch.rand(d, generator=g) * 3
    x[0, 0, :5] = float("nan")
    x[1, 2] = float("nan")
    x[1, 3] = 0.0
    x[0, 4, 3:40] = 1.0
    x[0, 5] = x[0, 5].round()
    x[1, 6, 7] = float("inf")
    x[1, 6, 9] = -float("inf")
    return x


@pytest.mark.parametrize("d", [64, 100, 1024, 1536, 2500])
@pytest.mark.parametrize("k_chunk", [0, 1, 7, 64, 700, 1024])
@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_fast_select_equals_reference(d, k_chunk, cpu_kernel, monkeypatch):
    if cpu_kernel and not ops.cpu_selection_available():
        pytest.skip("decdec._cpu is not built")
    monkeypatch.setattr(ops, "cpu_selection_available", lambda: cpu_kernel)  # False: the torch path
    x = awkward_input(d)
    env = decdec.rank_envelope(torch.randn(40, d) * 1.5)
    mean_sq = torch.rand(d)
    for mode in MODES:
        g_ref, g_fast = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ref = decdec.select(mode, x, k_chunk, env, mean_sq, generator=g_ref)
        fast = fast_select(mode, x, k_chunk, env, mean_sq, generator=g_fast)
        assert torch.equal(ref, fast), (mode, d, k_chunk)


@pytest.mark.parametrize("envelope", ["zeros", "flat", "bf16"])
def test_fast_select_degenerate_envelopes(envelope):
    d = 300
    x = awkward_input(d)
    env = {"zeros": torch.zeros(d), "flat": torch.ones(d),
           "bf16": decdec.rank_envelope(torch.randn(40, d))}[envelope]
    if envelope == "bf16":
        x = x.to(torch.bfloat16)  # comparisons in fp32 of the converted activations
    for k_chunk in (3, 40, 500):
        assert torch.equal(decdec.select_channels(x, k_chunk, env), fast_select("decdec", x, k_chunk, env))


@pytest.mark.parametrize("k_chunk", [8, 64, 300, 1024])
def test_fast_correction_equals_reference(k_chunk):
    torch.manual_seed(1)
    d, out_f = 1100, 70
    pack = decdec.quantize_residual(torch.randn(out_f, d) * 0.02)
    x = torch.randn(3, 9, d)
    channels = decdec.select_exact(x, k_chunk)
    ref = residual_correction(x, channels, pack)
    fast = fast_residual_correction(x, channels, residual_rows(pack, "cpu"))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_eval")
    prepare_by_hand(tiny_model("llama"), out, bits=3, group_size=32)
    return out


def decode_token_by_token(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of real decoding: one token per step on a KV cache, so every step is a one-token
    input that the reference path compensates."""
    from transformers import DynamicCache
    logits, cache = [], DynamicCache(config=model.config)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits.append(model(input_ids=ids[:, t:t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("mode,k_chunk", [("decdec", 128), ("exact", 200), ("full", 0)])
def test_batched_decode_equivalent_equals_token_loop(prepared_tiny, mode, k_chunk):
    model = decdec.load_prepared(prepared_tiny, mode=mode, k_chunk=k_chunk, compensate_prefill=True)
    assert use_batched_compensation(model) == 2 * 7
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = model(input_ids=ids).logits
    looped = decode_token_by_token(model, ids)
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-4)
    # and compensation matters here: the uncompensated model differs
    decdec.configure(model, mode="none")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert (plain - looped).abs().max() > 1e-2


def test_batched_equals_reference_path(prepared_tiny):
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    ref = decdec.load_prepared(prepared_tiny, mode="decdec", k_chunk=128, compensate_prefill=True)
    fast = decdec.load_prepared(prepared_tiny, mode="decdec", k_chunk=128, compensate_prefill=True)
    use_batched_compensation(fast)
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_batched_prefill_without_compensate_prefill_is_plain(prepared_tiny):
    model = decdec.load_prepared(prepared_tiny, mode="decdec", k_chunk=128, compensate_prefill=False)
    plain = decdec.load_prepared(prepared_tiny, mode="none")
    use_batched_compensation(model)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_selection_recall_counts_overlap():
    selected = torch.tensor([[0, 1, 2], [3, 4, 5]])
    exact = torch.tensor([[0, 1, 9], [6, 7, 8]])
    assert selection_recall(selected, exact, 10) == (2, 6)
    assert selection_recall(torch.empty(2, 0, dtype=torch.long), torch.empty(2, 0, dtype=torch.long), 10) == (0, 0)


def test_recall_meter_per_kind(prepared_tiny):
    model = decdec.load_prepared(prepared_tiny, compensate_prefill=True)
    use_batched_compensation(model)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    recalls = {}
    for mode in ("exact", "decdec", "random"):
        decdec.configure(model, mode=mode, k_chunk=128)
        with RecallMeter(model) as meter, torch.no_grad():
            model(input_ids=ids)
        recalls[mode] = meter.recall()
    assert set(recalls["exact"]) == {"q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj", "all"}
    assert all(v == 1.0 for v in recalls["exact"].values())
    assert recalls["random"]["all"] < recalls["decdec"]["all"] <= 1.0
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks  # detached on exit


@pytest.mark.parametrize("exact", [True, False])
def test_gpu_and_cpu_segment_methods_agree(exact):
    """The GPU's segment selection (sort for exact top-k, bucket counts for DecDEC; run here on the
    CPU) takes the same channels as the CPU's top-k, ties and NaN scores included."""
    from decdec.batched import _abs_score, _take_segment, bucket_bounds
    x = awkward_input(576).reshape(-1, 1, 576)
    x[0, 0, :40] = 0.5  # a wide tie
    score = _abs_score(x)
    bounds = None if exact else bucket_bounds(decdec.rank_envelope(torch.randn(40, 576)), 20, "cpu")
    for quota in (1, 20, 300):
        by_topk = _take_segment(score, quota, bounds, gpu_method=False).sort(-1).values
        gpu = _take_segment(score, quota, bounds, gpu_method=True).sort(-1).values
        assert torch.equal(by_topk, gpu), quota


def test_bench_compensation_cli(tmp_path):
    bench = load_script(Path(__file__).resolve().parents[1] / "evaluation" / "bench_compensation.py")
    out = tmp_path / "cost.json"
    records = bench.main(["--device", "cpu", "--batch", "1", "--seqlen", "32", "--repeats", "1",
                          "--mode", "decdec", "full", "--k-chunk", "8", "--json", str(out)])
    assert [(r["mode"], r["k_chunk"]) for r in records] == [("none", 0), ("decdec", 8), ("full", 0)]
    assert records[0]["ratio"] == 1.0 and all(r["ms_per_block"] > 0 for r in records)
    assert json.loads(out.read_text()) == records
