"""Names, rounding and the index of `lh-eval` outputs (no model needed)."""

import json
import math

from lh_dist.eval.outputs import loss_name, passkey_name, rounded, update_index, write_json


def test_names_hold_what_changes_the_numbers_and_omit_defaults():
    assert passkey_name([256, 512], [0, 15, 30, 50, 70, 85, 100], 0) == "passkey-256_512"
    assert passkey_name([256], [0, 50], 3) == "passkey-256-depths0_50-seed3"
    assert loss_name("dense", None, 8, "linear", 8, 1) == "loss-dense"
    assert loss_name("lighthouse", 4096, 16, "log", 32, 2) == "loss-lighthouse-seq4096-log16-batches32x2"
    with_override = loss_name("dense", None, 8, "linear", 8, 1, ["lighthouse.topk=512"])
    assert with_override.startswith("loss-dense-cfg") and len(with_override) == len("loss-dense-cfg") + 8
    assert with_override != loss_name("dense", None, 8, "linear", 8, 1, ["lighthouse.topk=1024"])
    assert with_override != loss_name("dense", None, 8, "linear", 8, 1, data="other/data")
    assert passkey_name([256], [50], 0, tokenizer="tok.json") != passkey_name([256], [50], 0)


def test_json_floats_are_rounded_to_six_significant_digits(tmp_path):
    value = {"a": 0.10000000149011612, "b": [2.718281828459045, 12345678.9], "c": 7, "d": math.nan}
    assert rounded(value) == {"a": 0.1, "b": [2.71828, 12345700.0], "c": 7, "d": None}
    write_json(tmp_path / "x.json", value)
    assert '"a": 0.1,' in (tmp_path / "x.json").read_text()


def test_index_replaces_the_entry_of_the_same_file(tmp_path):
    for name, loss in [("loss-dense", 1.0), ("loss-lighthouse", 2.0), ("loss-dense", 3.0)]:
        update_index(tmp_path, tmp_path / "step_00000001" / f"{name}.json", {"result": {"loss": loss}})
    outputs = json.loads((tmp_path / "index.json").read_text())["outputs"]
    assert [(e["json"], e["result"]["loss"]) for e in outputs] == [
        ("step_00000001/loss-lighthouse.json", 2.0), ("step_00000001/loss-dense.json", 3.0)]
    assert outputs[0]["png"] == "step_00000001/loss-lighthouse.png"
