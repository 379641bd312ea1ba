"""benchmarks/reproduce.py's retrieval set: built with the --retrieval-* document settings, reused only when
its lh_data.json records the same ones (a set written before the query options reads as their defaults)."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)

OLD_RECORD = {"doc_tokens": 1024, "keys": 32, "queries": 16, "min_gap": 64, "value_digits": 6, "seed": 0,
              "version": 1}


def _args(tmp_path, *options):
    config = tmp_path / "config.yaml"
    sources = [{"path": str(tmp_path / "code"), "name": "code"},
               {"path": str(tmp_path / "retrieval"), "name": "retrieval"}]
    config.write_text(yaml.safe_dump({"data": {"seq_len": 1024, "sources": sources}}))
    args = reproduce.build_parser().parse_args(["data", "--config", str(config), *options])
    assert isinstance(args, argparse.Namespace)
    return args


def _write_set(tmp_path, record):
    (tmp_path / "retrieval").mkdir(exist_ok=True)
    (tmp_path / "retrieval" / "lh_data.json").write_text(json.dumps({"retrieval": record}))


def test_a_missing_set_is_built_with_the_query_options(tmp_path, monkeypatch):
    commands = []

    def run(command, log_file=None):
        commands.append(command)
        _write_set(tmp_path, OLD_RECORD | {"query_form": "restate", "queries_per_key": 3})
        return 0.0

    monkeypatch.setattr(reproduce, "_run", run)
    reproduce.ensure_retrieval(_args(tmp_path, "--retrieval-keys", "32", "--retrieval-queries", "16",
                                     "--retrieval-query-form", "restate", "--retrieval-queries-per-key", "3"),
                               tmp_path / "code")
    command = commands[0]
    assert command[command.index("--query-form") + 1] == "restate"
    assert command[command.index("--queries-per-key") + 1] == "3"


def test_a_set_written_before_the_query_options_is_reused_with_the_defaults(tmp_path, capsys):
    _write_set(tmp_path, OLD_RECORD)
    # The generator's defaults (assert, one query per key) asked for explicitly: reproduce.py's own differ.
    old = ["--retrieval-keys", "32", "--retrieval-queries", "16", "--retrieval-query-form", "assert",
           "--retrieval-queries-per-key", "1"]
    assert reproduce.ensure_retrieval(_args(tmp_path, *old), tmp_path / "code")["retrieval"] == OLD_RECORD
    assert "not rebuilt" in capsys.readouterr().out


@pytest.mark.parametrize("options, message", [
    (["--retrieval-query-form", "restate"], "query_form assert (asked restate)"),
    (["--retrieval-queries-per-key", "2"], "queries_per_key 1 (asked 2)"),
    (["--retrieval-keys", "256", "--retrieval-queries", "192"], "keys 32 (asked 256), queries 16 (asked 192)"),
])
def test_a_set_built_with_other_settings_is_refused_in_one_line(tmp_path, options, message):
    _write_set(tmp_path, OLD_RECORD)
    with pytest.raises(SystemExit) as refused:
        reproduce.ensure_retrieval(_args(tmp_path, *options), tmp_path / "code")
    text = str(refused.value.code)
    assert message in text and "\n" not in text and text.endswith("remove it or pass another --retrieval-data")
