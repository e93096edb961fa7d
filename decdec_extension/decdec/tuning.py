"""Tuning n_tb and k_chunk per linear kind: the cost table, the analytic cost model and the
paper's two-phase search.

A model's DecDEC work is described per *workload*: one kind of linear group (q/k/v, o, gate/up,
down) at one base bit width, with the shapes of its linears and how many decoder blocks hold it.
A :class:`CostTable` gives, for every workload, the time of one block's group without DecDEC
(the baseline) and with DecDEC over a grid of (n_tb, k_chunk). Tables come from GPU measurements
(``autotuner/tune.py``) or from :func:`analytic_table` (``--dry-run``); :func:`search` only sees
the table.

The search (DecDEC, OSDI 2025, the tuner): the model time is the sum over workloads of count x
time, and a configuration is allowed when that sum stays within (1 + target) x the baseline sum.
Given the time per token spent outside the linears (``other``: attention, norms, lm_head, as a
measured decode step shows), the target is a share of the whole step instead: the sum plus
``other`` stays within (1 + target) x (baseline sum + ``other``).

- Phase 1: for each cap on n_tb (one cap for all kinds; each kind then uses the n_tb under the cap
  that makes it fastest, the smaller one on a tie), advance every kind together through the
  k_chunk grid and keep the furthest step that fits; the cap reaching the furthest step wins.
  If not even the first step fits, the kind with the smallest matrices is pinned to k_chunk 0 and
  phase 1 runs again on the others.
- Phase 2: with that cap, raise k_chunk one grid step at a time for one kind at a time, always
  the step that adds the least time, while the budget holds.

The table times each kind alone; inside a decode step (other kernels around it, torch.compile)
the same configuration can cost more or less. :func:`search_measured` closes the loop: it
measures each searched configuration and searches again, aiming the prediction by how far the
measurement missed it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .formats import packed_row_bytes
from .patching import kind_label, kind_name
from .selection import CHUNK_SIZE, num_selected

# k_chunk steps: fine where the fetch starts to show (the knee is 10-20 on current GPUs), coarse above
K_GRID = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)
# a measured time above this multiple of the baseline ends the sweep of that (kind, n_tb): no sane
# budget reaches it, and every further k_chunk is slower still
STOP_ABOVE = 1.5
# two per-kind times closer than this (relative) count as equal: the smaller n_tb is kept
TIE_TOLERANCE = 0.005


@dataclass(frozen=True)
class Workload:
    """One linear group kind at one bit width: its linears' (in, out) shapes, the weight bytes the
    base GEMVs read per block, and the number of blocks that hold it."""

    kind: str
    bits: int
    shapes: tuple[tuple[int, int], ...]
    weight_bytes: int
    count: int

    @property
    def key(self) -> str:
        return f"{self.kind}@{self.bits}bit"

    def fetch_bytes(self, k_chunk: int, chunk_size: int = CHUNK_SIZE) -> int:
        """Residual bytes one token fetches for this group: k selected rows of out/2 bytes per linear."""
        return sum(num_selected(i, k_chunk, chunk_size) * packed_row_bytes(o, 4) for i, o in self.shapes)


def weight_bytes(meta: dict) -> int:
    """Bytes a base GEMV reads for one quantized linear (codes plus scales/zeros or LUT)."""
    out_f, in_f, bits = meta["out_features"], meta["in_features"], meta["bits"]
    codes = out_f * packed_row_bytes(in_f, bits)
    if meta["format"] == "uniform":
        return codes + out_f * math.ceil(in_f / meta["group_size"]) * 3  # fp16 scale + uint8 zero
    if meta["format"] == "lut":
        return codes + out_f * (1 << bits) * 2
    raise ValueError(f"unknown weight format {meta['format']!r}")


def workloads_from_quant_config(quant_config: dict) -> list[Workload]:
    """The workloads of a prepared model (quant_config.json): one per (kind, block bit width)."""
    found: dict[tuple[str, int], Workload] = {}
    for layer in quant_config["layers"]:
        for group in quant_config["groups"]:
            metas = [layer[name] for name in group]
            bits = metas[0]["bits"]
            key = (kind_name(group), bits)
            prev = found.get(key)
            if prev is None:
                shapes = tuple((m["in_features"], m["out_features"]) for m in metas)
                found[key] = Workload(key[0], bits, shapes, sum(weight_bytes(m) for m in metas), 1)
            else:
                found[key] = Workload(prev.kind, bits, prev.shapes, prev.weight_bytes, prev.count + 1)
    return list(found.values())


# ---------------------------------------------------------------- cost table

@dataclass
class CostTable:
    """Per workload key: ``baseline[key]`` seconds per block without DecDEC and
    ``times[key][n_tb][i]`` seconds per block at ``k_grid[i]`` (inf where not measured)."""

    workloads: list[Workload]
    n_tb_grid: list[int]
    k_grid: list[int]
    baseline: dict[str, float]
    times: dict[str, dict[int, list[float]]]
    source: str  # "measured" or "analytic"

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(w.kind for w in self.workloads))

    def kind_baseline(self, kind: str) -> float:
        return sum(w.count * self.baseline[w.key] for w in self.workloads if w.kind == kind)

    def kind_time(self, kind: str, n_tb: int, k_index: int) -> float:
        """Model seconds of ``kind`` at one (n_tb, k_chunk) summed over its blocks."""
        if k_index == 0:
            return self.kind_baseline(kind)
        return sum(w.count * self.times[w.key][n_tb][k_index] for w in self.workloads if w.kind == kind)

    def kind_weight_bytes(self, kind: str) -> int:
        """Bytes of one block's group of this kind (the largest bit width): what "smallest matrix" means."""
        return max(w.weight_bytes for w in self.workloads if w.kind == kind)

    def to_json(self) -> dict:
        def finite(v: float) -> float | None:
            return v * 1e6 if math.isfinite(v) else None
        return {
            "source": self.source, "unit": "us per block", "n_tb_grid": self.n_tb_grid, "k_grid": self.k_grid,
            "workloads": [{"kind": w.kind, "bits": w.bits, "shapes": [list(s) for s in w.shapes],
                           "weight_bytes": w.weight_bytes, "count": w.count,
                           "baseline": self.baseline[w.key] * 1e6,
                           "times": {str(n): [finite(v) for v in row] for n, row in self.times[w.key].items()}}
                          for w in self.workloads],
        }

    @classmethod
    def from_json(cls, data: dict) -> "CostTable":
        workloads, baseline, times = [], {}, {}
        for entry in data["workloads"]:
            w = Workload(entry["kind"], entry["bits"], tuple(tuple(s) for s in entry["shapes"]),
                         entry["weight_bytes"], entry["count"])
            workloads.append(w)
            baseline[w.key] = entry["baseline"] * 1e-6
            times[w.key] = {int(n): [math.inf if v is None else v * 1e-6 for v in row]
                            for n, row in entry["times"].items()}
        return cls(workloads, list(data["n_tb_grid"]), list(data["k_grid"]), baseline, times, data["source"])


