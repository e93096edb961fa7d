#!/usr/bin/env python
"""Generates text with a prepared (quantized) model and DecDEC, and benchmarks decoding speed.

The decode step runs with a static KV cache inside a CUDA graph on the GPU (decdec.generation);
on CPU everything runs eagerly through the reference path. DecDEC settings come from the model's
decdec_config.json (autotuner/tune.py) unless --k-chunk or --no-decdec says otherwise.

--bench times decoding in one run with DecDEC off and on (alternating runs, medians), and
compares with the roofline: the bytes of the quantized weights plus the lm_head, divided by the
memory bandwidth measured in the same run. --fp16-contrast adds a random fp16 model of the same
shape, through this generation loop and through Hugging Face generate().

--synthetic builds (once, then reuses) a prepared directory of random quantized weights and
residuals of a named model shape, so speed can be measured without a real model.

Examples:
  python end-to-end/generate.py --model-dir out/stories260k-rtn3 --prompt "Once upon a time" --max-new-tokens 64
  python end-to-end/generate.py --synthetic llama-3-8b --bits 3 --bench --fp16-contrast --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import decdec
from decdec import ops, tuning
from decdec.generation import DecodeSession, GenerationResult, load_for_generation, sync_device
from decdec.synthetic import SHAPES, ensure_synthetic_model
from decdec.tables import text_table
from decdec.timing import device_name, memory_bandwidth

GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", type=Path, help="prepared model directory")
    src.add_argument("--synthetic", choices=sorted(SHAPES), help="random weights of this model shape")
    s = p.add_argument_group("synthetic model")
    s.add_argument("--bits", type=int, choices=(3, 4), default=3, help="base bits (default 3)")
    s.add_argument("--format", choices=("uniform", "lut"), default="uniform", help="weight format (default uniform)")
    s.add_argument("--layers", type=int, help="number of decoder blocks (default: the real model's)")
    s.add_argument("--synthetic-dir", type=Path,
                   help="where the synthetic model is written and reused (default ~/.cache/decdec/synthetic/...)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default="Once upon a time", help="prompt text (default %(default)r)")
    g.add_argument("--prompt-tokens", type=int, default=16,
                   help="prompt length in random token ids when the model has no tokenizer (default 16)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--num-samples", type=int, default=1, help="generations (default 1; --bench: timed runs per setting, default 3)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="activation dtype (default: by device)")
    g.add_argument("--k-chunk", help="k_chunk for every kind (e.g. 8) or per kind (e.g. o_proj=4,down_proj=16)")
    g.add_argument("--no-decdec", action="store_true", help="plain quantized model (mode none)")
    g.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    g.add_argument("--scales-on-host", action="store_true",
                   help="DEC reads the residual scales from pinned host memory with the rows (default: from the GPU)")
    g.add_argument("--sdpa-attention", action="store_true",
                   help="decode steps use transformers' SDPA instead of DecDEC's decode-attention kernel (CUDA)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step before capturing it (fuses small kernels; compiles per setting)")
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench", action="store_true", help="time decoding with DecDEC off and on, against the roofline")
    b.add_argument("--tuned", type=Path, nargs="+", metavar="CONFIG",
                   help="time each of these tuned configs (decdec_config.json or tune.py --json files)")
    b.add_argument("--fp16-contrast", action="store_true", help="also time a random fp16 model of the same shape")
    b.add_argument("--memory-check", type=int, metavar="N",
                   help="also generate N tokens on one session, then run N greedy decode steps on it and report "
                        "the memory growth over those steps (the first run captures the decode steps)")
    b.add_argument("--contexts", metavar="L,L,...",
                   help="also time decode steps (DecDEC off) with L positions in the cache, with SDPA and DecDEC's "
                        "decode attention (CUDA), each with attention windows and over the whole cache, e.g. "
                        "1000,4000,8000")
    b.add_argument("--profile", type=int, metavar="STEPS",
                   help="profile STEPS decode steps of every benchmarked setting (CUDA): GPU time per step by "
                        "kernel kind, to see where a step's time goes")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.prompt_tokens < 1:
        p.error("--max-new-tokens, --num-samples and --prompt-tokens must be positive")
    if args.no_decdec and args.k_chunk is not None:
        p.error("--no-decdec and --k-chunk exclude each other")
    if args.tuned and not args.bench:
        p.error("--tuned needs --bench")
    if args.memory_check is not None and args.memory_check < 2:
        p.error("--memory-check needs at least 2 tokens")
    if args.profile is not None and (not args.bench or args.profile < 1 or args.device == "cpu"):
        p.error("--profile needs --bench, a positive step count and a CUDA device")
    if args.contexts is not None:
        try:
            args.contexts = [int(v) for v in args.contexts.split(",")]
        except ValueError:
            p.error(f"--contexts {args.contexts!r}: expected comma-separated integers")
        if not args.bench or min(args.contexts) < 1:
            p.error("--contexts needs --bench and positive lengths")
    args.decode_attention = False if args.sdpa_attention else None  # DecodeSession's setting (None: default)
    return args


def resolve_model_dir(args: argparse.Namespace) -> Path:
    if args.model_dir is not None:
        return args.model_dir
    name = f"{args.synthetic}-{args.bits}bit-{args.format}" + (f"-{args.layers}l" if args.layers else "")
    out = args.synthetic_dir or Path.home() / ".cache" / "decdec" / "synthetic" / name
    draw = args.device if torch.device(args.device).type == "cuda" else "cpu"
    return ensure_synthetic_model(out, args.synthetic, args.bits, args.format, num_layers=args.layers, device=draw)


def prompt_ids(args: argparse.Namespace, tokenizer, vocab_size: int) -> torch.Tensor:
    if tokenizer is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab_size, (1, args.prompt_tokens), generator=gen)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise SystemExit("--prompt is empty after tokenization")
    return ids


def eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) if tokenizer is not None else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def quantized_roofline_bytes(model) -> int:
    """Bytes one decode step must read at least: the quantized weights plus the lm_head."""
    qc = model.decdec_quant_config
    weights = sum(tuning.weight_bytes(meta) for layer in qc["layers"] for meta in layer.values())
    head = model.get_output_embeddings().weight
    return weights + head.numel() * head.element_size()


def dense_roofline_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def median_ms(results: list[GenerationResult]) -> float:
    return statistics.median(r.ms_per_token for r in results)


def row(name: str, ms: float, roofline_ms: float | None, reference_ms: float | None, graph: bool, note: str = "") -> dict:
    return {"name": name, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
            "roofline_ms": roofline_ms, "roofline_percent": 100 * roofline_ms / ms if roofline_ms else None,
            "slowdown_percent": 100 * (ms / reference_ms - 1) if reference_ms else None,
            "cuda_graph": graph, "note": note}


def bench_table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    lines = [("setting", "ms/token", "tokens/s", "roofline ms", "% roofline", "slowdown", "graph", "note")]
    for r in rows:
        lines.append((r["name"], fmt(r["ms_per_token"], ".3f"), fmt(r["tokens_per_s"], ".1f"), fmt(r["roofline_ms"], ".3f"),
                      fmt(r["roofline_percent"], ".1f"), fmt(r["slowdown_percent"], "+.2f") + ("" if r["slowdown_percent"] is None else " %"),
                      "yes" if r["cuda_graph"] else "no", r["note"]))
    return text_table(lines, left=(0, 7))


def show(tokenizer, tokens: list[int]) -> str:
    if tokenizer is None:
        return f"(no tokenizer) token ids: {tokens[:32]}{' ...' if len(tokens) > 32 else ''}"
    return tokenizer.decode(tokens, skip_special_tokens=True)


def run_generate(args, model, tokenizer, ids, session: DecodeSession) -> dict:
    eos = eos_ids(model, tokenizer)
    results = []
    for i in range(args.num_samples):
        gen = torch.Generator(session.device).manual_seed(args.seed + i)
        r = session.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             eos_token_id=eos, generator=gen)
        results.append(r)
        head = f"--- sample {i + 1}/{args.num_samples}" if args.num_samples > 1 else "---"
        print(f"{head}\n{show(tokenizer, ids[0].tolist()) if tokenizer else ''}{show(tokenizer, r.tokens)}")
        print(f"[{len(r.tokens)} tokens, {r.tokens_per_s:.1f} tokens/s decode, prefill {1e3 * r.prefill_s:.1f} ms, "
              f"CUDA graph {'yes' if r.cuda_graph else 'no'}]")
    return {"samples": [{"text": show(tokenizer, r.tokens), "tokens": r.tokens, **r.to_json()} for r in results]}


def bench_settings(args, model) -> list[tuple[str, list, str]]:
    """(row name, settings, note) of every DecDEC configuration to time: the loaded one, or each --tuned file."""
    if not args.tuned:
        if not any(g.active for g in decdec.selection_groups(model)):
            return []  # DecDEC is off: the off row says it all
        kinds = {g.kind: g.k_chunk for g in decdec.selection_groups(model)}
        note = "k_chunk " + ", ".join(f"{decdec.kind_label(k)} {v}" for k, v in kinds.items())
        return [("quantized, DecDEC on", decdec.group_settings(model), note)]
    out = []
    loaded = decdec.group_settings(model)
    kinds = {g.kind for g in decdec.selection_groups(model)}
    for path in args.tuned:
        data = decdec.artifacts.read_json(path)
        if set(data.get("kinds", {})) != kinds:
            raise SystemExit(f"{path}: tuned kinds {sorted(data.get('kinds', {}))} are not this model's {sorted(kinds)}")
        decdec.configure(model, mode="decdec", tuned=data)
        target = data.get("target_slowdown_percent")
        note = "k_chunk/n_tb " + tuning.settings_text(data["kinds"])
        of = " of step" if data.get("target_of") == "step" else ""
        out.append((f"quantized, DecDEC tuned {target:g} %{of}" if target is not None else f"quantized, DecDEC {path.name}",
                    decdec.group_settings(model), note))
        decdec.apply_group_settings(model, loaded)
    return out


def run_bench(args, model, tokenizer, ids, graph: bool) -> dict:
    """Decode time per token with DecDEC off and in each configuration, alternating runs (medians)."""
    device = torch.device(args.device)
    repeats = max(args.num_samples, 3)
    n = args.max_new_tokens
    max_len = ids.shape[1] + n
    bw = memory_bandwidth(device) if device.type == "cuda" else None
    roof = 1e3 * quantized_roofline_bytes(model) / bw if bw else None
    configs = [("quantized, DecDEC off", [("none", k, n_tb) for _, k, n_tb in decdec.group_settings(model)], "")]
    configs += bench_settings(args, model)
    attention = args.decode_attention
    sessions = [DecodeSession(model, max_len, cuda_graph=graph, compile=args.compile, decode_attention=attention)
                for _ in configs]  # one graph per setting
    times: list[list[GenerationResult]] = [[] for _ in configs]
    for i in range(repeats + 1):  # the first round warms up (and captures the graphs)
        for j, (_, settings, _) in enumerate(configs):
            decdec.apply_group_settings(model, settings)
            r = sessions[j].generate(ids, n)
            if i:
                times[j].append(r)
        if i:
            print(f"bench round {i}/{repeats}: " + ", ".join(f"{t[-1].ms_per_token:.3f}" for t in times) + " ms/token",
                  file=sys.stderr)
    off_ms = median_ms(times[0])
    rows = [row(name, median_ms(t), roof, off_ms if j else None, t[0].cuda_graph, note)
            for j, ((name, _, note), t) in enumerate(zip(configs, times))]
    out = {"memory_bandwidth_GBps": bw / GB if bw else None, "roofline_bytes": quantized_roofline_bytes(model),
           "repeats": repeats, "runs_ms_per_token": {name: [r.ms_per_token for r in t] for (name, _, _), t in zip(configs, times)},
           "graph_errors": {configs[j][0]: s.graph_error for j, s in enumerate(sessions) if s.graph_error}}
    # the memory check runs before the profiler has been in this process (the last setting timed is in force)
    if args.memory_check:
        out["memory_check"] = memory_check(model, ids, args.memory_check, graph, attention)
    if args.contexts:
        decdec.apply_group_settings(model, configs[0][1])
        out["contexts"] = context_bench(model, args.contexts, 32, graph)
    if args.profile:
        out["profile"] = {}
        for (name, settings, _), session in zip(configs, sessions):
            decdec.apply_group_settings(model, settings)
            out["profile"][name] = profile_decode(session, ids, args.profile)
    del sessions
    decdec.apply_group_settings(model, configs[-1][1])
    if args.fp16_contrast:
        rows += fp16_contrast(model.config, ids, n, repeats, device, bw, graph, off_ms, attention)
    out["rows"] = rows
    return out


# kernel kinds of a decode step, first match wins (names as the profiler reports them)
KERNEL_KINDS = (
    ("quantized GEMV + DEC (ours)", re.compile(r"gemv_kernel<.*true>")),
    ("quantized GEMV (ours)", re.compile(r"gemv_kernel<")),
    ("fused by torch.compile (Triton)", re.compile(r"^triton")),  # before the others: names list the fused ops
    ("dense GEMM/GEMV (cuBLAS, lm_head)", re.compile(r"gemm|gemv|cublas|cutlass|xmma|splitk|nvjet", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("copies and fills", re.compile(r"^Memcpy|^Memset|copy_kernel|fill", re.I)),
    ("other element-wise and reductions", re.compile(r"")),
)


def kernel_kind(name: str) -> str:
    return next(kind for kind, pattern in KERNEL_KINDS if pattern.search(name))


def profile_decode(session: DecodeSession, ids: torch.Tensor, steps: int) -> dict:
    """GPU time per decode step by kernel kind, from the profiler's kernel records over ``steps``
    steps (graph replays when the session captures one), beside the step's wall time."""
    from torch.profiler import ProfilerActivity, profile
    if ids.shape[1] + steps + 1 > session.max_len:
        raise SystemExit(f"--profile {steps}: the steps do not fit the session's cache of {session.max_len}")
    token = session.prefill(ids).argmax(-1, keepdim=True)
    session.step(token)  # captures outside the profile
    torch.cuda.synchronize(session.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            session.step(token)
        torch.cuda.synchronize(session.device)
        wall_us = 1e6 * (time.perf_counter() - t0) / steps
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc = by_name.setdefault(e.name, [0.0, 0])
            acc[0] += e.time_range.elapsed_us() / steps
            acc[1] += 1 / steps
    kinds = {name: [0.0, 0.0] for name, _ in KERNEL_KINDS}
    for name, (us, calls) in by_name.items():
        acc = kinds[kernel_kind(name)]
        acc[0] += us
        acc[1] += calls
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    return {"steps": steps, "wall_us_per_step": wall_us, "gpu_us_per_step": sum(us for us, _ in by_name.values()),
            "kinds": {k: {"us_per_step": us, "kernels_per_step": n} for k, (us, n) in kinds.items() if n},
            "top_kernels": [{"name": n[:120], "us_per_step": us, "calls_per_step": c} for n, (us, c) in top]}


def profile_table(profile: dict) -> str:
    """One table per setting: GPU time per step by kernel kind, then the largest kernels."""
    out = []
    for setting, p in profile.items():
        out.append(f"\n{setting}: step {p['wall_us_per_step']:.0f} us wall, {p['gpu_us_per_step']:.0f} us of kernel time "
                   f"({p['steps']} steps profiled)")
        lines = [("kernel kind", "us/step", "% of kernel time", "kernels/step")]
        for kind, v in sorted(p["kinds"].items(), key=lambda kv: -kv[1]["us_per_step"]):
            lines.append((kind, f"{v['us_per_step']:.1f}", f"{100 * v['us_per_step'] / p['gpu_us_per_step']:.1f}",
                          f"{v['kernels_per_step']:.0f}"))
        lines += [("  " + k["name"][:70], f"{k['us_per_step']:.1f}", "", f"{k['calls_per_step']:.0f}")
                  for k in p["top_kernels"][:6]]
        out.append(text_table(lines, left=(0,)))
    return "\n".join(out)


def memory_check(model, ids, n: int, graph: bool, decode_attention: bool | None = None) -> dict:
    """Memory across ``n`` greedy decode steps on a session that already generated ``n`` tokens
    once: that first run captures a decode step per attention window (bounded, reported as
    ``first_run``); the growth from the first to the last of the second run's steps is what
    decoding itself leaks. The steps feed each other on the device (no host round trip)."""
    device = next(model.parameters()).device
    session = DecodeSession(model, ids.shape[1] + n, cuda_graph=graph, decode_attention=decode_attention)

    def snapshot() -> dict:
        snap = {}
        if os.path.exists("/proc/self/statm"):  # resident pages, Linux
            pages = int(open("/proc/self/statm").read().split()[1])
            snap["host_rss_MB"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            snap["cuda_allocated_MB"] = torch.cuda.memory_allocated(device) / 2**20
            snap["cuda_reserved_MB"] = torch.cuda.memory_reserved(device) / 2**20
        return snap

    start = snapshot()
    first = session.generate(ids, n)
    after_first = snapshot()
    token = session.prefill(ids).argmax(-1, keepdim=True)
    token = session.step(token).argmax(-1, keepdim=True)
    before = snapshot()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        token = session.step(token).argmax(-1, keepdim=True)
    after = snapshot()
    ms = 1e3 * (time.perf_counter() - t0) / (n - 1)
    growth = {k: after[k] - before[k] for k in before}
    print(f"memory check: {n} decode steps ({ms:.3f} ms each); growth over them: "
          + ", ".join(f"{k} {v:+.1f}" for k, v in growth.items()), file=sys.stderr)
    return {"tokens": n, "graphs": session.graphs_captured, "start": start, "before": before, "after": after,
            "growth": growth, "first_run": {k: after_first[k] - start[k] for k in start},
            "first_ms_per_token": first.ms_per_token, "ms_per_token": ms}


def context_bench(model, lengths: list[int], steps: int, graph: bool) -> list[dict]:
    """ms per decode step with L positions already in the cache, for each L, with SDPA and (on
    CUDA with the extension) DecDEC's decode attention, each with attention windows and over the
    whole cache (window_base None), on one cache size. One session at a time runs every length
    (random prompts of L tokens); each length's steps run once untimed first, so every window
    they touch is captured before the timing."""
    max_len = max(lengths) + steps + 2
    kernel = [False, True] if decdec.cuda_available() and next(model.parameters()).is_cuda else [False]
    settings = {f"{'decdec' if use else 'SDPA'}, {name}": dict(window_base=base, decode_attention=use)
                for use in kernel for name, base in (("windows", 512), ("whole cache", None))}
    vocab = model.config.get_text_config(decoder=True).vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (1, length), generator=gen) for length in lengths]
    rows = [{"context": length, "steps": steps, "ms_per_token": {}} for length in lengths]
    for name, kwargs in settings.items():
        session = DecodeSession(model, max_len, cuda_graph=graph, **kwargs)
        for ids, row in zip(prompts, rows):
            for _ in range(2):  # the first pass captures the windows the steps touch, the second is timed
                token = session.prefill(ids).argmax(-1, keepdim=True)
                sync_device(session.device)
                t0 = time.perf_counter()
                for _ in range(steps + 1):
                    session.step(token)
                sync_device(session.device)
            row["ms_per_token"][name] = 1e3 * (time.perf_counter() - t0) / (steps + 1)
        if session.graph_error:
            print(f"{name}: {session.graph_error}", file=sys.stderr)
        print(f"{name}: " + ", ".join(f"context {r['context']} {r['ms_per_token'][name]:.3f}" for r in rows)
              + " ms/token", file=sys.stderr)
        del session
    return rows


