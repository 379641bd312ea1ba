"""`lh-eval` arguments refused before any checkpoint is read. tests/integration/test_eval_cli.py runs it on a
checkpoint that `lh-train` wrote."""

import pytest

from lh_dist.eval.cli import main


def test_malformed_lists_are_usage_errors(capsys):
    with pytest.raises(SystemExit):
        main(["passkey", "RUN", "--lengths", "4k"])
    assert "--lengths must be comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_an_error_is_one_line_from_the_first_rank_only(tmp_path, capsys, monkeypatch, rank, lines):
    # Under torchrun every rank fails the same way.
    monkeypatch.setenv("RANK", rank)
    assert main(["loss", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("lh-eval loss: error: ") == lines
