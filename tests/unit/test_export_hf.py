"""`lh-export` output used by `transformers` as is: tokenizer, special ids, pipeline, eos, model card.

The checkpoint is written by hand with weights chosen so that greedy decoding is known: every
attention and feed-forward output is zero, so the residual stream is the current token's
embedding and the model is a bigram table. It continues any text with "abc" and then the
end-of-document token; a correct export therefore stops right after "abc".
"""

import json
import os
import stat

import pytest
import torch

from lh_dist.checkpoint.format import FORMAT_VERSION, MANIFEST, file_crc32
from lh_dist.config import load_config, save_config
from lh_dist.hf.export import EXPORT_FILES, export, main

from conftest import TINY_MODEL

TINY = [*TINY_MODEL, "data.seq_len=256", "schedule.steps=10", "schedule.warmup_steps=1", "schedule.lighthouse_steps=4",
        "lighthouse.levels=2",
        "lighthouse.pooling=2", "lighthouse.topk=128", "lighthouse.dense_layers=[0]", "parallel.cp_degree=1"]
EOD = 256


def bigram_state(cfg) -> dict:
    """Weights of a model whose next token depends only on the current one: x -> a -> b -> c -> eod."""
    from lh_dist.model import Transformer
    from lh_dist.ops.attention import attention

    model = Transformer(cfg.model, [lambda q, k, v: attention(q, k, v, causal=True, backend="math")] * 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in state:
        if name.endswith(("attention.wo.weight", "ffn.w2.weight")):
            state[name].zero_()
    a, b, c = ord("a"), ord("b"), ord("c")
    eye = torch.eye(cfg.model.dim)
    state["embed.weight"][:] = eye[0]  # every other token: direction 0
    state["embed.weight"][a], state["embed.weight"][b], state["embed.weight"][c] = eye[1], eye[2], eye[3]
    state["norm.weight"].fill_(1.0)
    out = torch.zeros_like(state["output.weight"])  # [V, D]: row t scores token t as the next one
    out[a], out[b], out[c], out[EOD] = 10 * eye[0], 10 * eye[1], 10 * eye[2], 10 * eye[3]
    state["output.weight"] = out
    return state


@pytest.fixture(scope="module")
def exported(tmp_path_factory, stdlib_dataset):
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(None, [f"data.path={stdlib_dataset}", f"logging.run_dir={root / 'run'}", *TINY])
    folder = root / "run" / "checkpoints" / "step_00000007"
    folder.mkdir(parents=True)
    save_config(cfg, root / "run" / "config.yaml")
    torch.save({"module": bigram_state(cfg)}, folder / "mp_rank_00_model_states.pt")
    # What the trainer records at a checkpoint (lh_dist.train.loop.Trainer.trainer_state).
    torch.save({"step": 7, "phase": "dense", "tokens_seen": 7 * 256, "train_loss": (6, 7, 2.345678),
                "val_loss": (5, 2.5)}, folder / "trainer_rank_00000.pt")
    # The manifest the trainer writes last, which makes the folder a complete checkpoint.
    files = {f.name: {"bytes": f.stat().st_size, "crc32": file_crc32(f)} for f in folder.iterdir()}
    (folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "id": "export-test", "step": 7,
                                                 "phase": "dense", "files": files, "config": cfg.to_dict()}))
    old_umask = os.umask(0o077)  # a private umask must not make the export private
    try:
        out = export(root / "run", root / "hf")  # the run directory: its newest checkpoint
    finally:
        os.umask(old_umask)
    return out


def test_files_are_readable_by_all(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORT_FILES)
    for path in exported.iterdir():
        assert path.stat().st_mode & stat.S_IROTH, path