def n_tb_grid(n_tb_max: int) -> list[int]:
    """Powers of two and three times powers of two up to ``n_tb_max``, and ``n_tb_max`` itself.

    The points between the powers of two matter: the GEMV's row tiles are spread over the blocks
    the DEC blocks leave, and whether some SMs get one more round of tiles changes between
    neighbouring n_tb (KERNEL_NOTES.md, 3-bit gate/up at n_tb 12 against 8 and 16)."""
    if n_tb_max < 1:
        raise ValueError(f"n_tb_max must be at least 1, got {n_tb_max}")
    grid = sorted({m << i for m in (1, 3) for i in range(n_tb_max.bit_length()) if m << i <= n_tb_max})
    return grid if grid[-1] == n_tb_max else grid + [n_tb_max]


@dataclass(frozen=True)
class AnalyticGPU:
    """The dry-run cost model of one GPU.

    GEMV time = weight bytes / memory bandwidth. Fetch time = residual bytes / fetch bandwidth,
    where the zero-copy fetch is latency-bound: each DEC thread block keeps a fixed number of loads
    in flight, so the fetch bandwidth grows with n_tb until ``saturating_tbs`` blocks fill the
    link. The fetch runs beside the GEMV and shows only where it takes longer: time = max(GEMV,
    fetch) + ``dec_overhead`` per linear whenever DecDEC is on (a fixed cost of launching and
    synchronising the DEC work; 0 by default). With a saturated link and no overhead the knee sits
    at 1024 / R_bw * b / 4 (DESIGN.md).
    """

    mem_bw: float  # bytes/s
    pcie_bw: float  # bytes/s
    sms: int
    saturating_tbs: int = 16
    dec_overhead: float = 0.0  # seconds per linear

    def fetch_bw(self, n_tb: int) -> float:
        return self.pcie_bw * min(1.0, n_tb / self.saturating_tbs)

    def gemv_time(self, w: Workload) -> float:
        return w.weight_bytes / self.mem_bw

    def time(self, w: Workload, n_tb: int, k_chunk: int) -> float:
        gemv = self.gemv_time(w)
        if k_chunk == 0:
            return gemv
        return max(gemv, w.fetch_bytes(k_chunk) / self.fetch_bw(n_tb)) + self.dec_overhead * len(w.shapes)


