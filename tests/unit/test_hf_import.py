"""lh-import and lh-export against transformers: tiny random Llama / Mistral / Qwen2 / Qwen3 models saved
with `save_pretrained`, imported, run by lh_dist, exported back; the refusals; the name and config mapping.

Tolerance of the float64 comparisons: both sides compute the same function in float64 (the reference
runs transformers' RMSNorm and RoPE in float64, see hf_models.py), so they differ by the rounding of
different summation orders: about 1e-14 on logits of size 3 (measured 5e-15). A mapping error (two
weights swapped, a missing bias, another RoPE) moves the logits by O(0.1), as every parameter of the
random model is perturbed by 0.1. 1e-10 lies far between.
"""

import json
import shutil

import pytest
import torch

from lh_dist.checkpoint.format import load_model_state, read_manifest, resolve_checkpoint
from lh_dist.hf import mapping
from lh_dist.hf.export import export
from lh_dist.hf.export import main as lh_export
from lh_dist.hf.importer import main as lh_import

from hf_models import KINDS, hf_model_float64, lh_dist_model, save_hf_model

TOL = 1e-10


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """kind -> (Hugging Face folder, lh-import run dir), imported on first use."""
    root, done = tmp_path_factory.mktemp("hf"), {}

    def get(kind):
        if kind not in done:
            source = save_hf_model(kind, root / kind)
            assert lh_import([str(source), "--out", str(root / f"{kind}-run")]) == 0
            done[kind] = (source, root / f"{kind}-run")
        return done[kind]
    return get


