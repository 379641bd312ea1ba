"""Which device each rank gets: the rule with made-up GPU counts, then the rule where users meet it
(lh-train, lh-eval). tests/integration/test_device_launch.py meets it in launch/run.sh and
launch/quickstart.sh. Last, the CUDA allocator setting both tools start with."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lh_dist.config import ConfigError
from lh_dist.parallel.device import (ALLOC_CONF_VARS, CPU_RANKS, EXPANDABLE_SEGMENTS, choose_device,
                                     default_ranks_per_node, local_device, use_expandable_segments)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ranks", [1, 2, 8])
@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_cpu_is_cpu_whatever_the_counts(ranks, gpus):
    for rank in range(ranks):
        assert choose_device("cpu", rank, ranks, gpus) == torch.device("cpu")


@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_auto_without_gpus_is_cpu(ranks):
    for rank in range(ranks):
        assert choose_device("auto", rank, ranks, 0) == torch.device("cpu")


@pytest.mark.parametrize("requested", ["auto", "cuda"])
@pytest.mark.parametrize("ranks, gpus", [(1, 1), (1, 8), (2, 2), (2, 8), (8, 8)])
def test_each_local_rank_gets_the_gpu_of_its_index(requested, ranks, gpus):
    assert [choose_device(requested, rank, ranks, gpus) for rank in range(ranks)] == \
        [torch.device("cuda", rank) for rank in range(ranks)]


@pytest.mark.parametrize("requested", ["auto", "cuda"])
@pytest.mark.parametrize("ranks, gpus", [(2, 1), (8, 1), (8, 4), (3, 2)])
def test_more_ranks_than_gpus_stops_every_rank(requested, ranks, gpus):
    # Every rank, including those whose GPU exists, stops: otherwise the others would wait for them.
    for rank in range(ranks):
        with pytest.raises(ConfigError) as e:
            choose_device(requested, rank, ranks, gpus)
        message = str(e.value)
        assert "\n" not in message
        assert f"{ranks} ranks on this node but {gpus} visible GPU" in message
        assert f"--nproc-per-node {gpus}" in message
        assert "parallel.cp_degree" in message
        assert "device=cpu" in message


def test_a_rank_beyond_the_announced_local_world_still_counts():
    # LOCAL_RANK=1 without LOCAL_WORLD_SIZE: at least two ranks share the node's one GPU.
    with pytest.raises(ConfigError, match="2 ranks on this node but 1 visible GPU,"):
        choose_device("auto", 1, 1, 1)


def test_cuda_without_gpus_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="device=cuda needs a CUDA GPU, but this process sees none.*device=cpu"):
        choose_device("cuda", 0, 1, 0)
    with pytest.raises(ConfigError, match="device must be one of"):
        choose_device("tpu", 0, 1, 1)


def test_messages_use_the_names_of_the_tool_that_asks():
    with pytest.raises(ConfigError) as e:
        choose_device("auto", 0, 2, 1, option="--device", cp_option="--cp")
    assert "--cp that fits" in str(e.value) and "(--device cpu)" in str(e.value)
    with pytest.raises(ConfigError, match="--device cuda needs a CUDA GPU"):
        choose_device("cuda", 0, 1, 0, option="--device")


@pytest.mark.parametrize("requested, gpus, expected", [
    ("auto", 0, CPU_RANKS), ("auto", 1, 1), ("auto", 8, 8), ("cuda", 4, 4), ("cpu", 0, CPU_RANKS), ("cpu", 8, CPU_RANKS),
])
def test_default_ranks_per_node(requested, gpus, expected):
    assert default_ranks_per_node(requested, gpus) == expected
    # The default never breaks the rule it is meant to satisfy.
    for rank in range(expected):
        choose_device(requested, rank, expected, gpus)


def test_local_device_reads_torchruns_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert local_device("auto") == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)]  # kernels and NCCL then use this rank's GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 ranks on this node but 1 visible GPU"):
        local_device("auto")


def test_lh_train_stops_before_any_process_group(monkeypatch, capsys, tmp_path, stdlib_dataset):
    """Rank 0 of two on a node with one GPU (counts faked): one line, exit 2, no process group."""
    from lh_dist.train.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["--config", str(REPO / "configs/tiny-cpu.yaml"), f"data.path={stdlib_dataset}",
                 f"logging.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lh-train: config error: 2 ranks on this node but 1 visible GPU") and err.count("\n") == 1
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


def test_lh_eval_uses_the_same_rule(monkeypatch, capsys, tmp_path):
    from lh_dist.eval.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    # The device is decided first, before the checkpoint is even looked for.
    assert main(["passkey", str(tmp_path / "missing"), "--cp", "2"]) == 2
    assert "2 ranks on this node but 1 visible GPU" in capsys.readouterr().err


def test_expandable_segments_are_set_when_nobody_chose():
    environ = {"PATH": "/usr/bin"}
    assert use_expandable_segments(environ)
    assert environ == {"PATH": "/usr/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.parametrize("name", ALLOC_CONF_VARS)
def test_a_users_allocator_setting_stands(name):
    environ = {name: "max_split_size_mb:512"}
    assert not use_expandable_segments(environ)
    assert environ == {name: "max_split_size_mb:512"}  # not changed, and no second variable beside it


def _no_allocator_setting(monkeypatch):
    for name in ALLOC_CONF_VARS:
        monkeypatch.delenv(name, raising=False)


def test_lh_train_and_lh_eval_set_the_allocator_first(monkeypatch, tmp_path):
    from lh_dist.eval.cli import main as lh_eval
    from lh_dist.train.cli import main as lh_train

    _no_allocator_setting(monkeypatch)
    assert lh_train(["--config", str(REPO / "configs/tiny-cpu.yaml"), "--print-config"]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == EXPANDABLE_SEGMENTS
    _no_allocator_setting(monkeypatch)
    assert lh_eval(["loss", str(tmp_path / "missing")]) == 2  # set before the checkpoint is looked for
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == EXPANDABLE_SEGMENTS
    _no_allocator_setting(monkeypatch)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    assert lh_train(["--config", str(REPO / "configs/tiny-cpu.yaml"), "--print-config"]) == 0
    assert lh_eval(["loss", str(tmp_path / "missing")]) == 2
    assert os.environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:512"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
