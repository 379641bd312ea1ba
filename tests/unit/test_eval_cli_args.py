"""`lh-eval` arguments refused before any checkpoint is read. tests/integration/test_eval_cli.py runs it on a
checkpoint that `lh-train` wrote."""

import pytest

from lh_dist.eval.cli import main


def test_malformed_lists_are_usage_errors(capsys):
    with pytest.raises(SystemExit):
        main(["passkey", "RUN", "--lengths", "4k"])
    assert "--lengths must be comma-separated integers" in capsys.readouterr().err
