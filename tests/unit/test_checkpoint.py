"""Checkpoint manifests, walking back past torn checkpoints, rotation, rewinds, resume checks, the run-dir lock.

These run in the test process with one rank. The engine is a stand-in with the two methods the
checkpointer calls (it writes and reads one real file); tests/integration/test_checkpoint_kills.py runs
the same code under torchrun with DeepSpeed and kills it at every point of a save, and
tests/integration/test_run_lock.py holds the lock from another process.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from lh_dist.checkpoint import run_dir as run_dir_module
from lh_dist.checkpoint.checkpointer import Checkpointer, check_resume, check_resume_arg
from lh_dist.checkpoint.format import (FORMAT_VERSION, MANIFEST, InvalidCheckpoint, checkpoint_config, read_manifest,
                                       resolve_checkpoint, survey)
from lh_dist.checkpoint.run_dir import LOCK_NAME, RunDirError, RunLock, archive_previous_run, check_run_dir
from lh_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = "mp_rank_00_model_states.pt"


class FileEngine:
    """The training engine's save / load as the checkpointer uses them, on one real file."""

    def __init__(self, value: float = 0.0):
        self.weights = torch.full((4096,), value)

    def save(self, folder):
        torch.save({"w": self.weights}, Path(folder, WEIGHTS))

    def load(self, folder):
        self.weights = torch.load(Path(folder, WEIGHTS))["w"]


def make_cfg(tmp_path, *overrides):
    return load_config(REPO / "configs/tiny-cpu.yaml", [f"logging.run_dir={tmp_path / 'run'}",
                                                        f"data.path={tmp_path / 'data'}", "model.dim=64",
                                                        "data.micro_batch=2", "schedule.lighthouse_steps=0", *overrides])


def state(step: int) -> dict:
    data = {"split": "train", "seed": 0, "seq_len": 1024, "num_documents": 10, "samples_seen": 2 * step}
    return {"step": step, "phase": "dense", "data": data, "nonfinite_total": 0}


def train(cfg, steps, resume="auto", **flags) -> tuple[Checkpointer, list[str]]:
    """Open the run dir like a starting run, then save at each of `steps` (weights = the step)."""
    ck = Checkpointer(cfg, rank=0)
    plan = ck.open(resume, **flags)
    messages = plan.messages + ck.start(plan)
    for step in steps:
        ck.save(FileEngine(float(step)), step, state(step))
    return ck, messages


def names(cfg) -> list[str]:
    return sorted(p.name for p in (Path(cfg.logging.run_dir) / "checkpoints").iterdir())


def test_manifest_is_written_last_and_lists_every_file(tmp_path):
    cfg = make_cfg(tmp_path)
    train(cfg, [2])
    folder = Path(cfg.logging.run_dir) / "checkpoints/step_00000002"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert manifest["files"][WEIGHTS]["bytes"] == (folder / WEIGHTS).stat().st_size
    assert manifest["step"] == 2 and manifest["phase"] == "dense" and manifest["config"]["model"]["dim"] == 64
    assert manifest["world"] == {"world_size": 1, "dp_degree": 1, "cp_degree": 2, "zero_stage": 0}
    assert manifest["data"]["samples_seen"] == 4
    # The manifest is the newest file of the folder.
    assert max(p.stat().st_mtime_ns for p in folder.iterdir()) == (folder / MANIFEST).stat().st_mtime_ns


