"""AWQ: activation-aware per-input-channel scaling, then per-group clipping, on uniform weights.

Per decoder block, on calibration activations:

1. For each group of linears reading one input x, the scale s = mean|x|^a / sqrt(max * min) is
   searched over a = 0, 1/20, ..., 19/20; the weights become Q(W diag(s)) and 1/s is folded into the
   op that produced x. The error minimised is the output error of the group's linears,
   sum_j ||(Ŵ_j - W_j) x||^2 over all calibration tokens, computed exactly from H = sum x x^T
   (one pass of the block collects H; no activations are kept). The original AWQ measures the
   error at the output of the enclosing module (attention or MLP); the linear outputs are cheaper
   and keep the method generic.
2. Each linear's clipping bound per (output channel, group) is searched over ratios 1, 0.95, ...,
   0.55 of the group's max |w|, with the same exact error restricted to the group's channels.

Folding is found structurally and checked numerically on block 0 (blocks are identical modules):
a candidate is a normalization weight or a linear's block of output rows that ran before the
group; it is accepted when multiplying it by a random positive vector multiplies the group's input
by exactly that vector. This finds RMSNorm -> q/k/v and gate/up, up -> down (also Phi-3's fused
gate_up_proj, through its up half), and v -> o when v_proj has as many outputs as o_proj has
inputs. Under grouped-query attention (more query than key/value heads, e.g. SmolLM2, Llama-3)
v -> o does not fold, and the fused Phi-3 qkv_proj folds into o_proj only without GQA; such groups
keep s = 1 and get the clip search only, as in the original AWQ.

For DecDEC the "original" weight of a linear is W diag(in_scale) diag(out_scale) (its own input
scale and the inverse scales folded into its rows): :func:`scaled_weight`, stored per linear so
that the cheatsheet can be rebuilt from the original model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..formats import UniformWeight
from ..patching import block_linears, kind_name
from .blockwise import BlockRunner, watch_inputs

N_GRID = 20
CLIP_RATIOS = [1 - i / 20 for i in range(10)]
FOLD_TOLERANCE = 1e-2  # relative error of the folding check; a wrong candidate is off by far more


def scaled_weight(w: Tensor, in_scale: Tensor | None = None, out_scale: Tensor | None = None) -> Tensor:
    """fp32 W * in_scale[None, :] * out_scale[:, None]: the weight AWQ quantizes. Setup and
    cheatsheet both call this, so the residual is rebuilt bit for bit."""
    w = w.float()
    if in_scale is not None:
        w = w * in_scale.float().unsqueeze(0)
    if out_scale is not None:
        w = w * out_scale.float().unsqueeze(1)
    return w


@dataclass
class Fold:
    """Where 1/s of a group's input scale goes: a norm-like module's weight (and bias), or rows
    [offset, offset + d) of a linear's output."""
    module: str
    is_linear: bool
    offset: int = 0


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> Tensor:
    """sum over tokens of ||(w_hat - w) x||^2 given h = sum x x^T."""
    d = w_hat - w
    return ((d @ h) * d).sum()


def search_scale(weights: list[Tensor], h: Tensor, x_mean: Tensor, bits: int, group_size: int) -> Tensor:
    """The per-input-channel scale of one group (fp32 [d_in])."""
    best_err, best = float("inf"), torch.ones_like(x_mean)
    for step in range(N_GRID):
        s = x_mean.pow(step / N_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float(output_error(w, UniformWeight.fake_quantize(w * s, bits, group_size) / s, h))
                  for w in weights)
        if err < best_err:
            best_err, best = err, s
    return best


def search_clip(w: Tensor, h: Tensor, bits: int, group_size: int) -> Tensor:
    """fp32 [out, n_groups]: the clipping bound per group minimising that group's output error."""
    out_f, in_f = w.shape
    groups = UniformWeight.num_groups(in_f, group_size)
    pad = groups * group_size - in_f
    h_blocks = torch.nn.functional.pad(h, (0, pad, 0, pad)).reshape(groups, group_size, groups, group_size)
    h_diag = torch.stack([h_blocks[g, :, g, :] for g in range(groups)])  # [G, gs, gs]
    w_groups = torch.nn.functional.pad(w, (0, pad)).reshape(out_f, groups, group_size)
    max_abs = w_groups.abs().amax(-1)
    best_err = torch.full((out_f, groups), float("inf"), device=w.device)
    best = max_abs.clone()
    for ratio in CLIP_RATIOS:
        bound = max_abs * ratio
        d = UniformWeight.fake_quantize(w, bits, group_size, clip=bound) - w
        d = torch.nn.functional.pad(d, (0, pad)).reshape(out_f, groups, group_size)
        err = torch.einsum("jgs,gst,jgt->jg", d, h_diag, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, bound, best)
    return best


def _group_input(block: nn.Module, name: str, run) -> Tensor:
    seen: list[Tensor] = []
    with watch_inputs({name: block.get_submodule(name)}, lambda _, x: seen.append(x.clone())):
        run()
    return seen[0]


