"""Structural patching of several architectures and the prepared-directory round trip."""
import pytest
import torch

import decdec
from helpers import prepare_by_hand, tiny_model

EXPECTED_KINDS = {
    "llama": ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"],
    "qwen2": ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gemma": ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_KINDS))
def test_linear_groups_found_structurally(arch):
    model = tiny_model(arch)
    groups = decdec.discover_linear_groups(model)
    assert [decdec.kind_name(g) for g in groups] == EXPECTED_KINDS[arch]
    name, blocks = decdec.find_decoder_blocks(model)
    assert name == "model.layers" and len(blocks) == 2


@pytest.mark.parametrize("arch,fmt", [("llama", "uniform"), ("qwen2", "lut"), ("phi3", "uniform")])
def test_prepared_directory_round_trip(tmp_path, arch, fmt):
    model = tiny_model(arch)
    prepare_by_hand(model, tmp_path, bits=4, fmt=fmt)
    loaded = decdec.load_prepared(tmp_path, mode="none")
    assert len(decdec.decdec_linears(loaded)) == 2 * (7 if arch != "phi3" else 4)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    # 4-bit weights: close to the original but not equal to it
    assert 0 < (ref - got).abs().max() < 0.5 * ref.abs().max()
    decdec.configure(loaded, mode="full", compensate_prefill=True)
    with torch.no_grad():
        full = loaded(ids).logits
    assert (ref - full).abs().max() < (ref - got).abs().max()


def test_modes_share_one_selection_group_per_input(tmp_path):
    prepare_by_hand(tiny_model("llama"), tmp_path)
    loaded = decdec.load_prepared(tmp_path, k_chunk=8)
    attn = loaded.model.layers[0].self_attn
    assert attn.q_proj.selection is attn.k_proj.selection is attn.v_proj.selection
    assert attn.o_proj.selection is not attn.q_proj.selection
    groups = decdec.selection_groups(loaded)
    assert len(groups) == 8 and all(g.mode == "decdec" and g.k_chunk == 8 for g in groups)
    decdec.configure(loaded, k_chunk={"down_proj": 32})
    assert loaded.model.layers[1].mlp.down_proj.selection.k_chunk == 32
    assert loaded.model.layers[1].mlp.up_proj.selection.k_chunk == 8


def test_generate_on_patched_model(tmp_path):
    prepare_by_hand(tiny_model("qwen2"), tmp_path)
    loaded = decdec.load_prepared(tmp_path, k_chunk=16)
    out = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)


def test_without_artifacts_only_plain_quantized(tmp_path):
    prepare_by_hand(tiny_model("llama"), tmp_path, cheatsheet=False, thresholds=False)
    loaded = decdec.load_prepared(tmp_path)
    assert all(g.mode == "none" for g in decdec.selection_groups(loaded))
    with pytest.raises(ValueError, match="envelope"):
        decdec.configure(loaded, mode="decdec", k_chunk=8)


def test_stories260k_real_model(tmp_path, data_dir):
    from decdec.resolve import load_original
    model, tok, _ = load_original("stories260k", data_dir=data_dir)
    assert [decdec.kind_name(g) for g in decdec.discover_linear_groups(model)] == EXPECTED_KINDS["llama"]
    prepare_by_hand(model, tmp_path, bits=4, group_size=32, tokenizer=tok)
    loaded = decdec.load_prepared(tmp_path, k_chunk=64)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    text = tok.decode(loaded.generate(ids, max_new_tokens=20, do_sample=False)[0])
    assert text.startswith(tok.decode(ids[0])) and len(text) > 30