def test_a_manifest_of_another_format_version_is_not_a_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path)
    train(cfg, [2])
    folder = Path(cfg.logging.run_dir) / "checkpoints/step_00000002"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    (folder / MANIFEST).write_text(json.dumps(manifest | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(InvalidCheckpoint) as e:
        read_manifest(folder)
    assert str(e.value) == (f"its manifest.json has format_version {FORMAT_VERSION + 1}; this lh_dist reads "
                            f"format_version {FORMAT_VERSION} only")
    with pytest.raises(FileNotFoundError, match=f"step_00000002 is not a complete checkpoint: its manifest.json "
                                                f"has format_version {FORMAT_VERSION + 1};"):
        resolve_checkpoint(folder)
    with pytest.raises(RunDirError, match=f"none is usable \\(step_00000002: its manifest.json has format_version "
                                          f"{FORMAT_VERSION + 1};"):
        Checkpointer(cfg, rank=0).open("auto")  # a run neither starts over it nor deletes it
    assert names(cfg) == ["step_00000002"]


def test_resume_auto_walks_back_past_torn_checkpoints_and_says_why(tmp_path):
    cfg = make_cfg(tmp_path, "checkpoint.keep=5")
    train(cfg, [1, 2, 3, 4])
    root = Path(cfg.logging.run_dir) / "checkpoints"
    (root / "step_00000004" / MANIFEST).unlink()  # a save interrupted before its manifest
    weights = root / "step_00000003" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    weights = root / "step_00000002" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))

    ck = Checkpointer(cfg, rank=0)
    plan = ck.open("auto")
    assert plan.folder == str(root / "step_00000001")
    skipped = [m for m in plan.messages if m.startswith("skipped")]
    assert skipped[0] == "skipped checkpoint step_00000004: it has no manifest.json (an interrupted save)"
    assert skipped[1].startswith("skipped checkpoint step_00000003: mp_rank_00_model_states.pt has 100 bytes, "
                                 "the manifest says ")
    assert skipped[2] == ("skipped checkpoint step_00000002: mp_rank_00_model_states.pt is corrupt (its CRC32 "
                          "differs from the manifest)")
    engine = FileEngine()
    assert ck.load(engine, plan)["step"] == 1 and engine.weights[0] == 1.0
    # Torn folders are never counted: export and eval pick the same checkpoint.
    assert resolve_checkpoint(cfg.logging.run_dir) == root / "step_00000001"
    with pytest.raises(FileNotFoundError, match="step_00000003 is not a complete checkpoint: .* has 100 bytes"):
        resolve_checkpoint(root / "step_00000003")


def test_an_interrupted_rename_is_completed_and_leftovers_are_removed(tmp_path):
    cfg = make_cfg(tmp_path, "checkpoint.keep=5")
    train(cfg, [1, 2])
    root = Path(cfg.logging.run_dir) / "checkpoints"
    # Step 2's save was complete, its rename missed; step 3's save died while ranks wrote;
    # a rotation and an overwrite died before removing what they had set aside.
    os.replace(root / "step_00000002", root / ".partial-step_00000002")
    (root / ".partial-step_00000003").mkdir()
    (root / ".partial-step_00000003" / WEIGHTS).write_bytes(b"torn")
    shutil.copytree(root / "step_00000001", root / ".deleting-step_00000000")
    shutil.copytree(root / "step_00000001", root / ".replaced-step_00000001")

    ck = Checkpointer(cfg, rank=0)
    plan = ck.open("auto")
    assert plan.folder == str(root / "step_00000002")
    assert "completing the interrupted save of step_00000002" in plan.messages
    ck.start(plan)
    assert names(cfg) == ["step_00000001", "step_00000002"]
    assert ck.load(FileEngine(), plan)["step"] == 2


def test_a_fresh_start_over_checkpoints_is_refused_unless_overwrite_archives_them(tmp_path):
    cfg = make_cfg(tmp_path)
    train(cfg, [15, 20])
    run = Path(cfg.logging.run_dir)
    with pytest.raises(RunDirError, match=r"already holds checkpoints \(step_00000020, step_00000015\): "
                                          r"--resume none would start another run over them"):
        Checkpointer(cfg, rank=0).open("none")
    _, messages = train(cfg, [5, 10], resume="none", overwrite=True)
    (archive,) = (run / "archive").iterdir()
    assert any(m == f"archived the previous run's outputs in {archive}" for m in messages)
    assert sorted(p.name for p in (archive / "checkpoints").iterdir()) == ["step_00000015", "step_00000020"]
    assert (archive / "config.yaml").is_file()
    # Rotation never removes what this run wrote; --resume auto continues it, not the archived one.
    assert names(cfg) == ["step_00000005", "step_00000010"]
    assert Checkpointer(cfg, rank=0).open("auto").folder == str(run / "checkpoints/step_00000010")


def test_resume_arguments_are_checked_by_one_rule_in_the_cli_and_the_checkpointer(tmp_path):
    cfg = make_cfg(tmp_path)
    train(cfg, [5])
    run = Path(cfg.logging.run_dir)
    own, other = run / "checkpoints/step_00000005", tmp_path / "other/checkpoints/step_00000005"
    shutil.copytree(own, other)
    assert check_resume_arg(str(other), True, False, run) is True  # another run's checkpoint, archived over
    assert check_resume_arg(str(own), False, True, run) is False
    for resume, overwrite, rewind, message in [
            ("auto", True, False, "--overwrite goes with --resume none or another run's checkpoint folder"),
            (str(own), True, False, "--overwrite goes with --resume none or another run's checkpoint folder"),
            ("none", False, True, "--rewind goes with --resume <checkpoint folder>"),
            (str(run), False, False, "--resume must be 'auto', 'none' or a checkpoint folder step_XXXXXXXX")]:
        with pytest.raises(ConfigError) as before:
            check_resume_arg(resume, overwrite, rewind, run)  # what lh-train checks before any process group
        with pytest.raises(ConfigError) as opening:
            Checkpointer(cfg, rank=0).open(resume, overwrite=overwrite, rewind=rewind)
        assert str(before.value) == str(opening.value) and str(before.value).startswith(message)


