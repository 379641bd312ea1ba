"""Every CLI's -h: descriptions, defaults, choices and examples; lh-train --print-config, --dry-run [--json]
and --ranks-per-node."""

import json

import pytest
import torch
import yaml

from lh_dist.config import load_config
from lh_dist.eval.cli import main as lh_eval
from lh_dist.hf.export import main as lh_export
from lh_dist.parallel.device import CPU_RANKS, default_ranks_per_node
from lh_dist.train.cli import main as lh_train


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv + ["-h"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("main, argv, expected", [
    (lh_eval, [], ["passkey", "loss", "index.json", "passkey-256_512_1024.json", "loss-dense.json"]),
    (lh_eval, ["passkey"], ["Pass-key retrieval", "(default: 0,15,30,50,70,85,100)", "(default: auto)",
                            "{auto,cpu,cuda}", "example:\n  lh-eval passkey"]),
    (lh_eval, ["loss"], ["by position bucket", "{linear,log}", "{dense,lighthouse}", "(default: 8)",
                         "(default: linear)", "examples:\n  lh-eval loss", "--bits-per-byte"]),
    (lh_export, [], ["generation_config.json", "{float32,bfloat16,float16}", "(default: float32", "folder to write",
                     "lh-export runs/tiny-cpu --out"]),
    (lh_train, [], ["--print-config", "(default: $WORLD_SIZE, else 1)", "lh-train --config", "Config sections"]),
])
def test_help_has_descriptions_defaults_choices_and_examples(main, argv, expected, capsys):
    text = " ".join(_help(main, argv, capsys).split())  # argparse wraps lines to the terminal width
    for piece in expected:
        assert " ".join(piece.split()) in text, piece
    assert "(default: None)" not in text


def test_lh_train_examples_keep_their_lines(capsys):
    # The description is printed raw: an example continued with a backslash must show it and break there.
    lines = _help(lh_train, [], capsys).splitlines()
    init_from = next(line for line in lines if "--init-from runs/qwen3-import" in line)
    assert init_from.endswith("\\") and "data.path=" not in init_from


def test_print_config_prints_the_full_resolved_config(capsys):
    assert lh_train(["--config", "configs/tiny-cpu.yaml", "--print-config", "schedule.steps=77"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config("configs/tiny-cpu.yaml", ["schedule.steps=77"]).to_dict()
    assert printed == expected and printed["schedule"]["steps"] == 77 and "attention_backend" in printed["model"]


def test_dry_run_suggests_world_size(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert lh_train(["--config", "configs/tiny-cpu.yaml", "--dry-run"]) == 2
    assert "pass --world-size N" in capsys.readouterr().err
    assert lh_train(["--config", "configs/tiny-cpu.yaml", "--dry-run", "--world-size", "2"]) == 0
    assert "world size 2 = dp 1 x cp 2" in capsys.readouterr().out


def test_dry_run_json_is_the_plan_for_scripts(capsys):
    argv = ["--config", "configs/paper-530m-98k.yaml", "--dry-run", "--world-size", "8", "parallel.cp_degree=4"]
    assert lh_train(argv) == 0
    words = capsys.readouterr().out
    assert lh_train(argv + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)  # one JSON object and nothing else
    assert (plan["world_size"], plan["dp_degree"], plan["cp_degree"]) == (8, 2, 4)
    assert plan["cp_groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]] and plan["dp_groups"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan["tokens_per_rank"] == 98304 // 4 and plan["tokens_per_step"] == 2 * 98304
    assert plan["lighthouse"]["gathered_length"] == 22528  # N / 4^2 + 2 * 4 * 2048
    assert plan["text"] + "\n" == words
    assert lh_train(["--config", "configs/tiny-cpu.yaml", "--json"]) == 2
    assert capsys.readouterr().err == "lh-train: config error: --json goes with --dry-run\n"


def test_ranks_per_node_is_the_device_rule(capsys):
    assert lh_train(["--config", "configs/tiny-cpu.yaml", "--ranks-per-node"]) == 0
    assert capsys.readouterr().out == f"{default_ranks_per_node('auto', torch.cuda.device_count())}\n"
    assert lh_train(["--config", "configs/tiny-cpu.yaml", "--ranks-per-node", "device=cpu"]) == 0
    assert capsys.readouterr().out == f"{CPU_RANKS}\n"
