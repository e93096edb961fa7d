"""end-to-end/chat.py and generate.py run in-process on CPU, and the synthetic model builder."""
import builtins
import json
from pathlib import Path

import pytest
import torch

import decdec
from decdec import artifacts
from decdec.synthetic import ensure_synthetic_model
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat():
    return load_script(ROOT / "end-to-end" / "chat.py")


@pytest.fixture(scope="module")
def generate():
    return load_script(ROOT / "end-to-end" / "generate.py")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return ensure_synthetic_model(tmp_path_factory.mktemp("synth"), "tiny", bits=3)


def test_chat_single_prompt(chat, stories3, capsys):
    assert chat.main(["--model-dir", str(stories3), "--prompt", "Once upon a time", "--max-new-tokens", "12",
                      "--k-chunk", "512", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "> Once upon a time" in out and "tokens/s" in out and "k_chunk" in out
    answer = out.split("\n")[1]
    assert len(answer.strip()) > 0


def test_chat_commands_and_eof(chat, stories3, capsys, monkeypatch):
    lines = iter(["/k 256", "Lily", "/decdec off", "/k down_proj=3", "/k foo=2", "/help", "Tom", "/reset"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert chat.main(["--model-dir", str(stories3), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "no chat template" in out
    assert "k_chunk q_proj+k_proj+v_proj 256" in out
    assert out.count("tokens/s") == 2
    assert "DecDEC off" in out and "unknown kinds ['foo']" in out and "conversation cleared" in out
    assert out.count("(DecDEC off)") == 2  # /k while off keeps DecDEC off
    assert out.rstrip().endswith("(conversation cleared)")  # EOF after the last command: a clean exit


def test_generate_prints_text(generate, stories3, capsys, tmp_path):
    out_json = tmp_path / "g.json"
    assert generate.main(["--model-dir", str(stories3), "--prompt", "Once upon a time", "--max-new-tokens", "10",
                          "--device", "cpu", "--sdpa-attention", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\nOnce upon a time") and "tokens/s" in out
    result = json.loads(out_json.read_text())
    assert len(result["samples"]) == 1 and len(result["samples"][0]["tokens"]) == 10 and result["sdpa_attention"]


def test_generate_sets_scales_on_host(generate, stories3, tmp_path):
    out_json = tmp_path / "g.json"
    for flags, expected in (([], False), (["--scales-on-host"], True)):
        assert generate.main(["--model-dir", str(stories3), "--max-new-tokens", "2", "--device", "cpu",
                              "--json", str(out_json), *flags]) == 0
        kinds = json.loads(out_json.read_text())["decdec"].values()
        assert kinds and all(v["scales_on_host"] is expected for v in kinds)


def test_generate_bench_on_synthetic(generate, synthetic, capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert generate.main(["--synthetic", "tiny", "--synthetic-dir", str(synthetic), "--bench", "--max-new-tokens", "3",
                          "--k-chunk", "64", "--fp16-contrast", "--memory-check", "6", "--contexts", "5,40",
                          "--device", "cpu", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "decode benchmark" in out and "DecDEC on" in out and "ms/token, SDPA, whole cache" in out
    result = json.loads(out_json.read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["quantized, DecDEC off", "quantized, DecDEC on", "fp32 dense, this loop",
                     "fp32 dense, HF generate()"]
    assert result["rows"][1]["slowdown_percent"] is not None and result["rows"][0]["roofline_ms"] is None
    assert result["memory_check"]["tokens"] == 6 and result["memory_check"]["graphs"] == 0  # CPU: eager steps
    assert [r["context"] for r in result["contexts"]] == [5, 40]
    assert all(list(r["ms_per_token"]) == ["SDPA, windows", "SDPA, whole cache"] and min(r["ms_per_token"].values()) > 0
               for r in result["contexts"])  # CPU: no decode kernel
    assert all(v["k_chunk"] == 64 for v in result["decdec"].values())
    assert "k_chunk q_proj 64" in result["rows"][1]["note"]


def test_bench_of_tuned_configs_and_report(generate, synthetic, capsys, tmp_path):
    tune = load_script(ROOT / "autotuner" / "tune.py")
    report = load_script(ROOT / "end-to-end" / "report.py")
    configs = []
    for target in ("2.5", "10"):
        configs.append(tmp_path / f"tune_{target}.json")
        tune.main(["--model-dir", str(synthetic), "--target-slowdown", target, "--dry-run", "--mem-bw", "3350",
                   "--pcie-bw", "52", "--sms", "132", "--no-write", "--json", str(configs[-1])])
    bench = tmp_path / "bench.json"
    assert generate.main(["--model-dir", str(synthetic), "--bench", "--max-new-tokens", "2", "--device", "cpu",
                          "--tuned", *map(str, configs), "--json", str(bench)]) == 0
    rows = json.loads(bench.read_text())["rows"]
    assert [r["name"] for r in rows] == ["quantized, DecDEC off", "quantized, DecDEC tuned 2.5 %",
                                         "quantized, DecDEC tuned 10 %"]
    tuned = json.loads(configs[0].read_text())["kinds"]["down_proj"]
    assert f"down_proj {tuned['k_chunk']}/{tuned['n_tb']}" in rows[1]["note"]
    capsys.readouterr()
    assert report.main([*map(str, configs), str(bench)]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "2.5 %" in out and "10 %" in out and "DecDEC tuned 10 %" in out


def test_synthetic_model_is_valid_and_reused(synthetic):
    mtime = (synthetic / artifacts.WEIGHTS).stat().st_mtime_ns
    assert ensure_synthetic_model(synthetic, "tiny", bits=3) == synthetic
    assert (synthetic / artifacts.WEIGHTS).stat().st_mtime_ns == mtime
    model = decdec.load_prepared(synthetic, k_chunk=16)
    assert model.config.hidden_size == 512 and model.config.num_hidden_layers == 2
    lin = model.model.layers[1].mlp.down_proj
    assert (lin.in_features, lin.out_features) == (1536, 512)
    nibbles = lin.residual.nibbles()
    assert nibbles.min() >= 1 and nibbles.max() <= 15
    w = lin.quantized_weight.dequantize()
    assert 0.01 < w.std() < 0.04  # the config's initializer std
    logits = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()


def test_generate_rejects_bad_arguments(generate, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--synthetic", "tiny", "--no-decdec", "--k-chunk", "4"])
    with pytest.raises(SystemExit):
        generate.main(["--max-new-tokens", "4"])


def test_profile_kernel_kinds_and_table(generate):
    names = {"void decdec::(anonymous namespace)::gemv_kernel<0, 3, 0, 128, true>(decdec::GemvParams)": "GEMV + DEC",
             "void decdec::(anonymous namespace)::gemv_kernel<0, 3, 0, 128, false>(decdec::GemvParams)": "quantized GEMV",
             "triton_red_fused__to_copy_add_gemv_mean_mul_pow_rsqrt_view_14": "Triton",
             "nvjet_sm90_hsh_384x8_64x4_2x1_v_bz_TNT": "lm_head",
             "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16": "attention",
             "Memcpy DtoD (Device -> Device)": "copies",
             "void at::native::elementwise_kernel<128, 4>": "other"}
    for name, expected in names.items():
        assert expected in generate.kernel_kind(name), name
    profile = {"off": {"steps": 4, "wall_us_per_step": 120.0, "gpu_us_per_step": 100.0,
                       "kinds": {"quantized GEMV (ours)": {"us_per_step": 75.0, "kernels_per_step": 7},
                                 "attention": {"us_per_step": 25.0, "kernels_per_step": 1}},
                       "top_kernels": [{"name": "gemv_kernel<0, 3, 0, 128, false>", "us_per_step": 75.0,
                                        "calls_per_step": 7}]}}
    text = generate.profile_table(profile)
    assert "off: step 120 us wall, 100 us of kernel time" in text
    assert "quantized GEMV (ours)" in text and "75.0" in text
