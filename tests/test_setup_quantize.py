"""decdec.quantizers: every method and bit width on tiny models, residuals, AWQ folding."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import decdec
from decdec import artifacts
from decdec.formats import UniformWeight
from decdec.patching import block_linears, find_decoder_blocks
from decdec.quantizers import build_cheatsheet, measure_thresholds, quantize_to_dir
from decdec.quantizers.awq import scaled_weight, search_clip
from decdec.quantizers.mixed import block_sensitivity, split_bits
from decdec.quantizers.pipeline import AWQ_SCALES
from decdec.quantizers.squeezellm import weighted_kmeans
from helpers import tiny_model

CALIB = {"source": "random-ids", "nsamples": 4, "seqlen": 32, "tokens": 128}


def prepare(model, out_dir, method, bits, group_size=32):
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    original = copy.deepcopy(model)
    qc = quantize_to_dir(model, None, "tiny", out_dir, method=method, bits=bits, group_size=group_size,
                         calib_ids=ids, device="cpu", settings={"method": method})
    build_cheatsheet(model, out_dir, "cpu")
    measure_thresholds(out_dir, ids, CALIB, "cpu")
    return qc, original, ids


def check_residuals(original, out_dir, qc):
    """cheatsheet == quantize_residual(W_orig (AWQ: scaled) - deq(Q)) for every linear."""
    tensors = artifacts.read_weights(out_dir)
    packs = artifacts.load_cheatsheet(out_dir / artifacts.CHEATSHEET, qc)
    scales = load_file(str(out_dir / AWQ_SCALES)) if qc["method"] == "awq" else {}
    name_, blocks = find_decoder_blocks(original)
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block).items():
            prefix = f"{name_}.{i}.{name}"
            meta = qc["layers"][i][name]
            parts = {k: tensors[f"{prefix}.{k}"] for k in ("packed", "scales", "zeros", "lut") if f"{prefix}.{k}" in tensors}
            q = decdec.formats.weight_from_tensors(parts, meta)
            w = scaled_weight(lin.weight, scales.get(f"{prefix}.in_scale"), scales.get(f"{prefix}.out_scale"))
            r = w - q.dequantize()
            expected = decdec.quantize_residual(r)
            assert torch.equal(packs[i][name].packed, expected.packed), prefix
            assert torch.equal(packs[i][name].scales, expected.scales), prefix
            approx = decdec.dequantize_residual(packs[i][name])
            assert (approx - r).norm() < 0.25 * r.norm(), prefix


@pytest.mark.parametrize("method,bits", [("rtn", 3), ("rtn", 4), ("rtn", 3.5), ("awq", 3), ("awq", 4), ("awq", 3.5),
                                         ("squeezellm", 3), ("squeezellm", 4), ("squeezellm", 3.5)])
def test_every_method_and_bit_width(tmp_path, method, bits):
    qc, original, ids = prepare(tiny_model("llama"), tmp_path, method, bits)
    assert qc["method"] == method and qc["bits"] == bits
    expected_bits = {3: [3, 3], 4: [4, 4]}.get(bits)
    assert qc["block_bits"] == expected_bits if expected_bits else sorted(qc["block_bits"]) == [3, 4]
    fmt = "lut" if method == "squeezellm" else "uniform"
    for i, layer in enumerate(qc["layers"]):
        assert {m["format"] for m in layer.values()} == {fmt}
        assert {m["bits"] for m in layer.values()} == {qc["block_bits"][i]}
    check_residuals(original, tmp_path, qc)
    model = decdec.load_prepared(tmp_path, mode="none")
    with torch.no_grad():
        ref = original(input_ids=ids).logits
        base = model(input_ids=ids).logits
        decdec.configure(model, mode="full", compensate_prefill=True)
        full = model(input_ids=ids).logits
    assert torch.isfinite(base).all()
    # compensating every channel brings the quantized model back close to the original
    assert (full - ref).norm() < 0.5 * (base - ref).norm()


def mha_phi3():
    """Phi-3 without grouped-query attention: o_proj's scale folds into the v rows of qkv_proj."""
    import transformers
    from helpers import TINY
    config = transformers.Phi3Config(**{**TINY, "num_key_value_heads": TINY["num_attention_heads"]}, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "phi3-mha"])
