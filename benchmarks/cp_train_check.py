"""End-to-end check of `lh-train` under context parallelism: the loss curve of a CP run, stopped by
SIGTERM mid-run and resumed, against one rank of the same config, within the noise of reordered sums.

    python benchmarks/cp_train_check.py                        # a machine with 2+ GPUs (4: also DP 2 x CP 2)
    python benchmarks/cp_train_check.py --cpu --data runs/data/stdlib --layouts cp2,dp2cp2   # CPU ranks, gloo
    python benchmarks/cp_train_check.py --references-only      # one GPU: step 2 alone (the references, their noise)

Every run is `lh-train` under torchrun (`--standalone --max-restarts 0`, as launch/run.sh starts it),
in its own run directory under --work, logging every step's loss to TensorBoard:

1. Data: GPUs train the reproduction shape (configs/repro-64k.yaml) at 131,072 tokens on the corpus of
   `benchmarks/reproduce.py data` (built into --data when missing). 60 steps: 40 Lighthouse, 20 dense.
   --cpu trains configs/tiny-cpu.yaml's corpus with the tests' tiny model at 1,024 tokens, 12 steps
   (8 Lighthouse); its data must exist (`lh-data stdlib --out DIR`).
2. References: two 1-rank runs of that config that differ only in the attention kernel, both exact
   attention with their own order of floating-point sums: cuDNN and PyTorch's flash SDPA on GPUs
   (model.attention_backend cudnn, flash), math and cpu_flash on CPU. DP 2 x CP 2 reads two samples
   per step, so its references are the same pair with optim.grad_accum=2 (the same two samples, one
   after the other). On GPUs the references run side by side, one GPU each. Checked: both log every
   step, the first trains, the pair stays within DIVERGED (5%) of the loss (no spike), and on GPUs
   (bf16) the pair differs at all.
3. Each layout (cp2: 2 ranks, CP 2; dp2cp2: 4 ranks, DP 2 x CP 2; first backend): started; once rank 0
   logs step --stop-at, SIGTERM to the torchrun process. Checked: it ends within --stop-timeout s
   (no hang), every rank's lh-train returned 75 (PREEMPTED_EXIT_CODE; each rank writes what
   lh-train's main returned into a status file, since torchrun itself exits with 1 after a signal),
   no process of the run is left, a checkpoint at the stop step or later exists. Then `--resume auto`
   to the end: every rank returns 0 and resumes from that checkpoint.
4. Losses (TensorBoard `train/loss` of each run, both parts of the stopped run together): every step
   present, and at every step s, |cp_s - a_s| <= tol_s, with a and b the reference pair and
       tol_s = 2 * max_{t <= s} |a_t - b_t| + 4 * eps_fp32 * |a_s|.
   The running maximum, because two runs drift apart as training goes on and a step where the pair
   happens to agree says nothing about the noise; twice, because the CP run reorders its own sums
   (ring and Lighthouse exchanges, the mean over ranks) on top; the last term is a few float32 ulps of
   the logged loss, for steps before any difference shows.

Prints one "ok" or "FAIL" line per check and writes cp_train_check.md and .json (hardware, commit,
command, every step's losses) into --out (default: $OUT if set, else --work). Exit status 0 when
every check passed, 1 otherwise. Extra `section.field=value` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREEMPTED_EXIT_CODE = 75  # lh_dist.train.loop.PREEMPTED_EXIT_CODE (not imported: that pulls in torch here)
FLOAT32_EPS = 2.0**-23
LAYOUTS = {"cp2": (2, ["parallel.cp_degree=2"]), "dp2cp2": (4, ["parallel.cp_degree=2", "parallel.dp_degree=2"])}
# NVLink multicast off and one hardware queue per GPU, as slurm/train.sbatch sets them for CP on Hopper.
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
STEP_LINE = re.compile(r"^step\s+([\d,]+)/")


@dataclass
class Profile:
    """What the check trains: config, overrides, the reference pair of backends, when to stop."""

    config: str
    overrides: list[str]
    backends: tuple[str, str]
    steps: int
    lighthouse_steps: int
    stop_at: int
    # bf16 kernels that agree to the bit would be one kernel twice; in float32 on CPU the pair may
    # agree to the last bit of the logged loss, and the tolerance is then a few ulps (stricter).
    expect_noise: bool


GPU_PROFILE = Profile(
    config="configs/repro-64k.yaml",
    # Lighthouse L=3, p=4, k=1024 tiles 131,072 tokens in 4 zigzag chunks (S = 16,384 = 0.125 N).
    # The reproduction's learning rate over its first 60 steps (a linear warmup to 1e-3 over 100 steps,
    # so 6e-4 at step 60), which trains without a spike; a 10-step warmup to 1e-3 spiked to loss 10.5 at
    # step 21, after which the pair's difference, and with it the tolerance, says nothing of sums.
    overrides=["data.seq_len=131072", "optim.lr=6e-4", "schedule.warmup_steps=60", "logging.log_interval=1",
               "logging.eval_interval=20", "checkpoint.interval=100000", "device=cuda"],
    backends=("cudnn", "flash"), steps=60, lighthouse_steps=40, stop_at=30, expect_noise=True)
CPU_PROFILE = Profile(
    config="configs/tiny-cpu.yaml",
    overrides=["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
               "data.seq_len=1024", "data.micro_batch=1", "lighthouse.levels=2", "lighthouse.pooling=2",
               "lighthouse.topk=512", "lighthouse.dense_layers=[0]", "schedule.warmup_steps=2",
               "logging.log_interval=1", "logging.eval_interval=100", "logging.eval_batches=1",
               "logging.selection_map_interval=0", "checkpoint.interval=100000", "device=cpu"],
    backends=("math", "cpu_flash"), steps=12, lighthouse_steps=8, stop_at=4, expect_noise=False)
# The pair has diverged (a loss spike in one of them) when it differs by more than this fraction of
# the loss: reordered sums move a loss by far less, so the tolerance could not tell a CP error from noise.
DIVERGED = 0.05


@dataclass
class Check:
    ok: bool
    text: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, ok: bool, text: str) -> bool:
        self.checks.append(Check(bool(ok), text))
        print(f"  {'ok  ' if ok else 'FAIL'}  {text}", flush=True)
        return bool(ok)


# ---- one rank (what torchrun starts) ---------------------------------------------------------

def rank_main(argv: list[str]) -> int:
    """lh-train's main in this process; what it returns is also written to <status dir>/rank<RANK>."""
    status_dir, args = Path(argv[0]), argv[1:]
    from lh_dist.train.cli import main

    code = main(args)
    status_dir.mkdir(parents=True, exist_ok=True)
    (status_dir / f"rank{os.environ.get('RANK', '0')}").write_text(f"{code}\n")
    return code


