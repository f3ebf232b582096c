"""Hugging Face interop: our pruned models load in stock transformers with equal logits,
HF -> ours -> HF is the identity, tokenizer files load with AutoTokenizer, bad input fails clearly."""
from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from effllm_jax.export import export_model, import_hf, load_exported  # noqa: E402
from effllm_jax.export import hf, safetensors_io, tokenizer_io  # noqa: E402
from effllm_jax.model.compact import slice_params  # noqa: E402
from effllm_jax.model.llama import ModelConfig, abstract_params, apply  # noqa: E402

# hidden 32 is not a multiple of 6 heads: the non-uniform export must pad it for LlamaConfig
CFG = ModelConfig(vocab_size=67, d_model=32, num_layers=3, num_heads=6, num_kv_heads=2,
                  head_dim=8, ffn_dim=40, rope_theta=1000.0, norm_eps=1e-5, tie_embeddings=True)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random float32 params with norm gains around 1."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        scale = any(getattr(k, "key", None) == "scale" for k in path)
        values = 1.0 + 0.2 * rng.normal(size=leaf.shape) if scale else 0.2 * rng.normal(size=leaf.shape)
        return values.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


def uniform_masks(cfg: ModelConfig, seed: int = 0) -> dict:
    """Same widths in every layer (2 of 3 heads per KV group, 24 FFN), different units kept."""
    rng = np.random.default_rng(seed)
    heads = np.zeros((cfg.num_layers, cfg.num_heads), bool)
    ffn = np.zeros((cfg.num_layers, cfg.ffn_dim), bool)
    for l in range(cfg.num_layers):
        for k in range(cfg.num_kv_heads):
            keep = rng.choice(cfg.group_size, 2, replace=False) + k * cfg.group_size
            heads[l, keep] = True
        ffn[l, rng.choice(cfg.ffn_dim, 24, replace=False)] = True
    hidden = np.zeros(cfg.d_model, bool)
    hidden[rng.choice(cfg.d_model, 24, replace=False)] = True
    return {"hidden": hidden, "heads": heads, "ffn": ffn}


def nonuniform_masks(cfg: ModelConfig, seed: int = 1) -> dict:
    """Per-layer widths, uneven GQA groups, a dead KV head, hidden pruning (26 of 32 kept)."""
    rng = np.random.default_rng(seed)
    heads = rng.random((cfg.num_layers, cfg.num_heads)) < 0.6
    heads[:, 0] = True
    heads[1, cfg.group_size:] = False
    heads[2, :] = True
    heads[2, 4] = False
    hidden = np.ones(cfg.d_model, bool)
    hidden[rng.choice(cfg.d_model, 6, replace=False)] = False
    return {"hidden": hidden, "heads": heads, "ffn": rng.random((cfg.num_layers, cfg.ffn_dim)) < 0.6}


def hf_logits(path: str, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def setup():
    params = random_params(CFG)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 11))
    return params, tokens


def masked(params, masks, tokens) -> np.ndarray:
    jm = {k: jnp.asarray(v) for k, v in masks.items()}
    return np.asarray(apply(CFG, params, jnp.asarray(tokens), jm))


def test_uniform_pruned_model_exports_without_padding(setup, tmp_path):
    params, tokens = setup
    masks = uniform_masks(CFG)
    spec, compact = slice_params(params, masks, CFG)
    assert spec.uniform
    notes = export_model(str(tmp_path), spec, compact, "hf", strict=True)
    config = json.load(open(tmp_path / "config.json"))
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["head_dim"]) == (24, 4, 2, 24, 8)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000.0}
    assert not any("padded" in n for n in notes)
    ref = masked(params, masks, tokens)
    assert np.abs(hf_logits(str(tmp_path), tokens) - ref).max() <= 1e-4
    assert np.abs(np.asarray(load_exported(str(tmp_path)).logits(tokens)) - ref).max() <= 1e-5
    masks["hidden"][np.flatnonzero(masks["hidden"])[0]] = False  # 23 is not a multiple of 4 heads
    spec, compact = slice_params(params, masks, CFG)
    with pytest.raises(ValueError, match="hidden width 23 is not a multiple of 4 heads"):
        export_model(str(tmp_path / "odd"), spec, compact, "hf", strict=True)


@pytest.mark.parametrize("gqa", ["pad", "mha"])
def test_nonuniform_model_is_zero_padded_exactly(setup, tmp_path, gqa):
    params, tokens = setup
    masks = nonuniform_masks(CFG)
    spec, compact = slice_params(params, masks, CFG)
    assert not spec.uniform and spec.hidden_dim == 26
    with pytest.raises(ValueError, match="strict HF export refused"):
        export_model(str(tmp_path / "strict"), spec, compact, "hf", strict=True)
    notes = export_model(str(tmp_path), spec, compact, "hf", gqa=gqa)
    assert any("non-uniform widths padded exactly" in n for n in notes)
    config = json.load(open(tmp_path / "config.json"))
    assert config["hidden_size"] % config["num_attention_heads"] == 0
    if gqa == "mha":
        assert config["num_attention_heads"] == config["num_key_value_heads"]
    assert np.abs(hf_logits(str(tmp_path), tokens) - masked(params, masks, tokens)).max() <= 1e-4


