"""benchmarks/scaling.py's arithmetic and bookkeeping, on synthetic step times: the fits, the
dense extrapolation, the crossover, the context-parallel projection, and how the grid stops
(step too long, out of memory, wall-clock budget) and resumes. tests/integration/test_scaling_run.py
runs it for real on tiny sizes."""

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import scaling  # noqa: E402

from lh_dist.config import load_config  # noqa: E402

GRID = list(scaling.SEQ_LENS)
MILLION = scaling.MILLION


def test_a_fit_of_exact_data_recovers_its_coefficients():
    a, b = 3.1e-6, 2.7e-12
    fit = scaling.fit_step_time(GRID, [a * n + b * n * n for n in GRID])
    # Exact data: the least-squares residual is zero and only float64 round-off remains (the
    # system is scaled to columns of order 1, so ~1e-16 relative, with margin).
    assert fit["a"] == pytest.approx(a, rel=1e-9) and fit["b"] == pytest.approx(b, rel=1e-9)
    n = 4 * GRID[-1]
    assert scaling.fitted(fit, n) == pytest.approx(a * n + b * n * n, rel=1e-12)


def test_lighthouse_is_fitted_on_its_attention_work():
    # The 1M flavor attends over S = N/64 + 49,152 in every layer: P(N) = S^2; two measured
    # steps determine a and b, and a step at 8M follows.
    cfg = load_config(REPO / "configs/paper-270m-1m.yaml")
    ns = [262144, MILLION]
    pairs = [scaling.attention_pairs(load_config(REPO / "configs/paper-270m-1m.yaml", [f"data.seq_len={n}"]))
             for n in ns]
    assert pairs == [(n // 64 + 49152) ** 2 for n in ns]
    a, b = 4e-6, 5.7e-10
    fit = scaling.fit_step_time(ns, [a * n + b * p for n, p in zip(ns, pairs)], pairs)
    assert fit["a"] == pytest.approx(a, rel=1e-9) and fit["b"] == pytest.approx(b, rel=1e-9)
    # With always-dense layers P mixes both: layers 0, 1, 28, 29 of 30 attend over N.
    paper = load_config(REPO / "configs/paper-530m-98k.yaml")
    s = scaling.lighthouse_length(paper)
    assert scaling.attention_pairs(paper) == pytest.approx((4 * 98304**2 + 26 * s * s) / 30)
    assert cfg.data.seq_len == MILLION


def test_fits_never_have_negative_terms():
    # Noisy times that fall with N at first would give a negative term; the fit drops it instead.
    fit = scaling.fit_step_time([1000, 2000, 4000], [3.0, 2.0, 3.0])
    assert min(fit.values()) >= 0


def test_crossover_is_where_the_step_times_cross():
    dense = [1e-11 * n * n for n in GRID]
    # a N against b N^2 cross at N = a / b = 300,000; their log ratio is linear in log N, so the
    # log-log interpolation between 262,144 and 524,288 is exact (to round-off).
    lh = [3e-6 * n for n in GRID]
    cross = scaling.crossover(GRID, dense, lh)
    assert cross["bound"] == "between" and cross["n"] == pytest.approx(300000, rel=1e-9)
    assert scaling.crossover(GRID, dense, [d / 2 for d in dense]) == {"n": GRID[0], "bound": "at or below"}
    assert scaling.crossover(GRID, dense, [d * 2 for d in dense])["n"] is None


def _row(series, n, step_s, **extra):
    return {"series": series, "n": n, "status": "ok", "step_s": step_s, "tokens_per_s": n / step_s,
            "times": [step_s] * 4, "wall_s": 10 + 4 * step_s} | extra


def test_dense_is_extrapolated_from_its_fit_and_compared_at_1m():
    a, b = 2e-6, 4e-12
    rows = [_row("dense", n, a * n + b * n * n) for n in GRID[:4]]  # measured up to 262,144
    rows += [_row("lighthouse-1m", n, 0.5 + 5e-6 * n) for n in GRID[3:]]
    rows += [{"series": "lighthouse-1m", "n": n, "status": "invalid"} for n in GRID[:3]]
    analysis = scaling.analyse(scaling.parse_args(["--device", "cpu"]), rows)
    assert analysis["fits"]["dense"]["a"] == pytest.approx(a, rel=1e-9)
    assert [r["n"] for r in analysis["extrapolated"]] == GRID[4:]
    assert all(r["step_s"] == pytest.approx(a * r["n"] + b * r["n"] ** 2, rel=1e-9) for r in analysis["extrapolated"])
    ratio = analysis["ratio_at_1m"]["lighthouse-1m"]
    m = scaling.MILLION
    assert ratio["dense_extrapolated"]
    assert ratio["speedup"] == pytest.approx((a * m + b * m * m) / (0.5 + 5e-6 * m), rel=1e-9)
    # Lighthouse is slower at 524,288 (3.1 s against 2.1 s) and faster at 1M (5.7 s against 6.5 s).
    cross = analysis["crossover"]["lighthouse-1m"]
    assert cross["bound"] == "between" and 524288 < cross["n"] < m


def test_a_run_over_part_of_the_grid_keeps_the_extrapolation_to_every_measured_n():
    # An earlier run measured Lighthouse at 2M; a later one over N <= 1M only (--seq-lens) must
    # still compare 2M against dense's fit, not drop that row from the report.
    a, b = 2e-6, 4e-12
    rows = [_row("dense", n, a * n + b * n * n) for n in GRID[:4]]
    rows += [_row("lighthouse-1m", n, 0.5 + 5e-6 * n) for n in GRID[3:]]
    args = scaling.parse_args(["--device", "cpu", "--seq-lens", ",".join(map(str, GRID[:3]))])
    analysis = scaling.analyse(args, rows)
    assert [r["n"] for r in analysis["extrapolated"]] == GRID[4:]


def test_cp_step_counts_what_each_exchange_sends():
    cfg = load_config(REPO / "configs/paper-270m-1m.yaml")
    net = scaling.Interconnect()
    one = scaling.cp_step(6.6, cfg, 1, "lighthouse")
    assert one["step_s"] == 6.6 and one["comm_bytes"] == 0
    w, s = 8, 65536  # the 1M flavor gathers S = 65,536 entries
    est = scaling.cp_step(6.6, cfg, w, "lighthouse", "allgather", net)
    # Per layer and rank: bf16 K/V of S/W entries (8 heads x 128) to W-1 ranks in each of the two
    # forwards (full checkpointing recomputes), fp32 dK/dV reduce-scattered once; then the ZeRO
    # exchange of bf16 gradients and parameters.
    kv = 2 * (s // w) * 8 * 128
    layer = 2 * (w - 1) * kv * 2 + (w - 1) * kv * 4
    zero = 2 * (w - 1) * scaling.num_params(cfg) * 2 // w
    assert est["comm_bytes"] == 30 * layer + zero
    assert est["exposed_s"] == pytest.approx(est["comm_bytes"] / (450e9 * 0.8))
    assert est["step_s"] == pytest.approx(6.6 / w + est["exposed_s"])
    assert est["tokens_per_s_per_gpu"] == pytest.approx(scaling.MILLION / (w * est["step_s"]))
    # Dense ring attention at 1M: every ring step hides behind its attention; what shows is the
    # last hop of fp32 dK/dV per layer, and the ZeRO exchange.
    dense = scaling.cp_step(400.0, cfg, w, "dense", net=net)
    last_hop = 2 * (scaling.MILLION // w) * 8 * 128 * 4
    assert dense["exposed_s"] == pytest.approx((30 * last_hop + zero) / net.bytes_per_s)


def test_num_params_counts_the_model():
    from lh_dist.model import Transformer

    import torch

    cfg = load_config(REPO / "configs/paper-270m-1m.yaml")
    with torch.device("meta"):  # shapes only
        model = Transformer(cfg.model, [None] * cfg.model.n_layers)
    assert scaling.num_params(cfg) == sum(p.numel() for p in model.parameters())


class FakeCells:
    """run_cell's stand-in: step times dense 1e-10 N^2 s, Lighthouse 1e-5 N s; OOM from `oom_from`
    on. Each cell moves the clock that measure_grid reads by `wall_s`."""

    def __init__(self, oom_from=math.inf, wall_s=5.0):
        self.calls, self.oom_from, self.wall_s, self.now = [], oom_from, wall_s, 0.0

    def clock(self) -> float:
        return self.now

    def __call__(self, args, series, n, timeout):
        self.calls.append((series, n))
        self.now += self.wall_s
        if n >= self.oom_from and series == "lighthouse-1m":
            return {"series": series, "n": n, "status": "oom", "error": "CUDA out of memory", "wall_s": 1.0}
        t = 1e-10 * n * n if series == "dense" else 1e-5 * n
        return _row(series, n, t, wall_s=self.wall_s)


def _run(tmp_path, monkeypatch, fake, *argv):
    monkeypatch.setattr(scaling, "run_cell", fake)
    monkeypatch.setattr(scaling.time, "monotonic", fake.clock)
    monkeypatch.setattr(scaling, "_commit", lambda: "test")
    assert scaling.main(["--device", "cpu", "--out", str(tmp_path), "--series", "dense,lighthouse-1m",
                         "--setup-s", "5", *argv]) == 0
    import json

    return json.loads((tmp_path / "scaling.json").read_text())


def test_the_grid_stops_each_series_at_max_step_s_and_at_oom(tmp_path, monkeypatch):
    fake = FakeCells(oom_from=1 << 20)
    data = _run(tmp_path, monkeypatch, fake, "--max-step-s", "60")
    # Dense: 1e-10 N^2 s is 27.5 s at 524,288; 1,048,576 would take 110 s, so it is not started.
    assert [n for s, n in fake.calls if s == "dense"] == GRID[:5]
    # Lighthouse: the 1M flavor cannot tile N < 262,144 (recorded as invalid without running), and
    # an OOM at 1M stops the series.
    assert [n for s, n in fake.calls if s == "lighthouse-1m"] == GRID[3:6]
    assert [r["n"] for r in data["rows"] if r["status"] == "invalid"] == GRID[:3]
    assert {r["status"] for r in data["rows"]} == {"ok", "oom", "invalid"}
    # The dense steps beyond are extrapolated, and the report says so.
    assert [r["n"] for r in data["analysis"]["extrapolated"]] == GRID[5:]
    md = (tmp_path / "scaling.md").read_text()
    assert "| 2,097,152 | dense | extrapolated | 439.805 |" in md
    assert "| 1,048,576 | lighthouse-1m | oom |" in md
    assert (tmp_path / "scaling.png").stat().st_size > 0
    # Run again: what was measured is kept and not measured again.
    fake.calls.clear()
    data = _run(tmp_path, monkeypatch, fake, "--max-step-s", "60")
    assert fake.calls == [] and len(data["rows"]) == 11 and len(data["runs"]) == 2


def test_the_budget_stops_starting_cells_and_a_rerun_continues(tmp_path, monkeypatch):
    fake = FakeCells(wall_s=5.0)
    # Each cell takes 5 s (and is predicted to take a little more, its steps growing): a budget of
    # 12 s starts two, and refuses the third before it starts.
    data = _run(tmp_path, monkeypatch, fake, "--budget-s", "12", "--seq-lens", "32768,65536,131072")
    assert len(data["rows"]) == 2 < 6
    data = _run(tmp_path, monkeypatch, fake, "--budget-s", "1000", "--seq-lens", "32768,65536,131072")
    assert sorted((r["series"], r["n"]) for r in data["rows"]) == sorted(
        (s, n) for s in ("dense", "lighthouse-1m") for n in (32768, 65536, 131072))


def test_project_prints_the_projection_of_given_steps(capsys):
    assert scaling.main(["--device", "cpu", "--project", "lighthouse-1m:1048576=6.6,4194304=24",
                         "--memory", "lighthouse-1m:262144=27,1048576=94"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| lighthouse-1m")]
    assert len(rows) == 2 * 2 * 4  # lengths x exchanges x CP degrees
    assert rows[0].startswith("| lighthouse-1m | allgather | 1,048,576 | 1 | 6.60 (given) | 6.60 | 0.000 | 0.00 | "
                              "158,875 | 94 |")
    # Memory per GPU: the one-GPU peak at N / CP on the line through the two given peaks.
    assert rows[1].endswith(f"| {27 + 67 * (524288 - 262144) / (1048576 - 262144):.0f} |")
    assert rows[8].endswith("| 362 (over an H200) |")  # 4M on one GPU
    with pytest.raises(SystemExit):
        scaling.main(["--device", "cpu", "--project", "lighthouse-paper:1048576=6.6"])


def test_cells_that_cannot_run_are_recorded_without_running(monkeypatch):
    args = scaling.parse_args(["--device", "cuda", "--report-only"])  # no GPU needed to plan
    assert scaling.precheck(args, "lighthouse-1m", 131072)["status"] == "invalid"
    assert scaling.precheck(args, "lighthouse-1m", 262144) is None
    # Offloading 30 layers of 2,097,152 x 1024 bf16 values needs 120 GiB of pinned host memory, 4 GiB a
    # block: with 100 GiB available, the first 22 blocks (88 GiB <= 90 GiB) are offloaded.
    monkeypatch.setattr(scaling, "_available_host_bytes", lambda: 100 * 2**30)
    assert scaling.precheck(args, "lighthouse-1m+offload", 2 * MILLION) is None
    assert scaling.cell_config(args, "lighthouse-1m+offload", 2 * MILLION).parallel.activation_offload_layers == 22
    assert scaling.cell_config(args, "lighthouse-1m+offload", MILLION).parallel.activation_offload_layers == 0  # all
    # Not even one block fits in 90% of 4 GiB.
    monkeypatch.setattr(scaling, "_available_host_bytes", lambda: 4 * 2**30)
    row = scaling.precheck(args, "lighthouse-1m+offload", 2 * MILLION)
    assert row == {"series": "lighthouse-1m+offload", "n": 2 * MILLION, "status": "host-oom",
                   "error": "offloading one block needs 4 GiB of pinned host memory, 4 GiB available"}