# ---- processes ---------------------------------------------------------------------------------

def _proc_start(pid: int) -> str | None:
    """Start time of a live (not zombie) process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid` with its start time (to tell a reused pid apart)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            start = _proc_start(child)
            if start is not None:
                found[child] = start
            todo.append(child)
    return found


def still_running(procs: dict[int, str]) -> list[int]:
    return [pid for pid, start in procs.items() if _proc_start(pid) == start]


@dataclass
class Launch:
    name: str
    nproc: int
    overrides: list[str]
    gpus: list[str] | None = None  # CUDA_VISIBLE_DEVICES of the run


class Runner:
    """Starts lh-train runs under torchrun with the check's environment and status files."""

    def __init__(self, args, profile: Profile):
        self.args, self.profile = args, profile
        self.work = Path(args.work)
        self.logs = Path(args.out) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name

    def command(self, launch: Launch, attempt: str) -> list[str]:
        status = self.work / "status" / f"{launch.name}-{attempt}"
        shutil.rmtree(status, ignore_errors=True)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(launch.nproc),
                "--max-restarts", "0", str(Path(__file__).resolve()), "_rank", str(status),
                "--config", str(REPO / self.profile.config), "--resume", "auto", *self.overrides(launch)]

    def overrides(self, launch: Launch) -> list[str]:
        p = self.profile
        return [*p.overrides, f"data.path={self.args.data}", f"logging.run_dir={self.run_dir(launch.name)}",
                f"schedule.steps={p.steps}", f"schedule.lighthouse_steps={p.lighthouse_steps}",
                *launch.overrides, *self.args.overrides]

    def env(self, launch: Launch) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PET_SHUTDOWN_TIMEOUT=str(self.args.stop_timeout))
        env.pop("WORLD_SIZE", None)
        if self.args.cpu:
            env.setdefault("OMP_NUM_THREADS", "1")
        else:
            env = GPU_ENV | env
        if launch.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(launch.gpus)
        return env

    def statuses(self, launch: Launch, attempt: str) -> list[str]:
        """What each rank's lh-train returned ('none': the rank wrote nothing, killed or crashed)."""
        folder = self.work / "status" / f"{launch.name}-{attempt}"
        out = []
        for rank in range(launch.nproc):
            f = folder / f"rank{rank}"
            out.append(f.read_text().strip() if f.is_file() else "none")
        return out

    def start(self, launch: Launch, attempt: str, stdout) -> subprocess.Popen:
        return subprocess.Popen(self.command(launch, attempt), cwd=REPO, env=self.env(launch), stdout=stdout,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def run_all(self, launches: list[Launch], width: int) -> dict[str, int]:
        """Run `launches` to the end, `width` at a time; their torchrun exit statuses."""
        codes = {}
        for i in range(0, len(launches), width):
            wave = launches[i:i + width]
            procs = []
            for launch in wave:
                shutil.rmtree(self.run_dir(launch.name), ignore_errors=True)
                log = open(self.logs / f"{launch.name}.log", "w")
                print(f"  ... {launch.name}: {launch.nproc} rank(s)"
                      + (f" on GPU {','.join(launch.gpus)}" if launch.gpus else ""), flush=True)
                procs.append((launch, self.start(launch, "run", log), log))
            for launch, proc, log in procs:
                try:
                    codes[launch.name] = proc.wait(timeout=self.args.run_timeout)
                except subprocess.TimeoutExpired:
                    _kill_tree(proc)
                    codes[launch.name] = "timeout"
                log.close()
        return codes


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# ---- losses ----------------------------------------------------------------------------------

def read_losses(run_dir: Path) -> dict[int, float]:
    """`train/loss` by step over every event file of the run (a resumed run has one per attempt)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tensorboard").is_dir():
        return {}  # the run stopped before it logged anything; its log says why
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def tolerances(a: list[float], b: list[float]) -> list[float]:
    """tol_s = 2 * max_{t <= s} |a_t - b_t| + 4 * eps_fp32 * |a_s| (the module docstring says why)."""
    out, noise = [], 0.0
    for x, y in zip(a, b):
        noise = max(noise, abs(x - y))
        out.append(2 * noise + 4 * FLOAT32_EPS * abs(x))
    return out


def _curve(losses: dict[int, float], steps: int) -> list[float] | None:
    return [losses[s] for s in range(1, steps + 1)] if all(s in losses for s in range(1, steps + 1)) else None


# ---- the check ---------------------------------------------------------------------------------

def stop_and_resume(runner: Runner, report: Report, launch: Launch) -> dict:
    """The layout's run: SIGTERM to torchrun once step --stop-at is logged, then --resume auto."""
    args, name = runner.args, launch.name
    info: dict = {"name": name, "ranks": launch.nproc}
    shutil.rmtree(runner.run_dir(name), ignore_errors=True)
    print(f"  ... {name}: {launch.nproc} ranks, SIGTERM after step {args.stop_at}", flush=True)
    log = open(runner.logs / f"{name}-stopped.log", "w")
    proc = runner.start(launch, "stopped", subprocess.PIPE)
    seen = None
    for line in proc.stdout:
        log.write(line)
        match = STEP_LINE.match(line)
        if match and int(match.group(1).replace(",", "")) >= args.stop_at:
            seen = int(match.group(1).replace(",", ""))
            break
    ranks = descendants(proc.pid)
    sent = time.monotonic()
    if seen is not None:
        proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=args.stop_timeout + 60)
        hung = False
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        rest, hung = proc.stdout.read() if proc.stdout else "", True
    log.write(rest or "")
    log.close()
    seconds = time.monotonic() - sent
    info |= {"stop_after_step": seen, "torchrun_status": proc.returncode, "seconds_to_exit": round(seconds, 1)}
    if not report.add(seen is not None, f"{name}: rank 0 logged step {args.stop_at} (log: {log.name})"):
        return info
    report.add(not hung, f"{name}: torchrun ended {seconds:.1f} s after SIGTERM (limit {args.stop_timeout + 60} s)")
    statuses = runner.statuses(launch, "stopped")
    info["rank_statuses"] = statuses
    report.add(statuses == [str(PREEMPTED_EXIT_CODE)] * launch.nproc,
               f"{name}: every rank's lh-train returned {PREEMPTED_EXIT_CODE} after SIGTERM: {statuses} "
               f"(torchrun itself: {proc.returncode})")
    deadline = time.monotonic() + 30
    while still_running(ranks) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = still_running(ranks)
    info["processes_left"] = left
    report.add(not left, f"{name}: no process of the run left ({len(ranks)} were running at the signal)"
               + (f"; left: {left}" if left else ""))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    checkpoints = sorted((runner.run_dir(name) / "checkpoints").glob("step_*"))
    stopped_at = int(checkpoints[-1].name.split("_")[1]) if checkpoints else None
    info["checkpoint_step"] = stopped_at
    if not report.add(stopped_at is not None and stopped_at >= seen,
                      f"{name}: checkpoint written at the stop: step {stopped_at} (signal after step {seen})"):
        return info

    print(f"  ... {name}: --resume auto", flush=True)
    with open(runner.logs / f"{name}-resumed.log", "w") as log:
        proc = runner.start(launch, "resumed", log)
        try:
            code = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            code = "timeout"
    text = (runner.logs / f"{name}-resumed.log").read_text()
    statuses = runner.statuses(launch, "resumed")
    info |= {"resumed_torchrun_status": code, "resumed_rank_statuses": statuses}
    report.add(code == 0 and statuses == ["0"] * launch.nproc,
               f"{name}: resumed run finished: torchrun {code}, ranks {statuses} (log: {log.name})")
    resumed = re.search(r"resumed from \S+ at step (\d+) \((\w+) phase\)", text)
    info["resumed_at"] = int(resumed.group(1)) if resumed else None
    report.add(resumed is not None and int(resumed.group(1)) == stopped_at,
               f"{name}: resumed from the stop's checkpoint: "
               + (f"step {resumed.group(1)}, {resumed.group(2)} phase" if resumed else "no 'resumed from' line"))
    return info