def test_a_rewind_is_explicit_and_drops_later_checkpoints_after_its_first_new_one(tmp_path):
    cfg = make_cfg(tmp_path, "checkpoint.keep=3")
    train(cfg, [10, 15, 20])
    root = Path(cfg.logging.run_dir) / "checkpoints"
    with pytest.raises(RunDirError, match="abandons step_00000015, step_00000020; pass --rewind"):
        Checkpointer(cfg, rank=0).open(str(root / "step_00000010"))

    # A stop signal at step 13 after rewinding to 10: 13 is kept, and so is 10.
    cfg2 = make_cfg(tmp_path, "checkpoint.keep=2")
    _, messages = train(cfg2, [], resume=str(root / "step_00000010"), rewind=True)
    assert any(m.startswith("rewinding to step_00000010: step_00000015, step_00000020 will be removed") for m in
               messages)
    assert names(cfg2) == ["step_00000010", "step_00000015", "step_00000020"]  # nothing removed yet
    ck = Checkpointer(cfg2, rank=0)
    ck.start(ck.open(str(root / "step_00000010"), rewind=True))
    ck.save(FileEngine(13.0), 13, state(13))
    assert names(cfg2) == ["step_00000010", "step_00000013"]


def test_a_rewind_interrupted_before_it_removed_the_abandoned_checkpoints(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "checkpoint.keep=3")
    train(cfg, [10, 15, 20])
    root = Path(cfg.logging.run_dir) / "checkpoints"
    ck = Checkpointer(cfg, rank=0)
    ck.start(ck.open(str(root / "step_00000010"), rewind=True))
    # The new step 15 replaces the old one; the run dies before its rotation.
    monkeypatch.setattr(ck, "_rotate", lambda step: None)
    ck.save(FileEngine(-15.0), 15, state(15))
    assert names(cfg) == ["step_00000010", "step_00000015", "step_00000020"]
    # The new step 15's manifest names what the rewind abandoned, so step 20 is not resumed from.
    problems = {f.path.name: f.problem for f in survey(root)}
    assert problems["step_00000020"] == "a rewind abandoned it (step_00000015 replaces it)"
    assert problems["step_00000015"] is None
    ck2 = Checkpointer(cfg, rank=0)
    plan = ck2.open("auto")
    assert plan.folder == str(root / "step_00000015")
    ck2.start(plan)
    assert names(cfg) == ["step_00000010", "step_00000015"]
    engine = FileEngine()
    ck2.load(engine, plan)
    assert engine.weights[0] == -15.0


def damage(folder: Path) -> str:
    """Truncate a checkpoint's weights to 100 bytes; returns why the checkpoint is not usable now."""
    weights = folder / WEIGHTS
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    return f"{WEIGHTS} has 100 bytes, the manifest says {size}"