def test_awq_folding_keeps_the_function(tmp_path, arch):
    """The scaled weights with the folded norms and biases compute what the original computes."""
    model = mha_phi3() if arch == "phi3-mha" else tiny_model(arch)
    qc, original, ids = prepare(model, tmp_path, "awq", 3)
    folds = qc["extra"]["awq_folds"]
    assert folds["down_proj"] is not None
    assert (folds["o_proj"] == "self_attn.qkv_proj[128:]") == (arch == "phi3-mha")
    scales = load_file(str(tmp_path / AWQ_SCALES))
    assert scales, "AWQ found no scale to fold"
    folded = copy.deepcopy(original)
    stored = artifacts.read_weights(tmp_path)
    name_, blocks = find_decoder_blocks(folded)
    state = {k: v for k, v in stored.items() if k in folded.state_dict()}
    folded.load_state_dict(state, strict=False)  # norms and biases as stored
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block).items():
            p = f"{name_}.{i}.{name}"
            lin.weight.data = scaled_weight(lin.weight, scales.get(f"{p}.in_scale"), scales.get(f"{p}.out_scale"))
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
    check_residuals(original, tmp_path, qc)


def test_awq_beats_rtn_on_output_error(tmp_path):
    """Same bits and groups: AWQ's quantized block outputs are closer to the original than RTN's."""
    errors = {}
    for method in ("rtn", "awq"):
        model = tiny_model("llama")
        out = tmp_path / method
        ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
        original = copy.deepcopy(model)
        quantize_to_dir(model, None, "tiny", out, method=method, bits=3, group_size=32, calib_ids=ids,
                        device="cpu", settings={})
        q = decdec.load_prepared(out, mode="none", cheatsheet=False, thresholds=False)
        with torch.no_grad():
            errors[method] = decdec.metrics.kl_divergence(original(input_ids=ids).logits,
                                                          q(input_ids=ids).logits).mean().item()
    assert errors["awq"] < errors["rtn"]


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(200, 64) * torch.linspace(0.1, 3, 64)
    h = x.t() @ x
    clip = search_clip(w, h, 3, 32)
    err = lambda w_hat: ((w_hat - w) @ h * (w_hat - w)).sum()  # noqa: E731
    assert err(UniformWeight.fake_quantize(w, 3, 32, clip=clip)) <= err(UniformWeight.fake_quantize(w, 3, 32))


def test_fake_quantize_matches_quantize():
    w = torch.randn(12, 100)
    clip = torch.rand(12, 4)
    torch.testing.assert_close(UniformWeight.fake_quantize(w, 3, 32, clip=clip),
                               UniformWeight.quantize(w, 3, 32, clip=clip).dequantize(), rtol=0, atol=0)


def test_weighted_kmeans_follows_the_weights():
    w = torch.tensor([[0.0, 0.1, 1.0, 1.1, 5.0, 5.2, 9.0, 9.4]])
    heavy = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0, 1.0]])
    c = weighted_kmeans(w, heavy, 4)
    assert c.shape == (1, 4)
    # the heavy weight pulls its centroid towards 9.0
    top = c.max()
    assert abs(float(top) - 9.0) < abs(float(top) - 9.2)
    # unweighted, the same cluster sits at the middle
    assert abs(float(weighted_kmeans(w, torch.ones_like(w), 4).max()) - 9.2) < 1e-5


def test_sensitivity_probe_and_split():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (2, 16))
    scores = block_sensitivity(model, ids, 32, "cpu")
    assert len(scores) == 2 and all(s > 0 for s in scores)
    # the skip of earlier blocks restores the model: a plain forward still matches a fresh copy
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)
    assert split_bits([0.3, 0.1, 0.2, 0.4, 0.0]) == [4, 3, 4, 4, 3]


def test_starting_at_a_later_block_reproduces_the_model():
    from decdec.quantizers.mixed import _start_at_block
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    ids = torch.randint(0, 300, (1, 16))
    seen = []
    handle = blocks[1].register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else
                                                                                        kwargs["hidden_states"]),
                                                 with_kwargs=True)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        handle.remove()
        with _start_at_block(blocks, 1, seen[0], tuple_output=False):
            again = model(input_ids=ids).logits
        perturbed = seen[0] + 1.0
        with _start_at_block(blocks, 1, perturbed, tuple_output=False):
            moved = model(input_ids=ids).logits
    torch.testing.assert_close(again, ref)
    assert not torch.allclose(moved, ref)
