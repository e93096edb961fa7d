"""Quantized weight formats in their canonical (on-disk, CPU) layout.

Both formats store integer codes row by row (one row per output channel) as a little-endian bit
stream: code i of a row occupies bits [i*bits, (i+1)*bits) of that row, the row padded to whole
bytes. The same packing holds the 4-bit residual rows (see ``residual.py``). GPU kernels convert
from this layout once at load time.

- ``UniformWeight``: group-wise asymmetric, w = (q - zero) * scale per group of ``group_size``
  input channels; the last group may be partial.
- ``LUTWeight``: per output channel lookup table of 2**bits fp16 centroids, w = lut[q].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
from torch import Tensor

SUPPORTED_BITS = (3, 4)


def packed_row_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [rows, n] (each < 2**bits) -> uint8 [rows, ceil(n*bits/8)] bit stream."""
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    nbytes = packed_row_bytes(n, bits)
    out = torch.empty(rows, nbytes, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    step = max(1, (1 << 22) // max(n, 1))  # bound the temporary bit-plane tensor
    for r0 in range(0, rows, step):
        block = codes[r0:r0 + step].to(torch.uint8)
        planes = ((block.unsqueeze(-1) >> shifts) & 1).reshape(block.shape[0], n * bits)
        planes = torch.nn.functional.pad(planes, (0, nbytes * 8 - n * bits))
        out[r0:r0 + step] = (planes.reshape(-1, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return out


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 [rows, nbytes] -> uint8 codes [rows, n]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_codes expects uint8 [rows, bytes], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_row_bytes(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_row_bytes(n, bits)} bytes per row, "
                         f"found {packed.shape[1]}")
    if bits == 4:  # fast path: one code per nibble
        return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :n]
    rows = packed.shape[0]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bit_weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.uint8))
    bitstream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, :n * bits]
    return (bitstream.reshape(rows, n, bits) * bit_weights).sum(-1, dtype=torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}: expected one of {SUPPORTED_BITS}")