@torch.no_grad()
def find_folds(block: nn.Module, groups: list[list[str]], run) -> dict[str, Fold | None]:
    """kind -> where its input scale folds (None: nowhere); ``run()`` runs the block once."""
    linears = block_linears(block)
    order: list[str] = []
    candidates = {name: m for name, m in block.named_modules()
                  if name and (isinstance(m, nn.Linear) or _norm_weight(m) is not None)}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
             for name, m in candidates.items()]
    try:
        run()
    finally:
        for hk in hooks:
            hk.remove()
    gen = torch.Generator().manual_seed(0)
    folds: dict[str, Fold | None] = {}
    for group in groups:
        d = linears[group[0]].in_features
        x0 = _group_input(block, group[0], run)
        first_call = order.index(group[0])
        folds[kind_name(group)] = None
        for name in dict.fromkeys(order[:first_call]):  # modules that ran before the group, once each
            if name in group:
                continue
            m = candidates[name]
            options = ([] if not isinstance(m, nn.Linear) or m.out_features < d else
                       [Fold(name, True, off) for off in dict.fromkeys((0, m.out_features - d))])
            if not isinstance(m, nn.Linear) and _norm_weight(m).numel() == d:
                options.append(Fold(name, False))
            for fold in options:
                s = torch.empty(d).uniform_(0.5, 2.0, generator=gen).to(x0.device)
                saved = {k: v.clone() for k, v in m.state_dict().items()}
                _apply_fold(block, fold, 1 / s)  # folding 1/s' with s' = 1/s multiplies the input by s
                x1 = _group_input(block, group[0], run)
                m.load_state_dict(saved)
                expected = x0.float() * s
                if float((x1.float() - expected).norm() / expected.norm()) < FOLD_TOLERANCE:
                    folds[kind_name(group)] = fold
                    break
            if folds[kind_name(group)] is not None:
                break
    return folds


def _norm_weight(m: nn.Module) -> Tensor | None:
    w = getattr(m, "weight", None)
    return w if isinstance(w, Tensor) and w.dim() == 1 else None


def _apply_fold(block: nn.Module, fold: Fold, s: Tensor) -> None:
    """Divides the output of the fold target by s (per channel), in place."""
    m = block.get_submodule(fold.module)
    rows = slice(fold.offset, fold.offset + s.numel())
    if fold.is_linear:
        m.weight.data[rows] = (m.weight.data[rows].float() / s.unsqueeze(1)).to(m.weight.dtype)
    else:
        m.weight.data = (m.weight.data.float() / s).to(m.weight.dtype)
    bias = getattr(m, "bias", None)
    if isinstance(bias, Tensor):
        bias.data[rows] = (bias.data[rows].float() / s).to(bias.dtype)


@torch.no_grad()
def quantize_awq(runner: BlockRunner, groups: list[list[str]], block_bits: list[int], group_size: int
                 ) -> tuple[list[dict[str, UniformWeight]], dict[str, Tensor], dict]:
    """(quantized linears per block, scale tensors "<blocks>.<i>.<linear>.{in,out}_scale", notes).

    Norm weights and linear biases of the runner's model are updated in place with the folded
    scales (they are stored as they must be used); linear weights stay original.
    """
    folds: dict[str, Fold | None] = {}
    quantized, scales = [], {}
    for i, block in runner.iterate("AWQ blocks"):
        if i == 0:
            folds = find_folds(block, groups, lambda: runner.run_block(block, runner.hidden[0]))
        linears = block_linears(block)
        bits = block_bits[i]
        stats = {kind_name(g): [0, 0, 0] for g in groups}  # H, sum |x|, tokens

        def observe(kind: str, x: Tensor) -> None:
            xf = x.float()
            st = stats[kind]
            st[0] = st[0] + xf.t() @ xf
            st[1] = st[1] + xf.abs().sum(0)
            st[2] += xf.shape[0]

        with watch_inputs({kind_name(g): linears[g[0]] for g in groups}, observe):
            outputs = runner.outputs(block)
        in_scale: dict[str, Tensor] = {}
        out_scale: dict[str, Tensor] = {}
        for group in groups:
            kind = kind_name(group)
            fold = folds[kind]
            if fold is None:
                continue
            h, abs_sum, n = stats[kind]
            s = search_scale([linears[name].weight.float() for name in group], h, abs_sum / n, bits, group_size)
            for name in group:
                in_scale[name] = s
            if fold.is_linear:
                target = linears[fold.module]
                rows = out_scale.setdefault(fold.module, torch.ones(target.out_features, device=s.device))
                rows[fold.offset:fold.offset + s.numel()] /= s
                bias = target.bias
                if bias is not None:
                    bias.data[fold.offset:fold.offset + s.numel()] /= s.to(bias.dtype)
            else:
                _apply_fold(block, fold, s)
        block_q = {}
        for group in groups:
            h = stats[kind_name(group)][0]
            for name in group:
                s_in = in_scale.get(name)
                w = scaled_weight(linears[name].weight, s_in, out_scale.get(name))
                h_s = h if s_in is None else h / (s_in.unsqueeze(0) * s_in.unsqueeze(1))
                clip = search_clip(w, h_s, bits, group_size)
                block_q[name] = UniformWeight.quantize(w, bits, group_size, clip=clip).to("cpu")
        for name, t in list(in_scale.items()):
            scales[f"{runner.blocks_name}.{i}.{name}.in_scale"] = t.cpu().clone()
        for name, t in out_scale.items():
            scales[f"{runner.blocks_name}.{i}.{name}.out_scale"] = t.cpu()
        quantized.append(block_q)
        # the folded block computes the same function: its fp outputs feed the next block
        runner.hidden = outputs
    notes = {"awq_folds": {kind: (None if f is None else f.module + (f"[{f.offset}:]" if f.offset else ""))
                           for kind, f in folds.items()}}
    return quantized, scales, notes
