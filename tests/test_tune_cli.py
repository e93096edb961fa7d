"""autotuner/tune.py end to end on a tiny synthetic model: dry run, table reuse, the written
config as load_prepared reads it, and the measuring path (timed on CPU here)."""
import json
from pathlib import Path

import pytest
import torch

import decdec
from decdec import artifacts
from decdec.synthetic import write_synthetic_model
from decdec.timing import device_name
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
DRY = ["--dry-run", "--mem-bw", "3350", "--pcie-bw", "52", "--sms", "132"]


@pytest.fixture(scope="module")
def tune():
    return load_script(ROOT / "autotuner" / "tune.py")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    write_synthetic_model(out, "tiny", bits=3)
    return out


def test_dry_run_writes_a_config_load_prepared_applies(tune, tiny_dir, tmp_path, capsys):
    plot = tmp_path / "tune.png"
    assert tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "2.5", *DRY, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "predicted slowdown" in out
    assert plot.stat().st_size > 0
    config = artifacts.read_json(tiny_dir / artifacts.TUNING_CONFIG)
    assert config["estimate"] is True and config["target_slowdown_percent"] == 2.5
    assert config["predicted_slowdown_percent"] <= 2.5
    assert set(config["kinds"]) == {"q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"}
    assert "table" in config and "knee_k_chunk" in config and config["date"]

    model = decdec.load_prepared(tiny_dir)
    for g in decdec.selection_groups(model):
        assert (g.k_chunk, g.n_tb) == (config["kinds"][g.kind]["k_chunk"], config["kinds"][g.kind]["n_tb"])
        assert g.k_chunk > 0 and g.mode == "decdec"
    overridden = decdec.load_prepared(tiny_dir, k_chunk={"o_proj": 3})
    by_kind = {g.kind: g.k_chunk for g in decdec.selection_groups(overridden)}
    assert by_kind["o_proj"] == 3 and by_kind["down_proj"] == config["kinds"]["down_proj"]["k_chunk"]


def test_table_reuse_reproduces_the_search(tune, tiny_dir, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "5", *DRY, "--no-write", "--json", str(first)])
    saved = tmp_path / "saved_config.json"
    saved.write_text(first.read_text())
    tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "5", "--table", str(saved), "--no-write",
               "--json", str(second)])
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["kinds"] == b["kinds"] and b["table_from"] == str(saved)


def test_target_of_the_step(tune, tiny_dir, tmp_path):
    linears, step = tmp_path / "linears.json", tmp_path / "step.json"
    tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "2.5", *DRY, "--no-write", "--json", str(linears)])
    a = json.loads(linears.read_text())
    # a step four times as long as the linears: the same target allows four times the added time
    step_ms = 4 * a["summed_linear_ms"]["baseline"]
    tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "2.5", *DRY, "--of", "step", "--step-ms", str(step_ms),
               "--no-write", "--json", str(step)])
    b = json.loads(step.read_text())
    assert a["target_of"] == "linears" and b["target_of"] == "step" and b["step_ms"] == step_ms
    assert sum(c["k_chunk"] for c in b["kinds"].values()) > sum(c["k_chunk"] for c in a["kinds"].values())
    added = b["summed_linear_ms"]["tuned"] - b["summed_linear_ms"]["baseline"]
    assert added <= 0.025 * step_ms * (1 + 1e-9)
    assert b["predicted_slowdown_percent"] == pytest.approx(100 * added / step_ms)


@pytest.mark.parametrize("extra, message", [
    (["--step-ms", "3"], "go with --of step"),
    (["--compile"], "go with --of step"),
    (["--of", "step"], "needs --step-ms"),  # a dry run
    (["--of", "step", "--step-ms", "0"], "must be positive"),
    (["--of", "step", "--step-ms", "3", "--verify", "2"], "--verify times the decode step here"),
    (["--verify", "-1"], "rounds >= 0"),
])
def test_step_arguments_checked(tune, tiny_dir, extra, message, capsys):
    with pytest.raises(SystemExit):
        tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "2.5", *DRY, *extra])
    assert message in capsys.readouterr().err


