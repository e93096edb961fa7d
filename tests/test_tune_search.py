"""The autotuner's search and analytic cost model (decdec.tuning), on tables with known answers."""
import math

import pytest

from decdec import tuning
from decdec.synthetic import quant_layout

GB = 1e9
H100 = dict(mem_bw=2900 * GB, pcie_bw=52 * GB, sms=132)  # DESIGN.md: cuBLAS ceiling, pinned H2D


@pytest.fixture(scope="module")
def llama8b() -> list[tuning.Workload]:
    return tuning.workloads_from_quant_config(quant_layout("llama-3-8b", bits=3))


def total_of(table: tuning.CostTable, kinds: dict) -> float:
    """Model seconds of a configuration, recomputed from the table independently of the search."""
    return sum(table.kind_time(kind, c["n_tb"], table.k_grid.index(c["k_chunk"])) for kind, c in kinds.items())


def test_llama8b_workloads(llama8b):
    by_kind = {w.kind: w for w in llama8b}
    assert list(by_kind) == ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]
    assert all(w.count == 32 and w.bits == 3 for w in llama8b)
    assert by_kind["q_proj+k_proj+v_proj"].shapes == ((4096, 4096), (4096, 1024), (4096, 1024))
    assert by_kind["down_proj"].shapes == ((14336, 4096),)
    # 3-bit codes + fp16 scale and uint8 zero per group of 128
    assert by_kind["o_proj"].weight_bytes == 4096 * 4096 * 3 // 8 + 4096 * 32 * 3
    # k_chunk 8 of 14336 inputs: 14 chunks x 8 rows of 4096 / 2 bytes
    assert by_kind["down_proj"].fetch_bytes(8) == 14 * 8 * 2048


