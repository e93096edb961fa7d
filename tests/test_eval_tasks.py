"""evaluation/tasks.py and the offline task YAMLs: the loaders read the data directory into the
hub's shapes, and lm-eval runs on our model (stories260k) offline."""
import json
from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaders():
    pytest.importorskip("datasets")
    return load_script(ROOT / "evaluation" / "tasks" / "decdec_tasks.py")


@pytest.fixture(scope="module")
def tasks_cli():
    pytest.importorskip("lm_eval")
    return load_script(ROOT / "evaluation" / "tasks.py")


def test_loaders_match_the_hub_shapes(loaders, data_dir):
    d = str(data_dir)
    piqa = loaders.piqa(data_dir=d)["validation"]
    assert len(piqa) == 1838 and set(piqa[0]) == {"goal", "sol1", "sol2", "label"} and piqa[0]["label"] in (0, 1)
    easy, challenge = loaders.arc(data_dir=d)["test"], loaders.arc(data_dir=d, subset="Challenge")["test"]
    assert (len(easy), len(challenge)) == (2376, 1170)
    assert all(r["answerKey"] in r["choices"]["label"] for r in challenge)
    obqa = loaders.openbookqa(data_dir=d)["test"]
    assert len(obqa) == 500
    assert all(len(r["choices"]["text"]) == 4 and r["answerKey"] in "ABCD" and all(r["choices"]["text"]) for r in obqa)
    assert obqa[1]["question_stem"] == "There is most likely going to be fog around:"
    assert obqa[1]["choices"]["text"][0] == "a marsh"
    assert len(loaders.lambada(data_dir=d)["test"]) == 5153
    gsm = loaders.gsm8k(data_dir=d)["test"]
    assert len(gsm) == 1319 and "####" in gsm[0]["answer"]
    nav = loaders.bbh(data_dir=d, name="navigate")["test"]
    assert nav[0]["prompt"].startswith("Given a series of navigation instructions")
    assert nav[0]["prompt"].count("Q: ") == 3 and "canary" not in nav[0]["prompt"]
    with pytest.raises(ValueError, match="data_dir"):
        loaders.piqa()


def test_every_bbh_task_has_a_yaml(data_dir):
    names = sorted(p.stem for p in (data_dir / "bbh").glob("*.json"))
    yamls = sorted(p.stem.removeprefix("decdec_bbh_") for p in (ROOT / "evaluation" / "tasks").glob("decdec_bbh_*.yaml"))
    assert names == yamls and len(names) == 27
    group = (ROOT / "evaluation" / "tasks" / "decdec_bbh.yaml").read_text()
    assert all(f"  - decdec_bbh_{n}\n" in group for n in names)


def test_multiple_choice_offline(tasks_cli, stories3, data_dir, tmp_path):
    out = tmp_path / "tasks.json"
    records = tasks_cli.main(["--model-dir", str(stories3), "--data-dir", str(data_dir), "--tasks", "piqa", "arc_easy",
                              "--mode", "none", "decdec", "--k-chunk", "128", "--limit", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))
    seen = {(r["task"], r["lm_eval_task"], r["mode"], r["k_chunk"], r["metric"]) for r in records}
    for mode, k in (("none", 0), ("decdec", 128)):
        assert ("piqa", "decdec_piqa", mode, k, "acc") in seen
        assert ("arc_easy", "decdec_arc_easy", mode, k, "acc_norm") in seen
    assert all(0 <= r["value"] <= 1 and r["samples"] == 3 and r["method"] == "rtn" for r in records)


def test_generation_task_offline(tasks_cli, data_dir):
    records = tasks_cli.main(["--model", "stories260k", "--data-dir", str(data_dir), "--tasks",
                              "decdec_bbh_sports_understanding", "--limit", "1", "--max-gen-toks", "24"])
    assert [(r["mode"], r["metric"], r["filter"]) for r in records] == [("original", "exact_match", "get-answer")]


def test_unknown_task(tasks_cli, data_dir):
    with pytest.raises(SystemExit, match="unknown task"):  # a decdec_ name: no need to index lm-eval's tasks
        tasks_cli.main(["--model", "stories260k", "--data-dir", str(data_dir), "--tasks", "decdec_no_such_task"])
