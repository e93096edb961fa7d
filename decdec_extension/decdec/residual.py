"""The residual "cheatsheet" of one linear: R = W - deq(Q(W)), 4-bit symmetric per output channel.

Layout (DESIGN.md): one contiguous row per *input* channel, so fetching channel c reads
``out_features / 2`` contiguous bytes; output channel j sits in nibble j of the row (byte j // 2,
low nibble for even j) as ``q + 8`` with q in -7..7. Scales are fp16 [out_features].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .formats import pack_codes, packed_row_bytes, unpack_codes

NUM_SCALE_CANDIDATES = 32
QMAX = 7


@dataclass
class ResidualPack:
    packed: Tensor  # uint8 [in_features, ceil(out_features / 2)]
    scales: Tensor  # fp16 [out_features]

    @property
    def in_features(self) -> int:
        return self.packed.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    def validate(self) -> None:
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 2:
            raise ValueError(f"residual packed must be uint8 [in, out/2], got {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}")
        if self.scales.dtype != torch.float16 or self.scales.dim() != 1:
            raise ValueError(f"residual scales must be fp16 [out], got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.packed.shape[1] != packed_row_bytes(self.out_features, 4):
            raise ValueError(f"residual rows hold {self.packed.shape[1]} bytes, {self.out_features} output "
                             f"channels need {packed_row_bytes(self.out_features, 4)}")

    def nibbles(self) -> Tensor:
        """uint8 [in, out]: the stored q + 8 of every (input channel, output channel)."""
        return unpack_codes(self.packed, 4, self.out_features)

    def pin_memory(self) -> "ResidualPack":
        return ResidualPack(self.packed.cpu().pin_memory(), self.scales.cpu().pin_memory())


def _scale_candidates(max_abs: Tensor) -> Tensor:
    """[rows] fp32 -> [rows, 32]: linspace(m/32, m, 32) with m = max|r| / 7, in fp32, then rounded
    to fp16 (returned as fp32 holding fp16 values). Element i = m/32 + (m - m/32) * i / 31."""
    m = max_abs / QMAX
    first = m / NUM_SCALE_CANDIDATES
    steps = torch.arange(NUM_SCALE_CANDIDATES, device=m.device, dtype=torch.float32)
    cands = first.unsqueeze(1) + (m - first).unsqueeze(1) * steps / (NUM_SCALE_CANDIDATES - 1)
    return cands.half().float()


def quantize_residual(r: Tensor) -> ResidualPack:
    """Quantizes a residual [out, in] to a :class:`ResidualPack` (DESIGN.md, "Residuals")."""
    if r.dim() != 2 or not r.is_floating_point():
        raise ValueError(f"expected a floating-point residual [out, in], got {r.dtype} {tuple(r.shape)}")
    out_f, in_f = r.shape
    scales = torch.empty(out_f, dtype=torch.float16, device=r.device)
    nibbles = torch.empty(out_f, in_f, dtype=torch.uint8, device=r.device)
    step = max(1, (1 << 23) // max(in_f, 1))
    for r0 in range(0, out_f, step):
        rows = r[r0:r0 + step].float()
        cands = _scale_candidates(rows.abs().amax(1))
        best_err = torch.full((rows.shape[0],), float("inf"), device=r.device)
        best_scale = torch.zeros(rows.shape[0], device=r.device)
        best_q = torch.zeros_like(rows)
        for i in range(NUM_SCALE_CANDIDATES):
            s = cands[:, i:i + 1]
            # an all-zero row (or one below fp16 range) has only s = 0: it keeps s = 0 and nibbles 8
            q = torch.where(s > 0, torch.round(rows / s).clamp(-QMAX, QMAX), torch.zeros_like(rows))
            err = (q * s - rows).square().mean(1)
            better = err < best_err  # strict: ties keep the earlier, smaller scale
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s.squeeze(1), best_scale)
            best_q = torch.where(better.unsqueeze(1), q, best_q)
        scales[r0:r0 + step] = best_scale.half()
        nibbles[r0:r0 + step] = (best_q + 8).to(torch.uint8)
    return ResidualPack(pack_codes(nibbles.t().contiguous(), 4), scales)


def dequantize_residual(pack: ResidualPack) -> Tensor:
    """fp32 [out, in]: (nibble - 8) * scale."""
    return (pack.nibbles().float() - 8).t() * pack.scales.float().unsqueeze(1)


def residual_correction(x: Tensor, channels: Tensor, pack: ResidualPack) -> Tensor:
    """fp32 [..., out]: for every token, sum over its selected channels c of x[c] * R_hat[:, c].

    ``x`` [..., in] and ``channels`` int64 [..., k] share their leading shape. Only the selected
    rows of the residual are read (they may live in host memory while x is on the GPU).
    """
    if x.shape[-1] != pack.in_features:
        raise ValueError(f"x has {x.shape[-1]} input channels, the residual {pack.in_features}")
    if channels.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"channels {tuple(channels.shape)} do not match x {tuple(x.shape)}")
    lead, k = x.shape[:-1], channels.shape[-1]
    out = torch.zeros(*lead, pack.out_features, dtype=torch.float32, device=x.device)
    if k == 0:
        return out
    x2 = x.reshape(-1, x.shape[-1])
    ch2 = channels.reshape(-1, k)
    out2 = out.view(-1, pack.out_features)
    scales = pack.scales.to(x.device).float()
    step = max(1, (1 << 24) // (k * pack.out_features))  # bound the unpacked [tokens, k, out] block
    for t0 in range(0, x2.shape[0], step):
        ch = ch2[t0:t0 + step]
        rows = pack.packed[ch.to(pack.packed.device)].to(x.device)  # [t, k, out/2]
        nib = unpack_codes(rows.reshape(-1, rows.shape[-1]), 4, pack.out_features)
        r_int = nib.float().sub_(8).reshape(ch.shape[0], k, pack.out_features)
        xs = x2[t0:t0 + step].gather(1, ch).float()
        out2[t0:t0 + step] = torch.einsum("tk,tko->to", xs, r_int) * scales
    return out