@pytest.mark.parametrize("kind", list(KINDS))
def test_imported_model_computes_what_transformers_computes(imported, kind):
    source, run = imported(kind)
    tokens = torch.randint(0, 320, (2, 96))  # beyond llama3's original 64 positions: its scaling matters
    with torch.no_grad():
        expected = hf_model_float64(source)(tokens).logits  # [B, N, V]
        got = lh_dist_model(run)(tokens, torch.arange(96))
    assert float((got - expected).abs().max()) <= TOL


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_gives_back_the_imported_model(imported, kind, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, run = imported(kind)
    out = export(run, tmp_path / "out")
    original, config = json.loads((source / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert config == original  # class, model_type, rope_scaling, special ids, context: as imported
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    tokens = torch.randint(0, 320, (1, 40))
    for dtype in (torch.float32, torch.float64):
        a = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
        b = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
        assert type(a) is type(b) and type(b).__name__ == original["architectures"][0]
        with torch.no_grad():
            assert torch.equal(a(tokens).logits, b(tokens).logits)  # the same weights, bit for bit

    text = "def main():\n    return 0\n"
    tok, tok_source = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(source)
    assert tok(text).input_ids == tok_source(text).input_ids and tok.eos_token_id == tok_source.eos_token_id
    prompt = tok("def main():").input_ids
    generated = b.generate(**tok("def main():", return_tensors="pt"))  # only the inputs the model takes
    assert generated[0, :len(prompt)].tolist() == prompt and generated.shape[1] > len(prompt)


def test_imported_run_layout(imported):
    source, run = imported("llama")
    folder = resolve_checkpoint(run)
    assert folder.name == "step_00000000"
    manifest = read_manifest(folder, deep=True)
    assert manifest["weights_only"] and manifest["step"] == 0
    # Weights only: the model states and the trainer state, no optimizer.
    assert sorted(manifest["files"]) == ["mp_rank_00_model_states.pt", "trainer_rank_00000.pt"]
    origin = mapping.read_origin(run)
    assert origin["architecture"] == "LlamaForCausalLM" and origin["config"]["max_position_embeddings"] == 256
    from lh_dist.data.tokenizer import load_tokenizer
    assert origin["tokenizer"] == load_tokenizer(str(source)).identity()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (run / "hf" / name).read_bytes() == (source / name).read_bytes()
    text = (run / "config.yaml").read_text()
    assert text.startswith("# Written by lh-import") and "placeholders" in text

    # lh-eval reads it like any checkpoint. Its float32 logits against the float64 reference: float32 rounding
    # through two layers, a few 1e-6 on logits of size 3; 1e-4 leaves room and still catches any mix-up.
    from lh_dist.eval.runner import ModelRunner

    tokens = torch.randint(0, 320, (1, 50))
    with torch.no_grad():
        expected = hf_model_float64(source)(tokens).logits[:, -1]  # [1, V]
    got = ModelRunner(run, device="cpu").last_logits(tokens)
    assert float((got.double() - expected).abs().max()) <= 1e-4


@pytest.mark.parametrize("storage", ["sharded-bf16", "bin-fp16"])
def test_weights_of_every_storage_import_exactly(tmp_path, storage):
    dtype = torch.bfloat16 if storage.endswith("bf16") else torch.float16
    source = tmp_path / "hf"
    if storage.startswith("sharded"):
        save_hf_model("llama", source, dtype=dtype, max_shard_size="40KB")
        assert (source / "model.safetensors.index.json").is_file()
    else:
        from transformers import AutoModelForCausalLM

        save_hf_model("llama", source, dtype=dtype)
        AutoModelForCausalLM.from_pretrained(source).to(dtype).save_pretrained(source, safe_serialization=False)
        (source / "model.safetensors").unlink()
    assert lh_import([str(source), "--out", str(tmp_path / "run")]) == 0
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).state_dict()
    ours = load_model_state(resolve_checkpoint(tmp_path / "run"))
    for name, value in ours.items():
        assert value.dtype == torch.float32 and torch.equal(value, theirs[mapping.hf_name(name)].float()), name


def _refused(tmp_path, capsys, config: dict) -> str:
    source = tmp_path / "hf"
    source.mkdir(exist_ok=True)
    (source / "config.json").write_text(json.dumps(config))
    assert lh_import([str(source), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    assert err.startswith("lh-import: error: ") and err.count("\n") == 1, err
    return err


def _config(kind: str, **changes) -> dict:
    from hf_models import hf_config

    config = hf_config(kind, vocab_size=320, eos_id=0).to_dict()
    config["architectures"] = [{"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                                "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}[KINDS[kind][0]]]
    return config | changes


@pytest.mark.parametrize("kind, changes, key", [
    ("mistral", {"sliding_window": 4096}, "sliding_window=4096"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true"),
    ("llama", {"attention_bias": True}, "attention_bias=true"),
    ("qwen3", {"attention_bias": True}, "attention_bias=true"),
    ("llama", {"mlp_bias": True}, "mlp_bias=true"),
    ("llama", {"hidden_act": "gelu"}, 'hidden_act="gelu"'),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 'rope_scaling.rope_type="dynamic"'),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": "no"}}, "rope_scaling.truncate"),
    ("llama", {"num_local_experts": 8}, "num_local_experts=8"),
    ("llama", {"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ("llama", {"logit_scale": 0.5}, "logit_scale=0.5"),
    ("llama", {"architectures": ["GPT2LMHeadModel"]}, "architectures"),
])
def test_refusals_are_one_line_naming_the_key(tmp_path, capsys, kind, changes, key):
    assert f"config.json: {key}" in _refused(tmp_path, capsys, _config(kind, **changes))


def test_a_mistral_without_a_sliding_window_key_is_refused(tmp_path, capsys):
    config = _config("mistral")
    del config["sliding_window"]  # transformers' default for Mistral is 4096
    assert "config.json: sliding_window=4096" in _refused(tmp_path, capsys, config)


def test_other_import_errors_are_one_line(tmp_path, capsys, imported):
    source, _ = imported("llama")
    assert lh_import([str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    partial = tmp_path / "partial"
    shutil.copytree(source, partial)
    (partial / "model.safetensors").unlink()
    assert lh_import([str(partial), "--out", str(tmp_path / "run")]) == 2
    assert "holds no weights" in capsys.readouterr().err
    config = json.loads((source / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    shutil.copy(source / "model.safetensors", partial)
    assert lh_import([str(partial), "--out", str(tmp_path / "run")]) == 2
    assert "tensor model.layers.1.input_layernorm.weight has no place" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_names_map_both_ways():
    shapes = mapping.parameter_shapes({**_model(), "attention_bias": True, "qk_norm": True})
    assert "layers.1.attention.wq.bias" in shapes and "layers.0.attention.k_norm.weight" in shapes
    for name in shapes:
        assert mapping.our_name(mapping.hf_name(name)) == name
    assert mapping.hf_name("layers.3.attention.q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    assert mapping.our_name("model.layers.0.self_attn.o_proj.bias") is None  # no o_proj bias in our model
    assert mapping.our_name("model.layers.0.mlp.experts.0.gate_proj.weight") is None


def _model() -> dict:
    return {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 96, "vocab_size": 320,
            "rope_theta": 1e4, "norm_eps": 1e-6, "tie_embeddings": False}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_defaults_are_transformers_defaults(kind):
    # Keys absent from a config.json take transformers' defaults; the mapping's table must be those.
    import transformers

    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[kind]
    default = getattr(transformers, cls)()
    for key, value in {**mapping._COMMON_DEFAULTS, **mapping._DEFAULTS[kind]}.items():
        # None stands for what transformers derives from other keys (kv heads = heads, head_dim = width / heads).
        if hasattr(default, key) and value is not None and key not in ("layer_types", "sliding_window"):
            assert getattr(default, key) == value, key
    if kind == "mistral":
        assert default.sliding_window == mapping._DEFAULTS["mistral"]["sliding_window"]
    if kind == "llama":
        assert default.num_key_value_heads == default.num_attention_heads


def test_yarn_parameters_are_written_out():
    config = _config("llama", max_position_embeddings=4096,
                     rope_scaling={"type": "yarn", "factor": 4, "mscale": 0.707, "mscale_all_dim": 0.707})
    scaling = mapping.model_section(config)["rope_scaling"]
    # transformers' defaults, explicit: the context before scaling, beta 32 / 1, mscale / mscale_all_dim = 1.
    assert scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                       "beta_slow": 1.0, "attention_factor": 1.0, "truncate": True}


def test_cli_help(capsys):
    for main, words in ((lh_import, ["--out OUT", "lh-import", "placeholders", "LlamaForCausalLM"]),
                        (lh_export, ["imported", "--tokenizer"])):
        with pytest.raises(SystemExit):
            main(["-h"])
        text = capsys.readouterr().out
        assert all(w in text for w in words), text


class _WeightsOnly:
    """What Checkpointer.save asks of an engine: the model-states file alone."""

    def __init__(self, state: dict):
        self.state = state

    def save(self, folder):
        torch.save({"module": self.state}, folder / "mp_rank_00_model_states.pt")


def test_yarn_export_of_a_longer_run_computes_what_the_run_computes(tmp_path):
    # A yarn Llama without original_max_position_embeddings: transformers takes max_position_embeddings (256)
    # as the context before scaling. A run at data.seq_len=1024 from its weights exports max_position_embeddings
    # 1024; without the pre-scaling context written into rope_scaling, transformers' yarn would read 1024.
    from lh_dist.checkpoint.checkpointer import Checkpointer
    from lh_dist.config import load_config, save_config

    source = save_hf_model("llama", tmp_path / "hf", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert lh_import([str(source), "--out", str(tmp_path / "imported")]) == 0
    run = tmp_path / "long"  # what --init-from makes of it: the origin, the weights, a run at a longer seq_len
    cfg = load_config(tmp_path / "imported" / "config.yaml", ["data.seq_len=1024", f"logging.run_dir={run}"])
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    shutil.copytree(tmp_path / "imported" / "hf", run / "hf")
    state = load_model_state(resolve_checkpoint(tmp_path / "imported"))
    data = {"split": "train", "seed": cfg.seed, "seq_len": cfg.data.seq_len, "num_documents": 0, "samples_seen": 0}
    Checkpointer(cfg, rank=0).save(_WeightsOnly(state), 0, {"step": 0, "phase": "dense", "data": data})

    out = export(run, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024
    assert config["rope_scaling"]["original_max_position_embeddings"] == 256
    tokens = torch.randint(0, 320, (1, 300))  # beyond the 256 positions before scaling
    with torch.no_grad():
        expected = lh_dist_model(run)(tokens, torch.arange(300))  # [B, N, V]
        got = hf_model_float64(out)(tokens).logits
    assert float((got - expected).abs().max()) <= TOL  # TOL: see the module docstring