def context_table(rows: list[dict]) -> str:
    names = list(rows[0]["ms_per_token"])
    lines = [("context",) + tuple(f"ms/token, {n}" for n in names)]
    lines += [(str(r["context"]),) + tuple(f"{r['ms_per_token'][n]:.3f}" for n in names) for r in rows]
    return text_table(lines)


def memory_check_line(mc: dict) -> str:
    """One line of a memory_check result (older results have no first run)."""
    line = f"memory growth over {mc['tokens']} decode steps: " + ", ".join(
        f"{k} {v:+.1f}" for k, v in mc["growth"].items())
    if "first_run" in mc:
        line += (f" (a second run; the first, which captured {mc['graphs']} decode steps: "
                 + ", ".join(f"{k} {v:+.1f}" for k, v in mc["first_run"].items()) + ")")
    return line


def fp16_contrast(config, ids, n: int, repeats: int, device: torch.device, bw: float | None, graph: bool,
                  reference_ms: float, decode_attention: bool | None = None) -> list[dict]:
    """A random fp16 model of the same config: this loop (static cache, CUDA graph) and HF generate()."""
    from transformers import AutoModelForCausalLM
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    roof = 1e3 * dense_roofline_bytes(dense) / bw if bw else None
    session = DecodeSession(dense, ids.shape[1] + n, cuda_graph=graph, decode_attention=decode_attention)
    ours = [session.generate(ids, n) for _ in range(repeats + 1)][1:]
    del session
    dense.config._attn_implementation = "sdpa"  # transformers' own attention (the session may have switched it)
    hf_ms = []
    ids_dev = ids.to(device)
    for tokens in (min(n, 8), n):  # a short warm-up, then one timed run: it is slow and steady
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dense.generate(ids_dev, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        hf_ms.append(1e3 * (time.perf_counter() - t0) / tokens)
    hf_ms = hf_ms[1:]
    del dense
    name = "fp16" if dtype == torch.float16 else "fp32"
    return [row(f"{name} dense, this loop", median_ms(ours), roof, reference_ms, ours[0].cuda_graph,
                "random weights, same shape"),
            row(f"{name} dense, HF generate()", statistics.median(hf_ms), roof, reference_ms, False,
                "eager, dynamic cache, prefill included")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model_dir = resolve_model_dir(args)
    model, tokenizer = load_for_generation(model_dir, args.device, args.dtype, args.no_decdec, args.k_chunk)
    if args.scales_on_host:
        decdec.configure(model, scales_on_host=True)
    device = torch.device(args.device)
    ids = prompt_ids(args, tokenizer, model.config.vocab_size)
    graph = device.type == "cuda" and not args.no_cuda_graph
    tuned = (model_dir / decdec.artifacts.TUNING_CONFIG).is_file()
    result = {"model_dir": str(model_dir), "device": device_name(device), "dtype": str(next(model.parameters()).dtype),
              "compile": args.compile, "sdpa_attention": args.sdpa_attention, "dependent_launch": ops.dependent_launch(),
              "prompt_tokens": ids.shape[1], "max_new_tokens": args.max_new_tokens, "tuned_config": tuned,
              "decdec": {g.kind: {"mode": g.mode, "k_chunk": g.k_chunk, "n_tb": g.n_tb,
                                  "scales_on_host": g.scales_on_host} for g in decdec.selection_groups(model)}}
    print(f"model {model_dir} on {result['device']} ({result['dtype']}); DecDEC "
          + ("off" if args.no_decdec else ", ".join(f"{k}: k_chunk {v['k_chunk']}" for k, v in result["decdec"].items()))
          + (" (tuned config)" if tuned and args.k_chunk is None and not args.no_decdec else ""), file=sys.stderr)
    if args.bench:
        result.update(run_bench(args, model, tokenizer, ids, graph))
        print(f"\ndecode benchmark, batch 1, {ids.shape[1]} prompt + {args.max_new_tokens} new tokens, "
              f"{result['device']}" + (f", memory bandwidth {result['memory_bandwidth_GBps']:.0f} GB/s"
                                       if result["memory_bandwidth_GBps"] else "")
              + (", residual scales in pinned host memory" if args.scales_on_host else ""))
        print(bench_table(result["rows"]))
        if "memory_check" in result:
            print(memory_check_line(result["memory_check"]))
        if "contexts" in result:
            print(context_table(result["contexts"]))
        if "profile" in result:
            print(profile_table(result["profile"]))
    else:
        session = DecodeSession(model, ids.shape[1] + args.max_new_tokens, cuda_graph=graph, compile=args.compile,
                                decode_attention=args.decode_attention)
        result.update(run_generate(args, model, tokenizer, ids, session))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
