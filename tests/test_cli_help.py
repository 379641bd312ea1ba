"""Every CLI's -h: descriptions, defaults, choices and examples; lh-train --print-config and --dry-run."""

import pytest
import yaml

from lh_dist.config import load_config
from lh_dist.eval.cli import main as lh_eval
from lh_dist.train.cli import main as lh_train
from lh_dist.train.export import main as lh_export


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