def compare(report: Report, name: str, ref: tuple[str, str], curves: dict, steps: int) -> dict:
    a, b, cp = curves.get(ref[0]), curves.get(ref[1]), curves.get(name)
    if not report.add(cp is not None, f"{name}: train/loss logged at every step 1..{steps}") or a is None or b is None:
        return {}
    tol = tolerances(a, b)
    diff = [abs(x - y) for x, y in zip(cp, a)]
    worst = max(range(steps), key=lambda i: diff[i] / tol[i])
    over = [i + 1 for i in range(steps) if diff[i] > tol[i]]
    report.add(not over, f"{name}: loss within tolerance of {ref[0]} at every step (worst: step {worst + 1}, "
               f"|diff| {diff[worst]:.2e} = {diff[worst] / tol[worst]:.2f} tol)"
               + (f"; over at steps {over}" if over else ""))
    return {"reference": ref[0], "noise_pair": ref[1], "loss": cp, "abs_diff": diff, "tolerance": tol,
            "steps_over": over, "worst_step": worst + 1, "worst_ratio": diff[worst] / tol[worst]}


def _commit() -> str:
    if os.environ.get("LH_DIST_COMMIT"):
        return os.environ["LH_DIST_COMMIT"]
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def _hardware(cpu: bool) -> str:
    import torch

    if not cpu and torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, " \
               f"CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), gloo, torch {torch.__version__}"


