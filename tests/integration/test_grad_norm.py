"""The logged gradient norm is the true global norm before clipping, in every ZeRO stage and layout.

Real trainers (DeepSpeed, torchrun, gloo) take one optimizer step; the norm they report is
compared with a norm computed here by hand: the same initial weights and samples on one
device, the mean loss over every sample and micro-batch of the step, backward, and the
2-norm of all gradients.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lh_dist.assembly.model import build_model
from lh_dist.config import load_config
from lh_dist.data.loader import PackedLoader

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
SMALL = [*SMALL_RUN, "optim.grad_clip=0.5"]  # far below the first step's norm (about 2), so clipping acts
STAGES = [0, 1, 2, 3]

# Every rank builds one Trainer per layout and ZeRO stage, takes one step and writes the norms it got.
WORKER = textwrap.dedent("""
    import json, os, sys
    from lh_dist.config import load_config
    from lh_dist.parallel.distributed import close_distributed
    from lh_dist.train.loop import Trainer
    out, layouts, stages, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
    norms = {}
    for name, layout in layouts.items():
        for stage in stages:
            cfg = load_config(None, overrides + layout + [f"parallel.zero_stage={stage}",
                                                          f"logging.run_dir={out}/{name}/z{stage}"])
            trainer = Trainer(cfg, resume="none")
            norms[f"{name} {stage}"] = float(trainer.train_step(1e-3).grad_norm)
            trainer.metrics.close()
    with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump(norms, f)
    close_distributed(clean=True)  # as lh-train ends: a gloo group left to the exit may abort there
""")


def reference_norm(cfg, dp: int, dtype: torch.dtype) -> float:
    """The 2-norm of the gradient of the step's mean loss, on one device in `dtype`."""
    torch.manual_seed(cfg.seed)  # the trainer seeds the same way before it builds the model
    model = build_model(load_config(None, [f"data.path={cfg.data.path}", *SMALL, "model.attention_backend=math"]))
    model.to(dtype)
    loaders = [PackedLoader(cfg.data.path, "train", seq_len=cfg.data.seq_len, micro_batch=cfg.data.micro_batch,
                            dp_rank=r, dp_degree=dp, seed=cfg.seed,
                            cache_dir=str(Path(cfg.logging.run_dir) / "ref_cache")) for r in range(dp)]
    positions = torch.arange(cfg.data.seq_len)
    total = 0.0
    for loader in loaders:
        for _ in range(cfg.optim.grad_accum):
            batch = next(loader)  # [B, N + 1]
            logits = model(batch[:, :-1], positions)  # [B, N, V]
            logits = logits.double() if dtype == torch.float64 else logits.float()
            total = total + F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    (total / (dp * cfg.optim.grad_accum)).backward()
    return float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())))


# One torchrun per device runs every layout of it: one start of the ranks, DeepSpeed and the data.
CPU_LAYOUTS = {
    "cp2-accum2": ["parallel.cp_degree=2", "data.micro_batch=1", "optim.grad_accum=2"],  # CP: ranks split each sample
    "dp2": ["parallel.cp_degree=1", "data.micro_batch=2"],  # DP: ranks hold different samples
}
CUDA_LAYOUTS = {"cuda-bf16": ["parallel.cp_degree=1", "data.micro_batch=2"]}


@pytest.mark.parametrize("nproc, device, layouts", [
    (2, "cpu", CPU_LAYOUTS),
    pytest.param(1, "cuda", CUDA_LAYOUTS, marks=pytest.mark.gpu),  # bf16
], ids=["cpu", "cuda"])
def test_grad_norm_equals_the_hand_computed_norm(tmp_path, stdlib_dataset, nproc, device, layouts):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    overrides = [f"data.path={stdlib_dataset}", f"device={device}", *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    (tmp_path / "worker.py").write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(tmp_path / "worker.py"), str(tmp_path), json.dumps(layouts), json.dumps(STAGES),
                        *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    norms = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(nproc)]

    for name, layout in layouts.items():
        cfg = load_config(None, overrides + layout + [f"logging.run_dir={tmp_path / name}"])
        dp = nproc // cfg.parallel.cp_degree
        exact = reference_norm(cfg, dp, torch.float64)
        # On GPUs DeepSpeed trains bf16 weights; the CPU twin trains fp32.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        single = reference_norm(cfg, dp, dtype)
        # Sharding and ZeRO only reorder sums: allow twice the error of one device in the training dtype
        # against float64, plus a few ulps of the norm in case that device happened to land very close.
        tol = 2 * abs(single - exact) + 4 * torch.finfo(dtype).eps * exact
        assert exact > 2 * cfg.optim.grad_clip  # the reported norm is the one before clipping
        for rank in range(nproc):
            for stage in STAGES:
                got = norms[rank][f"{name} {stage}"]
                assert abs(got - exact) <= tol, (name, rank, stage, got, exact, tol)