def analytic_table(workloads: list[Workload], gpu: AnalyticGPU, n_tb_max: int | None = None,
                   k_grid: tuple[int, ...] = K_GRID) -> CostTable:
    grid = n_tb_grid(n_tb_max or gpu.sms)
    baseline = {w.key: gpu.gemv_time(w) for w in workloads}
    times = {w.key: {n: [gpu.time(w, n, k) for k in k_grid] for n in grid} for w in workloads}
    return CostTable(list(workloads), grid, list(k_grid), baseline, times, "analytic")


def knee(mem_bw: float, pcie_bw: float, bits: float) -> float:
    """k_chunk where the fetch stops hiding behind the base GEMV: 1024 / R_bw * b / 4."""
    return CHUNK_SIZE / (mem_bw / pcie_bw) * bits / 4


# ---------------------------------------------------------------- search

@dataclass
class TuneResult:
    kinds: dict[str, dict[str, int]]  # kind -> {"n_tb", "k_chunk"}
    cap: int  # the n_tb cap of phase 1
    pinned: list[str]  # kinds pinned to k_chunk 0
    phase1_k_chunk: int  # the uniform k_chunk phase 1 reached
    baseline: float  # model seconds per token (summed linears) without DecDEC
    predicted: float  # ... with the result
    steps: list[str] = field(default_factory=list)  # what the search did, for the log
    other: float = 0.0  # seconds per token outside the linears that the target counted

    @property
    def predicted_slowdown(self) -> float:
        return slowdown(self.predicted, self.baseline, self.other)


def slowdown(total: float, baseline: float, other: float = 0.0) -> float:
    """Relative slowdown of the summed linears ``total`` over ``baseline``, counted on the whole
    step when ``other`` gives its time outside the linears."""
    return (total + other) / (baseline + other) - 1


def _best_n_tb(table: CostTable, kind: str, cap: int, k_index: int) -> tuple[int, float]:
    """(n_tb, model seconds) of the fastest n_tb <= cap at one k_chunk; ties go to fewer blocks."""
    best_n, best_t = table.n_tb_grid[0], math.inf
    for n in table.n_tb_grid:
        if n > cap:
            break
        t = table.kind_time(kind, n, k_index)
        if t < best_t * (1 - TIE_TOLERANCE):
            best_n, best_t = n, t
    return best_n, best_t


def _total(table: CostTable, cap: int, state: dict[str, int]) -> float:
    return sum(_best_n_tb(table, kind, cap, i)[1] for kind, i in state.items())