def test_analytic_knee_matches_design():
    assert tuning.knee(2900 * GB, 52 * GB, 3) == pytest.approx(13.77, abs=0.01)
    assert tuning.knee(2900 * GB, 52 * GB, 4) == pytest.approx(18.36, abs=0.01)
    w = tuning.Workload("x", 4, ((4096, 4096),), 4096 * 4096 // 2, 1)  # 4-bit, no scales: the knee is exact
    gpu = tuning.AnalyticGPU(**H100)
    saturated = gpu.saturating_tbs
    assert gpu.time(w, saturated, 18) == gpu.gemv_time(w)  # hidden below the knee
    assert gpu.time(w, saturated, 19) > gpu.gemv_time(w)
    assert gpu.time(w, 1, 18) > gpu.time(w, saturated, 18)  # one block cannot fill PCIe


@pytest.mark.parametrize("target", [0.0, 0.01, 0.025, 0.05, 0.10])
def test_budget_respected(llama8b, target):
    table = tuning.analytic_table(llama8b, tuning.AnalyticGPU(**H100))
    result = tuning.search(table, target)
    assert result.predicted <= (1 + target) * result.baseline * (1 + 1e-12)
    assert total_of(table, result.kinds) == pytest.approx(result.predicted)
    assert result.baseline == pytest.approx(sum(w.count * w.weight_bytes for w in llama8b) / H100["mem_bw"])


def test_h100_dry_run_gets_k_chunk_at_2_5_percent(llama8b):
    table = tuning.analytic_table(llama8b, tuning.AnalyticGPU(**H100))
    result = tuning.search(table, 0.025)
    knee = tuning.knee(H100["mem_bw"], H100["pcie_bw"], 3)
    for kind in ("gate_proj+up_proj", "down_proj"):
        assert result.kinds[kind]["k_chunk"] > 0
    # the fetch hides below the knee: every kind gets at least the grid step below it
    assert all(c["k_chunk"] >= max(k for k in tuning.K_GRID if k <= knee) for c in result.kinds.values())
    assert not result.pinned
    # hiding it needs the blocks that fill the link
    assert all(c["n_tb"] == 16 for c in result.kinds.values())


def test_a_lower_n_tb_cap_lowers_k_chunk(llama8b):
    gpu = tuning.AnalyticGPU(**H100)
    full = tuning.search(tuning.analytic_table(llama8b, gpu), 0.025)
    capped = tuning.search(tuning.analytic_table(llama8b, gpu, n_tb_max=4), 0.025)
    assert capped.cap == 4
    assert all(c["n_tb"] <= 4 for c in capped.kinds.values())
    assert sum(c["k_chunk"] for c in capped.kinds.values()) < sum(c["k_chunk"] for c in full.kinds.values())


def test_pins_the_smallest_kind_when_nothing_fits(llama8b):
    # a fixed DEC cost per linear: 7 linears per block cost more than 2.5 %, 6 (without o_proj) fit
    baseline = sum(w.weight_bytes for w in llama8b) / H100["mem_bw"]
    overhead = 0.025 * baseline / 6.5
    table = tuning.analytic_table(llama8b, tuning.AnalyticGPU(**H100, dec_overhead=overhead))
    result = tuning.search(table, 0.025)
    assert result.pinned == ["o_proj"]
    assert result.kinds["o_proj"]["k_chunk"] == 0
    assert all(result.kinds[k]["k_chunk"] > 0 for k in ("q_proj+k_proj+v_proj", "gate_proj+up_proj", "down_proj"))
    assert result.predicted <= 1.025 * result.baseline
    assert any("pinning o_proj" in s for s in result.steps)


def test_everything_pinned_means_decdec_off(llama8b):
    table = tuning.analytic_table(llama8b, tuning.AnalyticGPU(**H100, dec_overhead=1e-3))
    result = tuning.search(table, 0.025)
    assert sorted(result.pinned) == sorted(w.kind for w in llama8b)
    assert all(c["k_chunk"] == 0 for c in result.kinds.values())
    assert result.predicted == pytest.approx(result.baseline)


def hand_table(times: dict[str, dict[int, list[float]]], weight_bytes: dict[str, int]) -> tuning.CostTable:
    workloads = [tuning.Workload(k, 3, ((1024, 1024),), weight_bytes[k], 1) for k in times]
    first = {k: next(iter(rows.values()))[0] for k, rows in times.items()}
    return tuning.CostTable(workloads, sorted(next(iter(times.values()))), [0, 1, 2, 3],
                            {f"{k}@3bit": first[k] for k in times},
                            {f"{k}@3bit": rows for k, rows in times.items()}, "measured")


def test_phase2_takes_the_cheapest_step_first():
    # both kinds fit k_chunk 1 together (phase 1); the budget then admits one more step, and
    # "a" costs less for it
    table = hand_table({"a": {1: [10.0, 10.1, 10.3, 10.9]}, "b": {1: [10.0, 10.1, 10.6, 11.0]}}, {"a": 1, "b": 2})
    result = tuning.search(table, 0.03)  # budget 20.6
    assert result.phase1_k_chunk == 1
    assert result.kinds == {"a": {"n_tb": 1, "k_chunk": 2}, "b": {"n_tb": 1, "k_chunk": 1}}
    assert result.predicted == pytest.approx(20.4)


def test_cap_choice_prefers_more_steps_then_fewer_blocks():
    rows_a = {1: [10.0, 10.5, 11.5, 12.5], 2: [10.0, 10.1, 10.2, 10.3], 4: [10.0, 10.1, 10.2, 10.3]}
    table = hand_table({"a": rows_a, "b": {n: list(r) for n, r in rows_a.items()}}, {"a": 1, "b": 1})
    result = tuning.search(table, 0.05)  # budget 21: caps 2 and 4 reach step 3, cap 1 only step 1
    assert result.cap == 2
    assert all(c == {"n_tb": 2, "k_chunk": 3} for c in result.kinds.values())


def test_target_as_a_share_of_the_whole_step():
    # linears 20 of a 40 us step: 2.5 % of the linears is 0.5 us (nothing fits), of the step 1 us
    table = hand_table({"a": {1: [10.0, 10.4, 10.9, 11.5]}, "b": {1: [10.0, 10.4, 10.9, 11.5]}}, {"a": 1, "b": 2})
    assert tuning.search(table, 0.025).kinds["a"]["k_chunk"] == 0
    result = tuning.search(table, 0.025, other=20.0)
    assert [c["k_chunk"] for c in result.kinds.values()] == [1, 1]  # 20.8 <= 21.0; a step more is 21.3
    assert result.predicted == pytest.approx(20.8)
    assert result.predicted_slowdown == pytest.approx(0.8 / 40)
    with pytest.raises(ValueError):
        tuning.search(table, 0.025, other=-1.0)


def test_unmeasured_entries_never_fit():
    table = hand_table({"a": {1: [10.0, 10.1, math.inf, math.inf]}}, {"a": 1})
    assert tuning.search(table, 1.0).kinds["a"]["k_chunk"] == 1


def test_table_json_round_trip(llama8b):
    table = tuning.analytic_table(llama8b, tuning.AnalyticGPU(**H100), n_tb_max=8, k_grid=(0, 4, 8, 16))
    table.times[llama8b[0].key][8][3] = math.inf  # a sweep that stopped early
    back = tuning.CostTable.from_json(table.to_json())
    assert back.workloads == table.workloads and back.n_tb_grid == [1, 2, 3, 4, 6, 8]
    for w in llama8b:
        assert back.baseline[w.key] == pytest.approx(table.baseline[w.key])
        for n in table.n_tb_grid:
            assert back.times[w.key][n] == pytest.approx(table.times[w.key][n])
    assert tuning.search(back, 0.025).kinds == tuning.search(table, 0.025).kinds


def test_bad_inputs():
    assert tuning.n_tb_grid(132) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 132]
    assert tuning.n_tb_grid(12) == [1, 2, 3, 4, 6, 8, 12]
    assert tuning.n_tb_grid(1) == [1]
    with pytest.raises(ValueError):
        tuning.n_tb_grid(0)
    with pytest.raises(ValueError):
        tuning.search(hand_table({"a": {1: [1.0, 1.0, 1.0, 1.0]}}, {"a": 1}), -0.01)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5, 3.0])