def test_special_ids_in_both_configs(exported):
    for name in ("config.json", "generation_config.json"):
        config = json.loads((exported / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (EOD, EOD, EOD), name


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x  # tabs, two spaces\r\n",
    "punctuation , . ; ? ! with spaces before it ,and after",
    "Grüße, 東京, emoji 🎉, combining e\u0301, nul \x00 and del \x7f",
    "".join(map(chr, range(1, 128))),  # every ASCII character
])
def test_tokenizer_is_the_byte_tokenizer_and_round_trips(exported, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer(text).input_ids
    assert ids == list(text.encode("utf-8"))  # no added tokens, byte b is id b
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == EOD and tokenizer.convert_ids_to_tokens(EOD) == "<|endoftext|>"
    assert tokenizer.decode(ids + [EOD], skip_special_tokens=True) == text


def test_pipeline_generates_and_stops_at_eos(exported):
    from transformers import AutoModelForCausalLM, pipeline

    generate = pipeline("text-generation", model=str(exported))
    out = generate("xyz", max_new_tokens=20, do_sample=False)
    assert out[0]["generated_text"] == "xyzabc"

    model = AutoModelForCausalLM.from_pretrained(exported)
    ids = model.generate(torch.tensor([list(b"xyz")]), max_new_tokens=20, do_sample=False)
    assert ids[0].tolist() == [*b"xyzabc", EOD]  # stopped at eos, 16 tokens before max_new_tokens


def test_model_card(exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "# run, step 7" in card
    assert "| Lighthouse phase | steps 1-4: levels 2, pooling 2, top-k 128; layers [0] always dense |" in card
    assert "| dense phase | steps 5-7 |" in card
    assert "| tokens | 1,792 (256 per step, sequences of 256) |" in card
    assert "| final train loss | 2.3457 nats/token (mean of steps 6-7) |" in card
    assert "| final validation loss | 2.5000 nats/token (step 5) |" in card
    assert "[lh_dist_config.yaml](lh_dist_config.yaml)" in card
    assert load_config(exported / "lh_dist_config.yaml").lighthouse.topk == 128


def test_cli_errors_and_help(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "hf")]) == 2
    assert "lh-export: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-h"])
    help_text = capsys.readouterr().out
    assert "--out OUT" in help_text and "default: float32" in help_text and "{float32,bfloat16,float16}" in help_text


def test_generate_takes_what_the_exported_tokenizer_returns(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(exported), AutoModelForCausalLM.from_pretrained(exported)
    ids = model.generate(**tok("def main():", return_tensors="pt"), max_new_tokens=20, do_sample=False)
    assert ids[0].tolist() == [*b"def main():abc", EOD]


def _card(tmp_path, step: int, state: dict, *overrides: str, **kwargs) -> str:
    from lh_dist.hf.export import model_card

    cfg = load_config("configs/tiny-cpu.yaml", [*TINY, *overrides])
    folder = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    return model_card(cfg, folder, state, 2_345_678, "byte", config, **kwargs)


def test_model_card_of_a_mixture_a_lighthouse_checkpoint_and_an_untrained_import(tmp_path):
    mixture = _card(tmp_path, 7, {"phase": "dense"}, "data.path=",
                    "data.sources=[{path: data/code, weight: 3}, {path: data/web, weight: 1}]")
    assert "| data | `data/code` (weight 3), `data/web` (weight 1), tokenizer `byte` |" in mixture
    assert "A 2.35M-parameter LlamaForCausalLM" in mixture
    assert "for 4 steps, then dense attention." in mixture

    sparse = _card(tmp_path, 3, {"phase": "lighthouse"})
    assert "Lighthouse attention (arXiv 2605.06554) for 3 steps. `transformers`" in sparse
    assert "then dense" not in sparse and "written during the Lighthouse phase" in sparse

    origin = {"source": "/models/qwen3", "architecture": "Qwen3ForCausalLM"}
    imported = _card(tmp_path, 0, {}, origin=origin, eod_token="<|im_end|>")
    assert ", not trained with lh_dist: the weights of its import." in imported
    assert "| steps | 0: not trained with lh_dist |" in imported
    assert "| data |" not in imported and "| optimizer |" not in imported and "trained with lh_dist," not in imported
    assert "Documents are separated by `<|im_end|>`, the eos token" in imported