def test_a_run_dir_whose_checkpoints_are_all_damaged_is_refused_and_left_as_it_is(tmp_path):
    cfg = make_cfg(tmp_path, "checkpoint.keep=5")
    train(cfg, [2, 4])
    run, root = Path(cfg.logging.run_dir), Path(cfg.logging.run_dir) / "checkpoints"
    why = damage(root / "step_00000004")
    (root / "step_00000002" / MANIFEST).unlink()
    with pytest.raises(RunDirError) as refused:
        Checkpointer(cfg, rank=0).open("auto")
    assert str(refused.value) == (
        f"run dir {run} holds checkpoints but none is usable (step_00000004: {why}; step_00000002: it has no "
        f"manifest.json (an interrupted save)): nothing was changed; restore a checkpoint to resume, or pass "
        f"--resume none --overwrite to archive them and start afresh")
    assert names(cfg) == ["step_00000002", "step_00000004"]
    # What the message proposes: they are archived, not deleted, and a new run starts.
    _, messages = train(cfg, [1], resume="none", overwrite=True)
    (archive,) = (run / "archive").iterdir()
    assert sorted(p.name for p in (archive / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert names(cfg) == ["step_00000001"]


def test_rotation_removes_only_what_the_run_supersedes(tmp_path):
    cfg = make_cfg(tmp_path, "checkpoint.keep=5")
    train(cfg, [1, 2, 4, 6])
    root = Path(cfg.logging.run_dir) / "checkpoints"
    why = {step: damage(root / f"step_{step:08d}") for step in (1, 4, 6)}
    ck = Checkpointer(cfg, rank=0)
    plan = ck.open("auto")
    assert plan.folder == str(root / "step_00000002")
    assert [m for m in plan.messages if m.startswith("skipped")] == [
        f"skipped checkpoint step_00000006: {why[6]}", f"skipped checkpoint step_00000004: {why[4]}"]
    ck.start(plan)
    (root / "step_00000009").mkdir()  # appears while the run trains: not the run's to remove
    ck.save(FileEngine(3.0), 3, state(3))
    # The damaged steps 4 and 6 that the run passed over are superseded; the damaged step 1, older than
    # the checkpoint it resumed, was never passed over and stays.
    assert names(cfg) == ["step_00000001", "step_00000002", "step_00000003", "step_00000009"]
    for step in (4, 5):
        ck.save(FileEngine(float(step)), step, state(step))  # a new step_00000004 is the run's own
    assert names(cfg) == ["step_00000001", "step_00000002", "step_00000003", "step_00000004", "step_00000005",
                          "step_00000009"]


@pytest.mark.parametrize("override, message", [
    ("model.dim=128", "model.dim 64 -> 128"),
    ("model.n_kv_heads=4", "model.n_kv_heads 2 -> 4"),
    ("model.vocab_size=300", "model.vocab_size 257 -> 300"),
    ("model.qk_norm=true", "model.qk_norm False -> True"),
    ("model.rope_scaling={type: linear, factor: 2.0}", "model.rope_scaling.type 'none' -> 'linear'"),
    ("data.seq_len=512", "data.seq_len 1024 -> 512"),
    ("seed=3", "seed 0 -> 3"),
    ("lighthouse.topk=256", "lighthouse.topk 512 -> 256"),
    ("lighthouse.dense_layers=[0]", "lighthouse.dense_layers [0, -1] -> [0]"),
    ("parallel.zero_stage=1", "parallel.zero_stage 0 -> 1"),
])
def test_resume_refuses_a_changed_fixed_setting_before_writing_anything(tmp_path, override, message):
    cfg = make_cfg(tmp_path)
    train(cfg, [2])
    config_yaml = Path(cfg.logging.run_dir) / "config.yaml"
    before = config_yaml.read_text()
    with pytest.raises(ConfigError) as e:
        Checkpointer(make_cfg(tmp_path, override), rank=0).open("auto")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"cannot resume from {cfg.logging.run_dir}/checkpoints/step_00000002: ")
    assert config_yaml.read_text() == before


def test_resume_checks_data_path_world_size_and_data_position(tmp_path):
    cfg = make_cfg(tmp_path)
    train(cfg, [3])  # 6 samples seen
    manifest = read_manifest(Path(cfg.logging.run_dir) / "checkpoints/step_00000003")
    folder = Path("step_00000003")
    with pytest.raises(ConfigError, match=f"data.path '{tmp_path / 'data'}' -> '/elsewhere/data'"):
        check_resume(manifest, folder, make_cfg(tmp_path, "data.path=/elsewhere/data"), 1, 1)
    # Allowed, and listed: the optimizer, the schedule, the CP degree and the world size (ZeRO 0).
    notes = check_resume(manifest, folder, make_cfg(tmp_path, "optim.lr=0.001", "schedule.steps=90",
                                                    "parallel.cp_degree=1"), 3, 3)
    assert notes == ["resuming with changed settings: parallel.cp_degree 2 -> 1, optim.lr 0.003 -> 0.001, "
                     "schedule.steps 60 -> 90, world 1 (dp 1 x cp 2) -> 3 (dp 3 x cp 1)"]
    # The saved position must be a whole number of the new global batches.
    with pytest.raises(ConfigError, match="seen 6 samples, not a multiple of data.micro_batch x dp = 2 x 2"):
        check_resume(manifest, folder, make_cfg(tmp_path), 2, 2)
    # ZeRO partitions the optimizer state per rank: same world size only (the split may change).
    manifest["world"] |= {"world_size": 2, "zero_stage": 1}
    manifest["config"]["parallel"]["zero_stage"] = 1
    zero1 = make_cfg(tmp_path, "parallel.zero_stage=1", "parallel.cp_degree=1")
    assert check_resume(manifest, folder, zero1, 2, 1)
    with pytest.raises(ConfigError, match="on 1 ranks: ZeRO stage 1 partitions the optimizer state over the 2"):
        check_resume(manifest, folder, zero1, 1, 1)


def test_export_and_eval_refuse_a_config_yaml_that_does_not_match_the_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path)
    train(cfg, [2])
    folder = Path(cfg.logging.run_dir) / "checkpoints/step_00000002"
    assert checkpoint_config(folder, ["lighthouse.topk=256"]).lighthouse.topk == 256  # overrides still apply
    config_yaml = Path(cfg.logging.run_dir) / "config.yaml"
    config_yaml.write_text(config_yaml.read_text().replace("dim: 64", "dim: 128"))
    with pytest.raises(ValueError, match="does not belong to .*step_00000002: it says model.dim=128 "
                                         r"\(the checkpoint has 64\)"):
        checkpoint_config(folder)