def search(table: CostTable, target: float, other: float = 0.0) -> TuneResult:
    """The two-phase search for a slowdown ``target`` (a fraction: 0.025 for 2.5 %) of the summed
    linears, or of the whole decode step when ``other`` gives its seconds outside them."""
    if target < 0:
        raise ValueError(f"target slowdown must be >= 0, got {target}")
    if other < 0:
        raise ValueError(f"the time outside the linears must be >= 0, got {other}")
    kinds = table.kinds
    if not kinds:
        raise ValueError("the cost table holds no workloads")
    baseline = sum(table.kind_baseline(k) for k in kinds)
    budget = (1 + target) * (baseline + other) - other
    steps: list[str] = []
    pinned: list[str] = []

    # phase 1: one cap, uniform steps; pin the smallest kind while nothing fits
    cap, step = table.n_tb_grid[0], 0
    while True:
        free = [k for k in kinds if k not in pinned]
        best: tuple[int, float, int] | None = None  # (step, -total, -cap): larger is better
        for c in table.n_tb_grid:
            s = 0
            while s + 1 < len(table.k_grid):
                state = {k: (s + 1 if k in free else 0) for k in kinds}
                if _total(table, c, state) > budget:
                    break
                s += 1
            if s == 0:
                continue
            candidate = (s, -_total(table, c, {k: (s if k in free else 0) for k in kinds}), -c)
            if best is None or candidate > best:
                best = candidate
        if best is not None:
            step, cap = best[0], -best[2]
            steps.append(f"phase 1: n_tb cap {cap}, k_chunk {table.k_grid[step]} for {', '.join(free)}")
            break
        smallest = min(free, key=table.kind_weight_bytes)
        pinned.append(smallest)
        steps.append(f"phase 1: no uniform k_chunk fits; pinning {smallest} to k_chunk 0")
        if len(pinned) == len(kinds):
            steps.append("phase 1: every kind pinned: DecDEC off")
            break

    # phase 2: raise one kind at a time, the cheapest step first
    state = {k: (0 if k in pinned else step) for k in kinds}
    total = _total(table, cap, state)
    while True:
        options = []
        for k in kinds:
            if k in pinned or state[k] + 1 >= len(table.k_grid):
                continue
            trial = {**state, k: state[k] + 1}
            t = _total(table, cap, trial)
            if t <= budget:
                options.append((t - total, k, t))
        if not options:
            break
        _, k, total = min(options)
        state[k] += 1
        steps.append(f"phase 2: {k} -> k_chunk {table.k_grid[state[k]]} "
                     f"(predicted slowdown {100 * slowdown(total, baseline, other):.2f} %)")

    result = {}
    for k in kinds:
        n, _ = _best_n_tb(table, k, cap, state[k])
        result[k] = {"n_tb": n, "k_chunk": table.k_grid[state[k]]}
    return TuneResult(result, cap, pinned, table.k_grid[step], baseline, total, steps, other)


def settings_text(kinds: dict[str, dict[str, int]]) -> str:
    """A tuned config's ``kinds`` as one line, "k_chunk/n_tb" per kind under its first linear's name."""
    return ", ".join(f"{kind_label(k)} {v['k_chunk']}/{v['n_tb']}" for k, v in kinds.items())


# one round of search_measured scales a prediction by at most these factors, so that one noisy or
# far-off measurement cannot send the next round to an extreme
GOAL_SCALE = (0.5, 2.0)


@dataclass(frozen=True)
class MeasuredRound:
    """One round of :func:`search_measured`: the target the search was given, the configuration
    it chose, and that configuration's predicted and measured slowdowns (fractions)."""
    goal: float
    kinds: dict[str, dict[str, int]]
    predicted: float
    measured: float


def _decdec_off(table: CostTable, other: float, reason: str) -> TuneResult:
    """The configuration with k_chunk 0 for every kind, as a search result."""
    kinds = {k: {"n_tb": table.n_tb_grid[0], "k_chunk": 0} for k in table.kinds}
    baseline = sum(table.kind_baseline(k) for k in table.kinds)
    return TuneResult(kinds, table.n_tb_grid[0], list(table.kinds), 0, baseline, baseline, [reason], other)


