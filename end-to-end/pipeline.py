"""The main job: the whole DecDEC pipeline on one model, stage after stage.

1. prepare   decdec_setup/prepare.py: quantize (AWQ 3-bit by default), cheatsheet.pt, thresholds.pt
             (skipped when the directory is already complete)
2. tune      autotuner/tune.py at the target slowdown: measured on the GPU; on a CPU-only machine the
             analytic estimate for the H100 of DESIGN.md (labelled as such)
3. evaluate  on a WikiText-2 slice: perplexity of the original, the quantized model without DecDEC and
             with it (tuned config, and a fixed k_chunk), and the next-token KL divergence to the original
4. chat      end-to-end/chat.py answers one prompt and reports tokens/s

Stages 1, 2 and 4 run the stage scripts as a user would (their commands are printed); a summary
table and the commands to go further come last, and the summary is written as JSON into the model
directory. Without a data directory, calibration text is sampled from the model itself and the KL
divergence is measured on text the original model generates.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import decdec
from decdec.batched import use_batched_compensation
from decdec.metrics import join_rows, kl_divergence, windows
from decdec.resolve import find_data_dir, load_original, load_text_dataset

REPO = Path(__file__).resolve().parents[1]
# DESIGN.md's H100 measurements: the dry-run tuning estimate on machines without a GPU
H100_ESTIMATE = ["--mem-bw", "2900", "--pcie-bw", "52", "--sms", "132"]


def run_stage(name: str, argv: list[str]) -> float:
    cmd = [sys.executable, *argv]
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in [Path(cmd[0]).name, *cmd[1:]])}", flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"pipeline stopped: the {name} stage failed (its message is above)")
    return time.perf_counter() - start


def evaluation_tokens(args: argparse.Namespace, original, tokenizer) -> tuple[torch.Tensor, str]:
    """[1, windows * seqlen] tokens: the start of WikiText-2 test, or text sampled from the original."""
    needed = args.windows * args.seqlen
    if find_data_dir(args.data_dir) is not None:
        text = join_rows(load_text_dataset("wikitext2", "test", args.data_dir))
        return tokenizer(text[: needed * 20], return_tensors="pt").input_ids[:, :needed], "wikitext2 (test)"
    torch.manual_seed(0)
    start = torch.tensor([[tokenizer.bos_token_id or 0]])
    out = original.generate(start, max_new_tokens=needed, do_sample=True, top_k=50, min_new_tokens=needed)
    return out[:, 1:needed + 1], "text sampled from the original"


@torch.no_grad()
def evaluate(args: argparse.Namespace, model_dir: Path, device: str) -> tuple[list[dict], str]:
    original, tokenizer, _ = load_original(args.model, device=device, data_dir=args.data_dir,
                                           dtype=torch.float32 if device == "cpu" else torch.float16)
    tokens, source = evaluation_tokens(args, original, tokenizer)
    chunks = [w.to(device) for w in windows(tokens, args.seqlen)]
    reference = [original(input_ids=w).logits.float() for w in chunks]
    del original
    model = decdec.load_prepared(model_dir, device, compensate_prefill=True)
    use_batched_compensation(model)
    tuned = {g.kind: g.k_chunk for g in decdec.selection_groups(model)}
    rows = [{"model": "original (dequantized GGUF)" if args.model == "smollm2-135m" else "original",
             **_scores(reference, reference, chunks)}]
    for label, mode, k_chunk in (("quantized, no DecDEC", "none", 0),
                                 ("DecDEC, tuned config", "decdec", tuned),
                                 (f"DecDEC, k_chunk {args.k_chunk}", "decdec", args.k_chunk)):
        decdec.configure(model, mode=mode, k_chunk=k_chunk)
        logits = [model(input_ids=w).logits.float() for w in chunks]
        rows.append({"model": label, "k_chunk": k_chunk if mode != "none" else 0,
                     **_scores(logits, reference, chunks)})
    return rows, source


def _scores(logits: list[torch.Tensor], reference: list[torch.Tensor], chunks: list[torch.Tensor]) -> dict:
    nll = sum(torch.nn.functional.cross_entropy(lg[0, :-1], w[0, 1:], reduction="sum").item()
              for lg, w in zip(logits, chunks))
    count = sum(w.shape[1] - 1 for w in chunks)
    kl = sum(kl_divergence(r[0], lg[0]).sum().item() for r, lg in zip(reference, logits)) / sum(
        w.shape[1] for w in chunks)
    return {"ppl": float(torch.tensor(nll / count).exp()), "kl_to_original": kl, "tokens": count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="original model (default smollm2-135m)")
    p.add_argument("--method", default="awq", choices=("rtn", "awq", "squeezellm"))
    p.add_argument("--bits", default="3", help="3, 4 or 3.5 (default 3)")
    p.add_argument("--group-size", default="128", help="input channels per quantization group (default 128)")
    p.add_argument("--out", default=None, help="prepared model directory (default runs/<model>-<method><bits>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=None, help="data directory (default: $DECDEC_DATA or ../shared/data)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--target-slowdown", type=float, default=2.5, help="tuning budget in percent (default 2.5)")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--k-chunk", type=int, default=32, help="the fixed k_chunk evaluated beside the tuned one")
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")

    name = Path(args.model).name if Path(args.model).exists() else args.model
    model_dir = Path(args.out or REPO / "runs" / f"{name}-{args.method}{args.bits}".replace(".", "_"))
    has_data = find_data_dir(args.data_dir) is not None
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    times = {}
    times["prepare"] = run_stage("prepare", [
        "decdec_setup/prepare.py", "--model", args.model, "--method", args.method, "--bits", args.bits,
        "--group-size", args.group_size, "--out", str(model_dir), "--calib", "c4" if has_data else "self", "--nsamples", str(args.nsamples),
        "--seqlen", str(args.calib_seqlen), "--device", args.device, *data])
    on_gpu = args.device.startswith("cuda")
    tune = ["autotuner/tune.py", "--model-dir", str(model_dir), "--target-slowdown", str(args.target_slowdown)]
    times["tune"] = run_stage("tune" if on_gpu else "tune (dry run: analytic H100 estimate)",
                              tune if on_gpu else [*tune, "--dry-run", *H100_ESTIMATE])

    print("\n=== evaluate (in this process)", flush=True)
    start = time.perf_counter()
    rows, source = evaluate(args, model_dir, args.device)
    times["evaluate"] = time.perf_counter() - start

    times["chat"] = run_stage("chat", ["end-to-end/chat.py", "--model-dir", str(model_dir), "--device", args.device,
                                       "--prompt", args.prompt, "--max-new-tokens", str(args.max_new_tokens)])

    tokens = rows[0]["tokens"]
    print(f"\n=== summary: {args.model}, {args.method} {args.bits}-bit, {args.device}; "
          f"{tokens + args.windows} tokens of {source}")
    if args.model == "smollm2-135m":
        print("(the original is SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF: it was 4-bit already)")
    print(f"{'model':<28} {'k_chunk':>24} {'perplexity':>11} {'KL to original':>15}")
    for r in rows:
        k = r.get("k_chunk", "-")
        k = ",".join(f"{v}" for v in k.values()) if isinstance(k, dict) else k
        print(f"{r['model']:<28} {str(k):>24} {r['ppl']:>11.3f} {r['kl_to_original']:>15.4f}")
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    summary = {"model": args.model, "method": args.method, "bits": args.bits, "device": args.device,
               "eval_text": source, "rows": rows, "stage_seconds": times}
    (model_dir / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {model_dir / 'pipeline_summary.json'}\nto go further:")
    print(f"  python end-to-end/chat.py --model-dir {model_dir}              # interactive chat")
    print(f"  python evaluation/ppl.py --model-dir {model_dir} --dataset wikitext2 --k-chunk 0 8 16 32 64")
    print(f"  python evaluation/tasks.py --model-dir {model_dir} --tasks piqa arc_easy --k-chunk 0 16")


if __name__ == "__main__":
    main()