def test_free_space_is_checked_before_a_checkpoint_is_written(tmp_path):
    cfg = make_cfg(tmp_path)
    ck, _ = train(cfg, [])
    free = shutil.disk_usage(tmp_path).free
    ck.n_params = free // 8  # 16 bytes per parameter before any checkpoint was measured
    with pytest.raises(RunDirError, match=r"not enough free space for checkpoint step_00000001 in .*: it needs "
                                          r"about [\d.]+ [MG]iB, [\d.]+ [MG]iB are free"):
        ck.save(FileEngine(), 1, state(1))
    assert names(cfg) == []  # nothing half-written holds space
    ck.n_params = 1000
    ck.save(FileEngine(), 1, state(1))
    # Later checkpoints are expected to be as large as the last one.
    assert ck.expected_bytes() == sum(f["bytes"] for f in read_manifest(
        Path(cfg.logging.run_dir) / "checkpoints/step_00000001")["files"].values())


def test_run_dir_must_be_a_writable_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="logging.run_dir must be a directory, but itself is a file"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="but its parent .*file is a file"):
        check_run_dir(tmp_path / "file" / "run")
    check_run_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # checking writes nothing


def test_lock_of_another_host_is_stale_only_without_heartbeat_or_from_an_earlier_slurm_attempt(tmp_path,
                                                                                               monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    other = {"id": "x", "host": "node-b", "pid": 4242, "slurm_job": "77", "slurm_restart": "0", "since": "t"}
    (run / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(RunDirError, match="in use by another training \\(pid 4242 on node-b, SLURM job 77"):
        RunLock(run).acquire()
    # The same SLURM job, requeued: its earlier attempt has ended, wherever it ran.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(run)
    assert lock.acquire()[0].endswith("it was taken by attempt 0 of this SLURM job")
    lock.release()
    # Another job on another host: stale once its heartbeat is older than STALE_AFTER_S.
    monkeypatch.delenv("SLURM_JOB_ID")
    (run / LOCK_NAME).write_text(json.dumps(other))
    old = time.time() - run_dir_module.STALE_AFTER_S - 60
    os.utime(run / LOCK_NAME, (old, old))
    lock = RunLock(run)
    (message,) = lock.acquire()
    assert message.startswith("removed the stale lock of pid 4242 on node-b") and "its heartbeat stopped" in message
    # The holder's heartbeat keeps its lock fresh.
    monkeypatch.setattr(run_dir_module, "HEARTBEAT_S", 0.05)
    lock.release()
    lock = RunLock(run)
    lock.acquire()
    before = (run / LOCK_NAME).stat().st_mtime_ns
    time.sleep(0.5)
    assert (run / LOCK_NAME).stat().st_mtime_ns > before
    lock.release()


def test_lock_release_leaves_no_trace_of_a_refused_start(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run)
    lock.acquire()
    lock.release()
    assert not run.exists()  # created for the lock, empty again: removed


def test_archive_moves_only_what_training_wrote(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    (run / "notes.txt").write_text("mine")
    target = archive_previous_run(run)
    assert sorted(p.name for p in target.iterdir()) == ["checkpoints", "config.yaml"]
    assert (run / "notes.txt").read_text() == "mine"
    assert archive_previous_run(run) is None