def search_measured(table: CostTable, target: float, other: float, measure: Callable[[dict], float],
                    rounds: int) -> tuple[TuneResult, list[MeasuredRound]]:
    """:func:`search` closed by measurement. Each round searches with a goal (first: ``target``),
    ``measure(kinds)`` returns that configuration's real slowdown, and the next goal is its
    predicted slowdown times target / measured (within ``GOAL_SCALE``): a table that over- or
    under-predicts the step is corrected by what the step does. Stops after ``rounds`` rounds or
    when a goal gives a configuration already measured. Returns the configuration that
    compensates the most (the largest predicted time) among those measured within ``target``
    (DecDEC off when none was), and the rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    goal, log, best = target, [], None
    for _ in range(rounds):
        result = search(table, goal, other)
        if any(r.kinds == result.kinds for r in log):
            break
        measured = measure(result.kinds)
        log.append(MeasuredRound(goal, result.kinds, result.predicted_slowdown, measured))
        if measured <= target and (best is None or result.predicted > best.predicted):
            best = result
        # the step's cost taken as proportional to the table's: aim the prediction where the
        # measurement would meet the target
        scale = target / measured if measured > 0 else GOAL_SCALE[1]
        goal = max(result.predicted_slowdown, 0.0) * min(max(scale, GOAL_SCALE[0]), GOAL_SCALE[1])
    if best is None:
        best = _decdec_off(table, other, f"no configuration measured within {100 * target:.2f} %: DecDEC off")
    return best, log


# ---------------------------------------------------------------- measurement

def _workload_modules(model, workload: Workload) -> list[list]:
    """Per block holding ``workload``: its DecDECLinear modules of that kind (the group's linears)."""
    quant_config = model.decdec_quant_config
    blocks = model.get_submodule(quant_config["blocks"])
    group = next(g for g in quant_config["groups"] if kind_name(g) == workload.kind)
    return [[blocks[i].get_submodule(name) for name in group]
            for i, layer in enumerate(quant_config["layers"]) if layer[group[0]]["bits"] == workload.bits]


@torch.no_grad()
def measure_table(model, n_tbs: list[int], k_grid: tuple[int, ...] = K_GRID, *, cuda_graph: bool = True,
                  fresh_input: bool = True, progress: bool = True) -> CostTable:
    """Times every workload of a loaded prepared model (``load_prepared``) without DecDEC and over
    the (n_tb, k_chunk) grid, through the public module API: the selection group's ``n_tb`` and
    ``k_chunk`` are set and the group's DecDECLinears are called on a decode-shaped input.

    One timed call runs the kind's linears of every block that holds it, as a decode step does
    (no weight is read from L2, and the residual rows come from all the blocks' pinned buffers);
    the result is per block. ``fresh_input`` draws a new input before every timed call, so each
    call selects and fetches other residual rows, as successive tokens do: a replayed input
    fetches the same rows every time, which the GPU serves much faster than decoding ever sees (on
    the H100, gate/up at k_chunk 6 cost -6 us per token replayed over 5 blocks, +145 us fresh over
    all 32). A (kind, n_tb) sweep stops once a time exceeds ``STOP_ABOVE`` x the baseline. Every
    group's settings are restored afterwards.
    """
    from tqdm.auto import tqdm

    from .timing import time_call

    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    workloads = workloads_from_quant_config(model.decdec_quant_config)
    baseline, times = {}, {}
    total = len(workloads) * (1 + len(n_tbs) * (len(k_grid) - 1))
    bar = tqdm(total=total, desc="measuring", disable=not progress)
    for w in workloads:
        per_block = _workload_modules(model, w)
        n_blocks = len(per_block)
        linears = [lin for block in per_block for lin in block]
        groups = list({id(lin.selection): lin.selection for lin in linears}.values())
        saved = [(g.mode, g.k_chunk, g.n_tb) for g in groups]
        x = torch.randn(1, 1, w.shapes[0][0], dtype=dtype, device=device)

        def run() -> None:
            for lin in linears:
                lin(x)

        def timed(n_tb: int, k_chunk: int) -> float:
            for g in groups:
                g.configure(mode="decdec", k_chunk=k_chunk)
                g.n_tb = n_tb
            return time_call(run, device, cuda_graph=cuda_graph, refresh=x.normal_ if fresh_input else None) / n_blocks

        try:
            bar.set_postfix_str(f"{w.key} x{n_blocks} blocks")
            baseline[w.key] = timed(n_tbs[0], 0)
            bar.update()
            times[w.key] = {}
            for n in n_tbs:
                row = [baseline[w.key]] + [math.inf] * (len(k_grid) - 1)
                for i, k in enumerate(k_grid[1:], start=1):
                    row[i] = timed(n, k)
                    bar.update()
                    if row[i] > STOP_ABOVE * baseline[w.key]:
                        bar.update(len(k_grid) - 1 - i)
                        break
                times[w.key][n] = row
        finally:
            for g, (mode, k_chunk, n_tb) in zip(groups, saved):
                g.configure(mode=mode, k_chunk=k_chunk)
                g.n_tb = n_tb
    bar.close()
    return CostTable(workloads, list(n_tbs), list(k_grid), baseline, times, "measured")
