"""The barrier; the barriers of DeepSpeed's checkpoints and of streaming's dataset opening, without
torch's warning about the device they take; and ending torch.distributed: destroyed when every rank
ended together, aborted (NCCL) or left to the exit (gloo) after a failure, and every entry point
that starts it ending it. One rank of gloo in the test process, joined through an in-memory store."""

import ast
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lh_dist.parallel.comm import barrier
from lh_dist.parallel.distributed import close_distributed
from lh_dist.train.engine import Engine

# torch's words when a barrier takes the current device (NCCL, no device_ids, a group bound to no device), as
# DeepSpeed's save_checkpoint and load_checkpoint and streaming's dataset opening make it in a world of one.
TORCH_WORDS = ("barrier(): using the device under current context. "
               "You can specify `device_id` in `init_process_group` to mute this warning.")


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.new_group(backend="gloo")  # a second group, as the trainer's stop-signal group
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_clean_ending_destroys_every_group(world_of_one):
    close_distributed(clean=True)
    assert not dist.is_initialized()
    close_distributed(clean=True)  # nothing left to end: no error


def test_after_a_failure_gloo_is_left_to_the_exit(world_of_one):
    close_distributed(clean=False)
    assert dist.is_initialized()


def test_after_a_failure_nccl_is_aborted(world_of_one, monkeypatch):
    # torch's abort call, made on the gloo group standing in for NCCL: it ends every group without waiting.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    close_distributed(clean=False)
    assert not dist.is_initialized()


REPO = Path(__file__).resolve().parents[2]
STARTS, ENDS = {"init_distributed", "init_process_group"}, {"close_distributed", "destroy_process_group"}
# Modules that start torch.distributed for a caller that ends it.
ENDED_BY_CALLER = {"lh_dist/train/loop.py": "lh_dist/train/cli.py"}


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            names.add(node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", ""))
    return names


def test_every_module_that_starts_torch_distributed_ends_it():
    # A gloo group left to the interpreter's exit sometimes aborts the process there (close_distributed says
    # how often), so a benchmark or command that forgets to end it fails one run in tens, not every run.
    starters = {str(p.relative_to(REPO)) for folder in ("lh_dist", "benchmarks") for p in (REPO / folder).rglob("*.py")
                if _calls(p) & STARTS and p != REPO / "lh_dist/parallel/distributed.py"}
    assert {"benchmarks/cp_train.py", "lh_dist/eval/runner.py", "lh_dist/train/loop.py"} <= starters
    for module in sorted(starters):
        ender = ENDED_BY_CALLER.get(module, module)
        assert _calls(REPO / ender) & ENDS, f"{module} starts torch.distributed; {ender} never ends it"


def test_the_barrier_names_this_ranks_gpu_under_nccl(world_of_one, monkeypatch):
    barrier()  # gloo: a plain barrier of the one rank returns
    calls = []
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "barrier", lambda **kwargs: calls.append(kwargs))
    barrier()
    assert calls == [{"device_ids": [3]}]


def test_deepspeeds_checkpoint_barriers_do_not_warn_of_the_device_they_take(tmp_path):
    def deepspeed_call(*args, **kwargs):
        warnings.warn(TORCH_WORDS, UserWarning)
        warnings.warn("another warning", UserWarning)
        return str(tmp_path), {}

    engine = types.SimpleNamespace(ds=types.SimpleNamespace(save_checkpoint=deepspeed_call,
                                                            load_checkpoint=deepspeed_call))
    for call in (Engine.save, Engine.load):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(engine, tmp_path / "step_00000004")
        assert [str(w.message) for w in caught] == ["another warning"]


def test_opening_a_streaming_dataset_does_not_warn_of_the_device_its_barriers_take(monkeypatch):
    import streaming

    from lh_dist.data.streaming_shm import open_streaming_dataset

    class Dataset:  # stands in for streaming's, whose opening makes such a barrier in a world of one
        def __init__(self, **kwargs):
            warnings.warn(TORCH_WORDS, UserWarning)

    monkeypatch.setattr(streaming, "StreamingDataset", Dataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset, release = open_streaming_dataset(local="unused")
    release()
    assert isinstance(dataset, Dataset) and [str(w.message) for w in caught] == []