def _check_weight(w: Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight [out, in], got {w.dtype} {tuple(w.shape)}")


@dataclass
class UniformWeight:
    """Group-wise asymmetric uniform quantization: w[j, c] = (q[j, c] - zeros[j, g]) * scales[j, g]."""

    packed: Tensor  # uint8 [out, ceil(in * bits / 8)]
    scales: Tensor  # fp16 [out, n_groups]
    zeros: Tensor  # uint8 [out, n_groups]
    bits: int
    group_size: int
    in_features: int
    format: ClassVar[str] = "uniform"

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @staticmethod
    def num_groups(in_features: int, group_size: int) -> int:
        return math.ceil(in_features / group_size)

    @classmethod
    def quantize(cls, w: Tensor, bits: int, group_size: int = 128, clip: Tensor | None = None) -> "UniformWeight":
        """Round-to-nearest. ``clip`` [out, n_groups] optionally bounds |w| per group before the
        min/max are taken (AWQ's clipping search produces it)."""
        q, scales, zeros = cls._round(w, bits, group_size, clip)
        out_f, in_f = w.shape
        codes = q.reshape(out_f, -1)[:, :in_f].to(torch.uint8)
        return cls(pack_codes(codes, bits), scales, zeros.to(torch.uint8), bits, group_size, in_f)

    @classmethod
    def fake_quantize(cls, w: Tensor, bits: int, group_size: int = 128, clip: Tensor | None = None) -> Tensor:
        """fp32 [out, in], bit-identical to ``quantize(...).dequantize()`` without packing the codes
        (for searches that try many candidates)."""
        q, scales, zeros = cls._round(w, bits, group_size, clip)
        deq = (q - zeros.unsqueeze(-1)) * scales.float().unsqueeze(-1)
        return deq.reshape(w.shape[0], -1)[:, :w.shape[1]]

    @classmethod
    def _round(cls, w: Tensor, bits: int, group_size: int, clip: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(fp32 codes [out, groups, group_size], fp16 scales [out, groups], fp32 zeros [out, groups])."""
        _check_weight(w)
        _check_bits(bits)
        out_f, in_f = w.shape
        if group_size < 1 or group_size > in_f:
            raise ValueError(f"group size {group_size} must be in 1..in_features ({in_f})")
        groups = cls.num_groups(in_f, group_size)
        grouped = _pad_to_groups(w.float(), group_size).reshape(out_f, groups, group_size)
        if clip is not None:
            bound = clip.float().reshape(out_f, groups, 1)
            grouped = torch.maximum(torch.minimum(grouped, bound), -bound)
        qmax = (1 << bits) - 1
        wmax = grouped.amax(-1).clamp(min=0)
        wmin = grouped.amin(-1).clamp(max=0)
        scales = ((wmax - wmin) / qmax).clamp(min=1e-5).half()
        s = scales.float()
        zeros = torch.round(-wmin / s).clamp(0, qmax)
        q = (torch.round(grouped / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, qmax)
        return q, scales, zeros

    def codes(self) -> Tensor:
        return unpack_codes(self.packed, self.bits, self.in_features)

    def dequantize(self) -> Tensor:
        """fp32 [out, in]."""
        group_of = torch.arange(self.in_features, device=self.packed.device) // self.group_size
        scale = self.scales.float()[:, group_of]
        zero = self.zeros.float()[:, group_of]
        return (self.codes().float() - zero) * scale

    def tensors(self) -> dict[str, Tensor]:
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}

    def metadata(self) -> dict:
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "UniformWeight":
        weight = cls(tensors["packed"], tensors["scales"], tensors["zeros"], meta["bits"], meta["group_size"],
                     meta["in_features"])
        groups = cls.num_groups(weight.in_features, weight.group_size)
        _expect_shape("packed", weight.packed, (meta["out_features"], packed_row_bytes(weight.in_features, weight.bits)))
        _expect_shape("scales", weight.scales, (meta["out_features"], groups))
        _expect_shape("zeros", weight.zeros, (meta["out_features"], groups))
        return weight

    def to(self, device: torch.device | str) -> "UniformWeight":
        return UniformWeight(self.packed.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
                             self.group_size, self.in_features)


@dataclass
class LUTWeight:
    """Per-output-channel lookup table: w[j, c] = lut[j, q[j, c]]."""

    packed: Tensor  # uint8 [out, ceil(in * bits / 8)]
    lut: Tensor  # fp16 [out, 2**bits]
    bits: int
    in_features: int
    format: ClassVar[str] = "lut"

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @classmethod
    def from_codes(cls, codes: Tensor, lut: Tensor, bits: int) -> "LUTWeight":
        _check_bits(bits)
        if lut.shape != (codes.shape[0], 1 << bits):
            raise ValueError(f"lut must be [out, {1 << bits}], got {tuple(lut.shape)}")
        if codes.numel() and int(codes.max()) >= (1 << bits):
            raise ValueError(f"codes exceed {bits} bits")
        return cls(pack_codes(codes.to(torch.uint8), bits), lut.half(), bits, codes.shape[1])

    @classmethod
    def quantize_nearest(cls, w: Tensor, lut: Tensor, bits: int) -> "LUTWeight":
        """Assigns every weight to its nearest centroid of its row's table."""
        _check_weight(w)
        lut16 = lut.half()
        codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
        step = max(1, (1 << 22) // (w.shape[1] * (1 << bits)))
        for r0 in range(0, w.shape[0], step):
            dist = (w[r0:r0 + step].float().unsqueeze(-1) - lut16[r0:r0 + step].float().unsqueeze(1)).abs()
            codes[r0:r0 + step] = dist.argmin(-1).to(torch.uint8)
        return cls.from_codes(codes, lut16, bits)

    def codes(self) -> Tensor:
        return unpack_codes(self.packed, self.bits, self.in_features)

    def dequantize(self) -> Tensor:
        """fp32 [out, in]."""
        return self.lut.float().gather(1, self.codes().long())

    def tensors(self) -> dict[str, Tensor]:
        return {"packed": self.packed, "lut": self.lut}

    def metadata(self) -> dict:
        return {"format": self.format, "bits": self.bits, "in_features": self.in_features,
                "out_features": self.out_features}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "LUTWeight":
        weight = cls(tensors["packed"], tensors["lut"], meta["bits"], meta["in_features"])
        _expect_shape("packed", weight.packed, (meta["out_features"], packed_row_bytes(weight.in_features, weight.bits)))
        _expect_shape("lut", weight.lut, (meta["out_features"], 1 << weight.bits))
        return weight

    def to(self, device: torch.device | str) -> "LUTWeight":
        return LUTWeight(self.packed.to(device), self.lut.to(device), self.bits, self.in_features)


QuantizedWeight = Union[UniformWeight, LUTWeight]
WEIGHT_FORMATS: dict[str, type] = {"uniform": UniformWeight, "lut": LUTWeight}


def weight_from_tensors(tensors: dict[str, Tensor], meta: dict) -> QuantizedWeight:
    fmt = meta.get("format")
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: expected one of {sorted(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[fmt].from_tensors(tensors, meta)


def _pad_to_groups(w: Tensor, group_size: int) -> Tensor:
    """Pads the input dimension to whole groups by repeating the last column (min/max unchanged)."""
    pad = -w.shape[1] % group_size
    if pad == 0:
        return w
    return torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)


def _expect_shape(name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r}: expected shape {tuple(shape)}, found {tuple(t.shape)}")