def ensure_data(args) -> None:
    if (Path(args.data) / "lh_data.json").is_file():
        print(f"  ... data: {args.data}", flush=True)
        return
    if args.cpu:
        sys.exit(f"cp_train_check: no dataset in {args.data} (build one: lh-data stdlib --out {args.data})")
    print(f"  ... data: building {args.data} (benchmarks/reproduce.py data)", flush=True)
    # The first recipe's config: its data is the code corpus alone.
    subprocess.run([sys.executable, str(REPO / "benchmarks/reproduce.py"), "data", "--data", str(args.data),
                    "--config", str(REPO / "configs/repro-64k.yaml")], cwd=REPO, check=True)


def markdown(args, profile: Profile, record: dict) -> str:
    lines = [
        "# lh-train under context parallelism against one rank",
        "",
        f"- hardware: {record['hardware']}",
        f"- commit: {record['commit']}",
        f"- command: `{record['command']}`",
        f"- config: {profile.config} with {' '.join(record['overrides'])}; {profile.steps} steps, "
        f"{profile.lighthouse_steps} Lighthouse then dense; SIGTERM to torchrun after step {args.stop_at}, "
        "then `--resume auto`" + (" (this run: the references alone)" if args.references_only else ""),
        f"- references: one rank, model.attention_backend {profile.backends[0]} and {profile.backends[1]}; "
        "tolerance per step s: 2 max_{t<=s} |a_t - b_t| + 4 eps_fp32 |a_s|",
        f"- result: {sum(c['ok'] for c in record['checks'])} of {len(record['checks'])} checks passed",
        "",
    ]
    lines += [f"- {'ok' if c['ok'] else '**FAIL**'}: {c['text']}" for c in record["checks"]]
    if args.references_only and len(record["references"]) == 2:
        (a_name, a), (b_name, b) = record["references"].items()
        lines += ["", "## references", "", f"| step | phase | {a_name} | {b_name} | abs diff |", "|---|---|---|---|---|"]
        for s in range(profile.steps):
            phase = "lighthouse" if s < profile.lighthouse_steps else "dense"
            lines.append(f"| {s + 1} | {phase} | {a[s]:.6f} | {b[s]:.6f} | {abs(a[s] - b[s]):.2e} |")
    for name, result in record["layouts"].items():
        cmp = result.get("comparison")
        if not cmp:
            continue
        ref, pair = cmp["reference"], cmp["noise_pair"]
        lines += ["", f"## {name}", "", f"| step | phase | {ref} | {pair} | {name} | abs diff | tolerance |",
                  "|---|---|---|---|---|---|---|"]
        a, b = record["references"][ref], record["references"][pair]
        for s in range(profile.steps):
            phase = "lighthouse" if s < profile.lighthouse_steps else "dense"
            lines.append(f"| {s + 1} | {phase} | {a[s]:.6f} | {b[s]:.6f} | {cmp['loss'][s]:.6f} "
                         f"| {cmp['abs_diff'][s]:.2e} | {cmp['tolerance'][s]:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_rank"]:
        return rank_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="CPU ranks (gloo), the tiny model: checks the check")
    parser.add_argument("--data", help="dataset folder (default: runs/data/pycode on GPUs, runs/data/stdlib on CPU)")
    parser.add_argument("--layouts", help="comma-separated among cp2 (2 ranks), dp2cp2 (4 ranks); default: those "
                                          "the visible GPUs hold (all of them with --cpu)")
    parser.add_argument("--references-only", action="store_true",
                        help="run only the one-rank reference pair of --layouts (default cp2) and measure its noise; "
                             "needs one GPU")
    parser.add_argument("--stop-at", type=int, help="SIGTERM once rank 0 logs this step (default 30, 4 with --cpu)")
    parser.add_argument("--stop-timeout", type=int, default=300,
                        help="seconds torchrun gives the ranks to checkpoint after SIGTERM (default 300)")
    parser.add_argument("--run-timeout", type=int, default=3600, help="seconds one run may take (default 3600)")
    parser.add_argument("--work", default=str(REPO / "runs/cp-train-check"),
                        help="run directories, checkpoints and status files (default runs/cp-train-check; its "
                             "runs are replaced)")
    parser.add_argument("--commit", help="commit to report when the tree's git does not name it (a copied tree)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="report and logs (default: $OUT, else --work)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="extra overrides for every run")
    args = parser.parse_args(argv)
    profile = CPU_PROFILE if args.cpu else GPU_PROFILE
    args.data = str(Path(args.data or ("runs/data/stdlib" if args.cpu else "runs/data/pycode")).resolve())
    args.out = args.out or args.work
    args.stop_at = args.stop_at or profile.stop_at
    if not 1 <= args.stop_at < profile.steps:
        parser.error(f"--stop-at must be in [1, {profile.steps}), got {args.stop_at}")

    import torch

    if args.cpu:
        gpus, width = None, 2
    else:
        count = torch.cuda.device_count()
        need = 1 if args.references_only else 2
        if count < need:
            parser.error(f"needs {need} or more GPUs, this process sees {count} (--cpu checks the check on CPU "
                         "ranks)")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
        width = count
    names = args.layouts.split(",") if args.layouts else [n for n, (ranks, _) in LAYOUTS.items()
                                                          if args.cpu or ranks <= len(gpus)] or ["cp2"]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: {', '.join(unknown)} not among {', '.join(LAYOUTS)}")
    runs = [] if args.references_only else names  # the layouts run here (names also picks the references)
    if gpus is not None and any(LAYOUTS[n][0] > len(gpus) for n in runs):
        parser.error(f"--layouts {','.join(runs)} needs more than the {len(gpus)} visible GPUs")

    print(f"cp_train_check: {_hardware(args.cpu)}; layouts {', '.join(names)}"
          + (" (references only)" if args.references_only else ""), flush=True)
    ensure_data(args)
    runner = Runner(args, profile)
    report = Report()
    # Check the shapes before starting anything (the config's own validation, for one rank and for every
    # layout's world size).
    shapes = {"references": (1, ["parallel.cp_degree=1"])} | {n: LAYOUTS[n] for n in runs}
    for name, (ranks, extra) in shapes.items():
        r = subprocess.run([sys.executable, "-m", "lh_dist.train.cli", "--config", str(REPO / profile.config),
                            "--dry-run", "--world-size", str(ranks),
                            *runner.overrides(Launch(name, ranks, extra))], cwd=REPO, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"cp_train_check: {name}: {r.stderr.strip()}")

    # The reference pairs: optim.grad_accum=2 for the layouts that read two samples per step.
    pairs = {}  # grad_accum -> (reference name, noise name)
    for name in names:
        ranks, extra = LAYOUTS[name]
        dp = ranks // 2
        pairs.setdefault(dp, tuple(f"ref-ga{dp}-{b}" for b in profile.backends))
    refs = []
    for dp, pair in pairs.items():
        for ref_name, backend in zip(pair, profile.backends):
            refs.append(Launch(ref_name, 1, [f"model.attention_backend={backend}", "parallel.cp_degree=1",
                                             f"optim.grad_accum={dp}"]))
    if gpus is not None:
        for i, launch in enumerate(refs):
            launch.gpus = [gpus[i % width]]
    print("== one-rank references", flush=True)
    codes = runner.run_all(refs, width)
    curves, references = {}, {}
    for launch in refs:
        curve = _curve(read_losses(runner.run_dir(launch.name)), profile.steps)
        report.add(codes[launch.name] == 0 and curve is not None,
                   f"{launch.name}: finished (status {codes[launch.name]}) with train/loss at every step"
                   f" (log: {runner.logs / (launch.name + '.log')})")
        if curve is not None:
            curves[launch.name] = references[launch.name] = curve
    for a, b in pairs.values():
        if a in curves and b in curves:
            noise = max(abs(x - y) for x, y in zip(curves[a], curves[b]))
            if profile.expect_noise:
                report.add(noise > 0, f"{a} and {b} differ (max |a - b| {noise:.2e}): the tolerance has a noise "
                                      "to measure")
            else:
                print(f"  ...   {a} and {b}: max |a - b| {noise:.2e}", flush=True)
            worst = max(abs(x - y) / abs(x) for x, y in zip(curves[a], curves[b]))
            report.add(worst <= DIVERGED, f"{a} and {b} stay within {DIVERGED:.0%} of the loss (worst "
                                          f"{worst:.2%}): neither spiked")
            report.add(curves[a][-1] < curves[a][0], f"{a} trains: loss {curves[a][0]:.4f} -> {curves[a][-1]:.4f}")

    layouts = {}
    for name in runs:
        ranks, extra = LAYOUTS[name]
        print(f"== {name}", flush=True)
        launch = Launch(name, ranks, [f"model.attention_backend={profile.backends[0]}", *extra],
                        gpus[:ranks] if gpus is not None else None)
        result = stop_and_resume(runner, report, launch)
        curve = _curve(read_losses(runner.run_dir(name)), profile.steps)
        if curve is not None:
            curves[name] = curve
        result["comparison"] = compare(report, name, pairs[ranks // 2], curves, profile.steps)
        layouts[name] = result

    record = {"hardware": _hardware(args.cpu), "commit": args.commit or _commit(),
              "command": " ".join(["python", os.path.relpath(Path(__file__).resolve(), REPO), *argv]),
              "config": profile.config, "overrides": [*profile.overrides, *args.overrides],
              "steps": profile.steps, "lighthouse_steps": profile.lighthouse_steps, "stop_at": args.stop_at,
              "backends": list(profile.backends), "references": references, "layouts": layouts,
              "checks": [c.__dict__ for c in report.checks]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cp_train_check.json").write_text(json.dumps(record, indent=1))
    (out / "cp_train_check.md").write_text(markdown(args, profile, record))
    failed = [c for c in report.checks if not c.ok]
    print(f"cp_train_check: {len(report.checks) - len(failed)} of {len(report.checks)} checks passed; "
          f"report {out / 'cp_train_check.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