def test_measured_search_keeps_a_config_the_measurement_admits(llama8b, factor):
    """A decode step where DecDEC costs ``factor`` x what the table predicts: the kept config is one
    whose measured slowdown is within the target, and it compensates at least as much as a
    prediction-only search would when the table over-predicts."""
    table = tuning.analytic_table(llama8b, tuning.AnalyticGPU(**H100))
    other = 2 * sum(table.kind_baseline(k) for k in table.kinds)  # a step three times its linears
    target = 0.025
    measured = []

    def measure(kinds: dict) -> float:
        baseline = sum(table.kind_baseline(k) for k in table.kinds)
        measured.append(factor * tuning.slowdown(total_of(table, kinds), baseline, other))
        return measured[-1]

    chosen, rounds = tuning.search_measured(table, target, other, measure, rounds=4)
    assert [r.measured for r in rounds] == measured and 1 <= len(rounds) <= 4
    assert rounds[0].goal == target and rounds[0].kinds == tuning.search(table, target, other).kinds
    kept = next(r for r in rounds if r.kinds == chosen.kinds)
    assert kept.measured <= target
    plain = tuning.search(table, target, other)
    if factor <= 1:
        assert chosen.predicted >= plain.predicted
    else:  # the prediction-only config overshoots; the loop moved below it
        assert rounds[0].measured > target and chosen.predicted < plain.predicted
    for before, after in zip(rounds, rounds[1:]):
        assert tuning.GOAL_SCALE[0] <= after.goal / before.predicted <= tuning.GOAL_SCALE[1]


def test_measured_search_falls_back_to_decdec_off(llama8b):
    table = tuning.analytic_table(llama8b, tuning.AnalyticGPU(**H100))
    chosen, rounds = tuning.search_measured(table, 0.025, 0.0, lambda kinds: 1.0, rounds=3)
    assert len(rounds) == 3 and all(r.measured == 1.0 for r in rounds)
    assert all(c["k_chunk"] == 0 for c in chosen.kinds.values()) and chosen.predicted_slowdown == 0
    assert "DecDEC off" in chosen.steps[-1]
    with pytest.raises(ValueError, match="rounds"):
        tuning.search_measured(table, 0.025, 0.0, lambda kinds: 0.0, rounds=0)
