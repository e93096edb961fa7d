"""decdec_setup scripts on stories260k: the one-command path, steps run alone, bad input, interruption."""
import json
from pathlib import Path

import pytest
import torch

import decdec
from decdec import artifacts
from helpers import load_script

SETUP = Path(__file__).resolve().parents[1] / "decdec_setup"
SMALL = ["--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--group-size", "32"]


def script(name: str):
    return load_script(SETUP / f"{name}.py")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("prep") / "stories-rtn3"
    summary = script("prepare").main(["--model", "stories260k", "--method", "rtn", "--bits", "3", "--out", str(out),
                                      "--data-dir", str(data_dir), *SMALL])
    return out, summary


def test_prepare_writes_a_complete_directory(prepared):
    out, summary = prepared
    for name in ("config.json", "quant_config.json", "model.safetensors", "cheatsheet.pt", "thresholds.pt",
                 "setup_summary.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert set(summary["stages_s"]) >= {"quantize", "cheatsheet", "thresholds"}
    assert summary["sizes"]["pinned_host_bytes"] > 0 and summary["sizes"]["gpu_bytes"] > 0
    model = decdec.load_prepared(out, mode="decdec", k_chunk=8, compensate_prefill=True)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_rerun_redoes_nothing(prepared, data_dir, capsys):
    out, _ = prepared
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    script("prepare").main(["--model", "stories260k", "--method", "rtn", "--bits", "3", "--out", str(out),
                            "--data-dir", str(data_dir), *SMALL])
    text = capsys.readouterr().out
    assert "[quantize] skipped" in text and "[cheatsheet] skipped" in text and "[thresholds] skipped" in text
    for name in ("model.safetensors", "cheatsheet.pt", "thresholds.pt", "quant_config.json"):
        assert (out / name).stat().st_mtime_ns == before[name]


def test_steps_run_alone(tmp_path, data_dir):
    out = tmp_path / "awq"
    script("quantize").main(["--model", "stories260k", "--method", "awq", "--bits", "4", "--out", str(out),
                             "--data-dir", str(data_dir), *SMALL])
    assert (out / "awq_scales.safetensors").is_file() and not (out / "cheatsheet.pt").exists()
    qc = artifacts.read_quant_config(out)
    script("cheatsheet").main(["--model-dir", str(out), "--original", "stories260k", "--data-dir", str(data_dir),
                               "--device", "cpu"])
    script("thresholds").main(["--model-dir", str(out), "--calib", "c4", "--nsamples", "2", "--seqlen", "32",
                               "--data-dir", str(data_dir), "--device", "cpu"])
    sizes = {kind: n for kind, n in decdec.prepared.group_input_sizes(qc).items()}
    _, calib = artifacts.load_thresholds(out / "thresholds.pt", qc, sizes)
    assert calib["tokens"] == 64
    summary = json.loads((out / "setup_summary.json").read_text())
    assert set(summary["stages_s"]) >= {"quantize", "cheatsheet", "thresholds"}


def test_cheatsheet_refuses_another_original(prepared, tmp_path):
    out, _ = prepared
    import shutil

    from transformers import AutoModelForCausalLM
    other = tmp_path / "other"
    shutil.copytree(decdec.resolve.resolve_model("stories260k").path, other)  # tokenizer included
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    model.save_pretrained(other)
    with pytest.raises(artifacts.ArtifactError, match="not the model this directory was made from"):
        script("cheatsheet").main(["--model-dir", str(out), "--original", str(other), "--device", "cpu"])


@pytest.mark.parametrize("argv,message", [
    (["--bits", "5"], "unsupported --bits"),
    (["--group-size", "1000"], "larger than"),
    (["--calib", "no-such-set"], "calibration source"),
    (["--nsamples", "100000"], "fewer than"),
])
def test_bad_input_fails_before_work(tmp_path, data_dir, argv, message):
    args = ["--model", "stories260k", "--method", "rtn", "--bits", "3", "--out", str(tmp_path / "x"),
            "--data-dir", str(data_dir), *SMALL]
    for i in range(0, len(argv), 2):  # later options win in argparse
        args += argv[i:i + 2]
    with pytest.raises((ValueError, SystemExit), match=message):
        script("prepare").main(args)
    assert not (tmp_path / "x" / "quant_config.json").exists()


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        script("prepare").main(["--model", "stories260k", "--method", "gptq", "--bits", "3", "--out", str(tmp_path)])


def test_out_dir_holding_another_model(prepared, tmp_path, data_dir):
    out, _ = prepared
    qc = json.loads((out / "quant_config.json").read_text())
    qc["model"]["hidden_size"] = 4096
    other = tmp_path / "other"
    other.mkdir()
    (other / "quant_config.json").write_text(json.dumps(qc))
    with pytest.raises(artifacts.ArtifactError, match="another model"):
        script("prepare").main(["--model", "stories260k", "--method", "rtn", "--bits", "3", "--out", str(other),
                                "--data-dir", str(data_dir), *SMALL])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a prepared model"):
        script("prepare").main(["--model", "stories260k", "--method", "rtn", "--bits", "3", "--out", str(foreign),
                                "--data-dir", str(data_dir), *SMALL])


def test_interrupted_requantization_leaves_no_complete_looking_dir(prepared, tmp_path, data_dir, monkeypatch):
    import shutil

    from decdec.quantizers import pipeline
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "quantize_rtn", boom)
    with pytest.raises(KeyboardInterrupt):
        script("prepare").main(["--model", "stories260k", "--method", "rtn", "--bits", "4", "--out", str(out),
                                "--data-dir", str(data_dir), *SMALL])
    assert not (out / "quant_config.json").exists() and not (out / "cheatsheet.pt").exists()
    with pytest.raises(FileNotFoundError):
        decdec.load_prepared(out)