def test_table_of_another_model_is_refused(tune, tiny_dir, tmp_path):
    other = tmp_path / "other"
    write_synthetic_model(other, "tiny", bits=4, num_layers=1)
    tune.main(["--model-dir", str(other), "--target-slowdown", "5", *DRY, "--no-write", "--json", str(tmp_path / "o.json")])
    with pytest.raises(artifacts.ArtifactError, match="table.workloads"):
        tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "5", "--table", str(tmp_path / "o.json")])


def test_measuring_path_on_cpu(tune, tiny_dir, tmp_path):
    out = tmp_path / "m.json"
    assert tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "50", "--device", "cpu", "--k-max", "4",
                      "--no-write", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["estimate"] is False and result["table"]["source"] == "measured"
    assert result["table"]["k_grid"] == [0, 1, 2, 3, 4]
    for w in result["table"]["workloads"]:
        assert w["baseline"] > 0 and w["times"]["1"][0] == w["baseline"]


def test_measuring_the_step_on_cpu(tune, tiny_dir, tmp_path):
    out, again = tmp_path / "s.json", tmp_path / "t.json"
    assert tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "50", "--device", "cpu", "--k-max", "2",
                      "--of", "step", "--no-write", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step_ms"] > result["summed_linear_ms"]["baseline"] > 0
    assert result["step_timing"] == "measured: greedy decoding, eager"
    # a reused table: only the step is timed
    assert tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "5", "--device", "cpu", "--table", str(out),
                      "--of", "step", "--no-write", "--json", str(again)]) == 0
    reused = json.loads(again.read_text())
    assert reused["table"] == result["table"] and reused["step_ms"] > 0 and reused["table_from"] == str(out)


def test_verifying_in_the_step_on_cpu(tune, tiny_dir, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "50", "--device", "cpu", "--k-max", "2",
                      "--of", "step", "--verify", "2", "--no-write", "--json", str(out)]) == 0
    assert "verified in the decode step" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rounds = result["verification"]
    assert result["verified_on"] == {"gpu": device_name(torch.device("cpu"))}
    assert 1 <= len(rounds) <= 2 and rounds[0]["target_percent"] == 50
    kept = [r for r in rounds if r["kinds"] == result["kinds"]]
    if kept:  # a config measured within the target, and its measurement reported
        assert kept[0]["measured_percent"] <= 50 and result["measured_slowdown_percent"] == kept[0]["measured_percent"]
    else:  # none was: DecDEC off, nothing measured for it
        assert all(c["k_chunk"] == 0 for c in result["kinds"].values()) and result["measured_slowdown_percent"] is None


def test_measurement_restores_the_settings(tiny_dir):
    from decdec import tuning
    model = decdec.load_prepared(tiny_dir, mode="exact", k_chunk=2)
    table = tuning.measure_table(model, [1, 2], (0, 4), progress=False)
    assert sorted(table.times[table.workloads[0].key]) == [1, 2]
    assert all((g.mode, g.k_chunk) == ("exact", 2) for g in decdec.selection_groups(model))


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--mem-bw", "3350"], "--pcie-bw --sms"),
    (["--mem-bw", "3350"], "dry-run only"),
    (["--target-slowdown", "-1"], "must be >= 0"),
])
def test_bad_arguments(tune, tiny_dir, capsys, argv, message):
    base = ["--model-dir", str(tiny_dir)] + ([] if "--target-slowdown" in argv else ["--target-slowdown", "2.5"])
    with pytest.raises(SystemExit) as e:
        tune.main(base + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gpu_measurement_needs_the_extension(tune, tiny_dir):
    if decdec.cuda_available():
        pytest.skip("CUDA extension present")
    with pytest.raises(SystemExit):
        tune.main(["--model-dir", str(tiny_dir), "--target-slowdown", "2.5"])


@pytest.mark.parametrize("fresh", [True, False])
def test_measurement_draws_a_fresh_input_per_timed_call(tiny_dir, fresh):
    """A replayed input fetches the same residual rows every call, which flatters DEC's cost."""
    from decdec import tuning
    model = decdec.load_prepared(tiny_dir, mode="decdec")
    first = next(m for m in model.modules() if isinstance(m, decdec.DecDECLinear))
    seen = []
    first.register_forward_hook(lambda mod, args, out: seen.append(args[0].sum().item()))
    tuning.measure_table(model, [1], (0, 1), fresh_input=fresh, progress=False)
    assert len(seen) > 10
    assert (len(set(seen)) > len(seen) // 2) == fresh
