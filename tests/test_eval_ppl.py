"""evaluation/ppl.py on stories260k: CLI, JSON schema, the modes' ordering, the original."""
import json
from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"model", "dataset", "mode", "k_chunk", "ppl", "tokens", "method", "bits", "seqlen", "windows",
               "seconds", "cpu_seconds", "device", "path"}


@pytest.fixture(scope="module")
def ppl():
    return load_script(ROOT / "evaluation" / "ppl.py")


def test_modes_json_and_ordering(ppl, stories3, data_dir, tmp_path):
    out = tmp_path / "ppl.json"
    # k_chunk 256 compensates a quarter of every input: far from both none and full on this model
    records = ppl.main(["--model-dir", str(stories3), "--data-dir", str(data_dir), "--seqlen", "128",
                        "--limit-windows", "3", "--mode", "none", "decdec", "full", "static", "--k-chunk", "0", "256",
                        "--report-recall", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(records))
    runs = [(r["mode"], r["k_chunk"]) for r in saved]
    assert runs == [("none", 0), ("decdec", 0), ("decdec", 256), ("full", None), ("static", 0), ("static", 256)]
    for r in saved:
        assert RECORD_KEYS <= set(r)
        assert (r["dataset"], r["method"], r["bits"]) == ("wikitext2", "rtn", 3.0)
        assert (r["tokens"], r["windows"]) == (3 * 127, 3)
        assert r["ppl"] > 1
    ppl_of = dict(zip(runs, (r["ppl"] for r in saved)))
    assert ppl_of[("decdec", 0)] == pytest.approx(ppl_of[("none", 0)], rel=1e-6)
    assert ppl_of[("full", None)] < ppl_of[("decdec", 256)] < ppl_of[("none", 0)]
    recall = saved[2]["recall"]
    assert {"down_proj", "all"} <= set(recall) and 0.5 < recall["all"] <= 1
    assert "recall" not in saved[0] and "recall" not in saved[1]


def test_original_and_c4(ppl, data_dir):
    records = ppl.main(["--model", "stories260k", "--data-dir", str(data_dir), "--dataset", "wikitext2", "c4",
                        "--seqlen", "64", "--limit-windows", "2", "--mode", "decdec", "full"])
    assert [(r["dataset"], r["mode"], r["k_chunk"], r["method"]) for r in records] == [
        ("wikitext2", "original", None, "original"), ("c4", "original", None, "original")]
    assert all(r["tokens"] == 2 * 63 for r in records)


def test_reference_path_matches_batched(ppl, stories3, data_dir):
    args = ["--model-dir", str(stories3), "--data-dir", str(data_dir), "--seqlen", "64", "--limit-windows", "1",
            "--mode", "decdec", "--k-chunk", "128"]
    fast, = ppl.main(args + ["--repeats", "3"])
    ref, = ppl.main(args + ["--reference"])
    assert (fast["path"], ref["path"]) == ("batched", "reference")
    assert len(fast["seconds_per_pass"]) == 3 and fast["seconds"] == sorted(fast["seconds_per_pass"])[1]
    assert "seconds_per_pass" not in ref
    # the corrections agree to fp32 rounding, which can move an activation across a bucket edge and
    # change one channel of one token downstream: close, not bit-equal (test_eval_batched is exact)
    assert fast["ppl"] == pytest.approx(ref["ppl"], rel=5e-3)


def test_repeats_take_turns_and_give_the_cost(ppl, stories3, data_dir, monkeypatch):
    """With --repeats the settings alternate pass by pass (a drifting machine slows them alike),
    and each record carries its median time relative to the plain model's."""
    order = []
    real = ppl.perplexity

    def recording(*args, desc="", **kwargs):
        order.append(desc)
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(ppl, "perplexity", recording)
    records = ppl.main(["--model-dir", str(stories3), "--data-dir", str(data_dir), "--seqlen", "64",
                        "--limit-windows", "1", "--mode", "none", "decdec", "--k-chunk", "128", "--repeats", "2"])
    assert [d.split(" (")[0] for d in order] == ["wikitext2 none k=0", "wikitext2 decdec k=128"] * 2
    none, decdec = records
    assert none["cost_vs_none"] == 1.0
    assert decdec["cost_vs_none"] == pytest.approx(decdec["seconds"] / none["seconds"])


def test_batched_windows_equal_one_at_a_time(ppl, stories3, data_dir):
    """Several windows per forward pass score the same tokens to the same perplexity, the last
    batch being partial (5 windows in batches of 2)."""
    args = ["--model-dir", str(stories3), "--data-dir", str(data_dir), "--seqlen", "64", "--limit-windows", "5",
            "--mode", "none", "decdec", "--k-chunk", "128"]
    single = ppl.main(args)
    batched = ppl.main(args + ["--batch-size", "2"])
    for a, b in zip(single, batched):
        assert (a["mode"], a["tokens"], b["batch_size"]) == (b["mode"], b["tokens"], 2)
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--seqlen", "128", "--batch-size", "0"], "--batch-size"),
    (["--mode", "sideways"], "unknown --mode"),
    (["--k-chunk", "2000"], "--k-chunk"),
    (["--seqlen", "4096"], "exceeds"),
    (["--seqlen", "128", "--limit-windows", "0"], "--limit-windows"),
    (["--seqlen", "128", "--repeats", "0"], "--repeats"),
    (["--seqlen", "128", "--dataset", "wikitext2", "--data-dir", "/nonexistent"], "does not exist"),
])
def test_bad_input(ppl, stories3, data_dir, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ppl.main(["--model-dir", str(stories3), "--data-dir", str(data_dir)] + argv)
    assert message in str(e.value)


def test_model_and_model_dir_exclusive(ppl, stories3, capsys):
    with pytest.raises(SystemExit):
        ppl.main(["--model-dir", str(stories3), "--model", "stories260k"])
    assert "not allowed with" in capsys.readouterr().err
