"""What `lh-train` refuses before any work, checked in this process: bad invocations (one line, exit
status 2, nothing written) and a validation split too short for the evaluations.
tests/integration/test_train_errors.py meets the errors that need a real `lh-train` process."""

from pathlib import Path

import pytest

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
RUN = [*SMALL_RUN, "parallel.cp_degree=1", "logging.eval_interval=100", "checkpoint.interval=2", "schedule.steps=6"]


def lh_train_args(run_dir: Path, data: Path, *args: str) -> list[str]:
    return ["--config", str(REPO / "configs/tiny-cpu.yaml"), f"data.path={data}", f"logging.run_dir={run_dir}",
            *RUN, *args]


def test_bad_invocations_fail_before_any_work(tmp_path, stdlib_dataset, capsys):
    """Errors found before training starts; `lh-train`'s main runs in this process (nothing is imported
    from DeepSpeed or started before them)."""
    from lh_dist.train.cli import main

    def error(*args: str) -> str:
        assert main(lh_train_args(run_dir, stdlib_dataset, *args)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    run_dir = tmp_path / "run"
    binary = tmp_path / "config.bin"
    binary.write_bytes(bytes(range(256)))
    assert error("--config", str(binary)) == \
        f"lh-train: config error: config file {binary} is not a text file (not UTF-8)"
    (tmp_path / "file").write_text("x")
    assert error(f"logging.run_dir={tmp_path / 'file'}") == \
        f"lh-train: config error: logging.run_dir must be a directory, but itself is a file: {tmp_path / 'file'}"
    other = tmp_path / "other"
    (other / "checkpoints/.partial-step_00000004").mkdir(parents=True)
    assert error("--resume", str(other)).endswith(
        f"got '{other}' (a run directory: resume it with --resume auto and logging.run_dir set to it)")
    partial = other / "checkpoints/.partial-step_00000004"
    assert error("--resume", str(partial)).endswith(f"got '{partial}' (an incomplete save)")
    assert error("--rewind") == "lh-train: config error: --rewind goes with --resume <checkpoint folder>"
    assert error("--resume", "auto", "--overwrite").startswith("lh-train: config error: --overwrite goes with")
    assert not run_dir.exists()


def test_split_too_short_for_the_evaluations_is_refused_before_any_work():
    from lh_dist.config import ConfigError, load_config
    from lh_dist.train.loop import check_split_sizes

    cfg = load_config(REPO / "configs/paper-530m-98k.yaml")
    info = {"splits": {"train": {"tokens": 10_000_000, "documents": 100}, "val": {"tokens": 41_851, "documents": 2}}}
    with pytest.raises(ConfigError, match="split 'val' .* holds 41,851 tokens, 0 samples .* needs 16 .*--val-tokens"):
        check_split_sizes(cfg, info, dp=1)
    info["splits"]["val"] = {"tokens": 16 * 98_305 - 5, "documents": 5}  # exactly 16 samples with the EOD tokens
    check_split_sizes(cfg, info, dp=1)
    with pytest.raises(ConfigError, match="needs 32"):
        check_split_sizes(cfg, info, dp=2)
    # A source of a mixture is named by its entry.
    with pytest.raises(ConfigError, match=r"^data.sources\[1\] \(web\): split 'val' of runs/data/web holds"):
        check_split_sizes(cfg, info, 2, "data.sources[1] (web)", "runs/data/web")
    # A retrieval set's validation split is sized in documents.
    with pytest.raises(ConfigError, match="lh-data retrieval --val-docs or lower"):
        check_split_sizes(cfg, info | {"retrieval": {"doc_tokens": 98_304}}, dp=4)


def test_retrieval_documents_of_another_length_than_the_samples_are_warned_about():
    from lh_dist.config import load_config
    from lh_dist.train.loop import retrieval_length_warning

    cfg = load_config(REPO / "configs/paper-530m-98k.yaml")  # data.seq_len 98,304
    assert retrieval_length_warning(cfg, {"retrieval": {"doc_tokens": 98_304}}, "data.path", "r") is None
    assert retrieval_length_warning(cfg, {}, "data.path", "code") is None
    short = retrieval_length_warning(cfg, {"retrieval": {"doc_tokens": 131_072}}, "data.sources[1] (ret)", "r")
    assert short.startswith("warning: data.sources[1] (ret): r holds retrieval documents of 131,072 tokens")
    assert "parting queries from the statements" in short and "--doc-tokens 98304" in short
    assert "join several" in retrieval_length_warning(cfg, {"retrieval": {"doc_tokens": 4096}}, "data.path", "r")


def test_a_cp_degree_that_does_not_divide_the_world_size_is_named_first(tmp_path, capsys, monkeypatch):
    """cp_degree 3 on 2 ranks; on its own it also breaks Lighthouse's tiling (4 tiles over 6 chunks) and
    zigzag sharding (1024 tokens over 6 chunks), but what is wrong is the layout."""
    from lh_dist.train.cli import main

    args = ["--config", str(REPO / "configs/tiny-cpu.yaml"), f"logging.run_dir={tmp_path / 'run'}",
            "parallel.cp_degree=3"]
    assert main([*args, "--dry-run", "--world-size", "2"]) == 2
    assert capsys.readouterr().err == "lh-train: config error: parallel.cp_degree=3 must divide the world size 2\n"
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each rank
    assert main(args) == 2
    assert capsys.readouterr().err == "lh-train: config error: parallel.cp_degree=3 must divide the world size 2\n"
    monkeypatch.delenv("WORLD_SIZE")  # one process, started without torchrun: say how to start more
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "lh-train: config error: parallel.cp_degree=3 must divide the world size 1 (one process: start 3 ranks with "
        "torchrun --nproc-per-node 3, or set parallel.cp_degree=1)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, got", [("- model\n- data\n", "list ['model', 'data']"),
                                       ("model.dim=64\n", "str 'model.dim=64'")])
@pytest.mark.parametrize("override", ["schedule.steps=3", "seed=3"])
def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path, capsys, text, got, override):
    from lh_dist.train.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["--config", str(path), override, "--print-config"]) == 2
    assert capsys.readouterr().err == (f"lh-train: config error: config file {path} must hold a mapping of "
                                       f"sections (model:, data:, ...), got {got}\n")
