"""Artifact validation: every mismatch is refused with the file, the field, expected and found."""
import argparse
import json
import shutil

import pytest
import torch

import decdec
from decdec import artifacts
from decdec.artifacts import ArtifactError
from helpers import prepare_by_hand, tiny_model


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = tmp_path_factory.mktemp("prepared")
    prepare_by_hand(tiny_model("llama"), path)
    return path


def copy(prepared, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(prepared, dst)
    return dst


def test_files_and_headers(prepared):
    names = {p.name for p in prepared.iterdir()}
    assert {"config.json", "quant_config.json", "model.safetensors", "cheatsheet.pt", "thresholds.pt"} <= names
    qc = artifacts.read_quant_config(prepared)
    assert qc["format"] == "decdec-quantized-model" and qc["version"] == 1
    assert qc["model"]["architecture"] == "LlamaForCausalLM" and len(qc["layers"]) == 2
    sheet = torch.load(prepared / "cheatsheet.pt", weights_only=True)
    assert sheet["format"] == "decdec-cheatsheet" and sheet["quant_id"] == qc["quant_id"]
    pack = sheet["blocks"][0]["self_attn.q_proj"]
    assert pack["packed"].dtype == torch.uint8 and pack["packed"].shape == (64, 32)
    thr = torch.load(prepared / "thresholds.pt", weights_only=True)
    assert set(thr["blocks"][1]) == {"q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"}


def test_cheatsheet_of_other_weights_is_refused(prepared, tmp_path):
    other = tmp_path / "other"
    prepare_by_hand(tiny_model("llama"), other, thresholds=False)
    dst = copy(prepared, tmp_path)
    shutil.copy(other / "cheatsheet.pt", dst / "cheatsheet.pt")
    with pytest.raises(ArtifactError, match=r"cheatsheet.pt: field 'quant_id'") as e:
        decdec.load_prepared(dst)
    assert e.value.expected == artifacts.read_quant_config(dst)["quant_id"]


def test_cheatsheet_of_another_model_is_refused(prepared, tmp_path):
    other = tmp_path / "other"
    prepare_by_hand(tiny_model("qwen2"), other, thresholds=False)
    dst = copy(prepared, tmp_path)
    shutil.copy(other / "cheatsheet.pt", dst / "cheatsheet.pt")
    with pytest.raises(ArtifactError, match="model.architecture"):
        decdec.load_prepared(dst)


def test_missing_layer_and_wrong_shape(prepared, tmp_path):
    dst = copy(prepared, tmp_path)
    sheet = torch.load(dst / "cheatsheet.pt", weights_only=True)
    del sheet["blocks"][1]["mlp.down_proj"]
    torch.save(sheet, dst / "cheatsheet.pt")
    with pytest.raises(ArtifactError, match=r"blocks\[1\].mlp.down_proj.*missing"):
        decdec.load_prepared(dst)
    sheet = torch.load(prepared / "cheatsheet.pt", weights_only=True)
    sheet["blocks"][0]["self_attn.o_proj"]["scales"] = torch.zeros(10, dtype=torch.float16)
    torch.save(sheet, dst / "cheatsheet.pt")
    with pytest.raises(ArtifactError, match=r"blocks\[0\].self_attn.o_proj.shape"):
        decdec.load_prepared(dst)


def test_thresholds_shape_and_version(prepared, tmp_path):
    dst = copy(prepared, tmp_path)
    thr = torch.load(dst / "thresholds.pt", weights_only=True)
    thr["blocks"][0]["o_proj"]["envelope"] = torch.zeros(3)
    torch.save(thr, dst / "thresholds.pt")
    with pytest.raises(ArtifactError, match=r"thresholds.pt: field 'blocks\[0\].o_proj.envelope.shape'"):
        decdec.load_prepared(dst)
    thr["version"] = 99
    torch.save(thr, dst / "thresholds.pt")
    with pytest.raises(ArtifactError, match="'version': expected 1, found 99"):
        decdec.load_prepared(dst)


def test_wrong_bits_in_quant_config(prepared, tmp_path):
    dst = copy(prepared, tmp_path)
    qc = json.loads((dst / "quant_config.json").read_text())
    qc["layers"][0]["self_attn.q_proj"]["bits"] = 4  # the packed rows hold 3-bit codes
    (dst / "quant_config.json").write_text(json.dumps(qc))
    with pytest.raises(ValueError, match="packed"):
        decdec.load_prepared(dst)


def test_not_a_prepared_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared model directory"):
        decdec.load_prepared(tmp_path)


def test_pickles_are_refused(prepared, tmp_path):
    dst = copy(prepared, tmp_path)
    torch.save({"format": "decdec-cheatsheet", "payload": argparse.Namespace(code="x")}, dst / "cheatsheet.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        decdec.load_prepared(dst)


def test_tuned_config_is_read_and_overridden(prepared, tmp_path):
    dst = copy(prepared, tmp_path)
    qc = artifacts.read_quant_config(dst)
    kinds = {k: {"n_tb": 4, "k_chunk": 8} for k in ("q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj")}
    kinds["down_proj"] = {"n_tb": 8, "k_chunk": 16}
    artifacts.save_tuning_config(dst, qc, kinds, {"target_slowdown": 2.5})
    loaded = decdec.load_prepared(dst)
    down = loaded.model.layers[0].mlp.down_proj.selection
    assert (down.k_chunk, down.n_tb) == (16, 8)
    assert decdec.load_prepared(dst, k_chunk=0).model.layers[0].mlp.down_proj.selection.k_chunk == 0
    del kinds["o_proj"]
    artifacts.save_tuning_config(dst, qc, kinds, {})
    with pytest.raises(ArtifactError, match="kinds.o_proj"):
        decdec.load_prepared(dst)


def test_tuned_config_from_another_gpu_is_flagged(monkeypatch):
    """n_tb and k_chunk were timed on one GPU: another GPU, an analytic estimate or the other kind of
    kernel launch gets a reason (configure warns with it); the CPU's reference path and configs
    without the record get none."""
    from decdec import prepared
    monkeypatch.setattr(prepared, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(prepared.ops, "dependent_launch", lambda: True)
    flagged = prepared.tuned_elsewhere
    assert flagged({"gpu": "NVIDIA H200", "dependent_launch": True}, "cuda") is None
    assert flagged({"gpu": "NVIDIA H200"}, "cuda") is None
    assert flagged({}, "cuda") is None
    assert flagged({"gpu": "NVIDIA H100 PCIe"}, "cpu") is None
    assert "tuned on NVIDIA H100 PCIe" in flagged({"gpu": "NVIDIA H100 PCIe"}, "cuda")
    assert "--dry-run" in flagged({"gpu": "analytic model: 3350 GB/s memory"}, "cuda")
    assert "one after the other" in flagged({"gpu": "NVIDIA H200", "dependent_launch": False}, "cuda")
    verified_here = {"gpu": "NVIDIA H100 PCIe", "verified_on": {"gpu": "NVIDIA H200", "dependent_launch": True}}
    assert flagged(verified_here, "cuda") is None  # a table from elsewhere, verified in this GPU's step


def test_configure_warns_with_the_reason(prepared, monkeypatch):
    from decdec import prepared as prepared_module
    model = decdec.load_prepared(prepared)
    tuned = {"kinds": {g.kind: {"n_tb": 4, "k_chunk": 2} for g in prepared_module.selection_groups(model)}}
    monkeypatch.setattr(prepared_module, "tuned_elsewhere", lambda tuned, device: "it was tuned on GPU X")
    with pytest.warns(UserWarning, match="tuned on GPU X.*rerun autotuner/tune.py"):
        decdec.configure(model, tuned=tuned)


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"

    def failing(path):
        path.write_text("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts._atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