def test_layer_with_every_head_pruned_exports_exactly(setup, tmp_path):
    """Global ranking can empty a layer's attention (the demo does); HF gets all-zero heads."""
    params, tokens = setup
    masks = nonuniform_masks(CFG)
    masks["heads"][1, :] = False
    masks["ffn"][1, :] = False
    spec, compact = slice_params(params, masks, CFG)
    assert spec.layers[1].num_heads == 0 and spec.layers[1].ffn_dim == 0
    export_model(str(tmp_path), spec, compact, "hf")
    assert np.abs(hf_logits(str(tmp_path), tokens) - masked(params, masks, tokens)).max() <= 1e-4


def test_hf_to_ours_to_hf_is_identity(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 321.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norm gains
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    model.save_pretrained(src)
    cfg, params, masks = import_hf(src)
    assert (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta, cfg.norm_eps,
            cfg.tie_embeddings) == (24, 4, 2, 321.0, 1e-6, False)
    assert params["layers"]["attn"]["wq"].shape == (2, 24, 4, 8)
    tokens = np.random.default_rng(0).integers(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(apply(cfg, params, jnp.asarray(tokens), {k: jnp.asarray(v) for k, v in masks.items()}))
    assert np.abs(ours - ref).max() <= 1e-4
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    jax.tree.map(np.testing.assert_array_equal, import_hf(sharded)[1], params)
    spec, compact = slice_params(params, masks, cfg)
    export_model(out, spec, compact, "hf")
    with safetensors_io.TensorSource(os.path.join(src, "model.safetensors")) as a, \
            safetensors_io.TensorSource(os.path.join(out, "model.safetensors")) as b:
        assert sorted(a.names()) == sorted(b.names())
        for name in a.names():
            np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    before, after = json.load(open(os.path.join(src, "config.json"))), json.load(open(os.path.join(out, "config.json")))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "hidden_act", "model_type"):
        assert before[key] == after[key], key


def _corpus(path) -> str:
    text = "".join(open(f).read() for f in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:12])
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("kind", ["project", "dummy_prefix"])
def test_sentencepiece_tokenizer_loads_in_transformers(tmp_path, kind):
    spm = pytest.importorskip("sentencepiece")
    corpus = _corpus(tmp_path / "corpus.txt")
    if kind == "project":  # the run's own tokenizer (no dummy prefix, identity normalisation)
        from effllm_jax.data import train_tokenizer
        source = train_tokenizer([open(corpus).read()], vocab_size=500)
    else:  # Llama-style dummy prefix; identity normalisation is what HF reproduces exactly
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=str(tmp_path / "sp"), vocab_size=500,
            character_coverage=0.99, model_type="bpe", byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, bos_id=1,
            eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
        source = tokenizer_io.SentencePieceTokenizer(str(tmp_path / "sp.model"))
    out = tmp_path / "hf"
    out.mkdir()
    assert "LlamaTokenizer" in tokenizer_io.save_hf_tokenizer(source, None, str(out))
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ("def f(x):\n    return x + 1  # naïve 42", "Hello", "a\n\nb"):
        assert theirs(text)["input_ids"] == [source.bos_id] + list(source.encode(text)), text
        ids = theirs(text)["input_ids"]
        assert theirs.decode(ids, skip_special_tokens=True) == source.decode(ids[1:])


def test_bpe_tokenizer_loads_in_transformers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    trained = tokenizers.ByteLevelBPETokenizer()
    trained.train_from_iterator([open(_corpus(tmp_path / "c.txt")).read()], vocab_size=400,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    model = json.loads(trained.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ours = tokenizer_io.BPETokenizer.from_vocab(vocab, merges, ["<|endoftext|>"], pre="smollm",
                                               bos_id=0, eos_id=0)
    ours.save_hf(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "import os  # 2024 <|endoftext|>ünïcode"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert ours.decode(ours.encode(text)) == text
    assert ours.encode("<|endoftext|>") == [0] and len([t for t in ours.encode("12") if t]) == 2
    again = tokenizer_io.BPETokenizer.load(str(tmp_path))
    assert again.encode(text) == ours.encode(text) and again.eos_id == 0


def test_bad_hf_input_gives_clear_errors(setup, tmp_path):
    params, _ = setup
    spec, compact = slice_params(params, uniform_masks(CFG), CFG)
    path = str(tmp_path)
    weights = os.path.join(path, "model.safetensors")

    def rewrite(edit):
        with safetensors_io.TensorSource(weights) as src:
            arrays = {n: src.get(n) for n in src.names()}
        edit(arrays)
        safetensors_io.write_safetensors(weights, [
            safetensors_io.TensorPlan(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()])

    export_model(path, spec, compact, "hf")
    rewrite(lambda a: a.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight is missing"):
        import_hf(path)
    export_model(path, spec, compact, "hf")
    rewrite(lambda a: a.update({"model.norm.weight": np.ones(5, np.float32)}))
    with pytest.raises(ValueError, match=r"do not match config\.json.*model\.norm\.weight"):
        import_hf(path)
    export_model(path, spec, compact, "hf")
    config = json.load(open(os.path.join(path, "config.json")))
    for change, message in (({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
                            ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}},
                             "rope_type 'llama3' is not supported"),
                            ({"attention_bias": True}, "biases are not supported"),
                            ({"intermediate_size": 25}, "has shape")):
        json.dump(dict(config, **change), open(os.path.join(path, "config.json"), "w"))
        with pytest.raises(ValueError, match=message):
            import_hf(path)
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="neither a compact export"):
        load_exported(path)
    assert not hf.is_hf_dir(path)
