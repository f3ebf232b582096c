"""Compact Flax export: exactness after save -> load, width rounding, the CLI, bad input."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from effllm_jax.arch import ArchSpec
from effllm_jax.export import api, export_model, load_exported, load_language_model
from effllm_jax.export import safetensors_io, widths
from effllm_jax.export.__main__ import main as export_cli
from effllm_jax.generate import generate, generate_batch, next_token_logits
from effllm_jax.model.compact import slice_params
from effllm_jax.model.llama import ModelConfig, abstract_params, apply
from effllm_jax.model.lm import LanguageModel

CFG = ModelConfig(vocab_size=61, d_model=32, num_layers=3, num_heads=6, num_kv_heads=2,
                  head_dim=8, ffn_dim=40, rope_theta=500.0, tie_embeddings=False)


def nonuniform_masks(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random masks: hidden pruning, per-layer FFN widths, uneven GQA groups, a dead KV head."""
    rng = np.random.default_rng(seed)
    heads = rng.random((cfg.num_layers, cfg.num_heads)) < 0.6
    heads[:, 0] = True
    heads[1, cfg.group_size:] = False  # layer 1 loses its second KV head entirely
    heads[2, :] = True
    heads[2, 1] = False  # layer 2: groups of 2 and 3
    return {"hidden": rng.random(cfg.d_model) < 0.75,
            "heads": heads,
            "ffn": rng.random((cfg.num_layers, cfg.ffn_dim)) < 0.6}


def masked_logits(cfg, params, masks, tokens) -> np.ndarray:
    jm = {k: jnp.asarray(v) for k, v in masks.items()}
    return np.asarray(apply(cfg, params, jnp.asarray(tokens), jm))


def random_params(cfg: ModelConfig, seed: int = 1) -> dict:
    """Random float32 params (numpy; far faster than eager init_params), norm gains ~1."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if any(getattr(k, "key", None) == "scale" for k in path):
            return (1.0 + 0.2 * rng.normal(size=leaf.shape)).astype(np.float32)
        return (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


@pytest.fixture(scope="module")
def pruned():
    params = random_params(CFG)
    masks = nonuniform_masks(CFG)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 13))
    spec, compact = slice_params(params, masks, CFG)
    return params, masks, tokens, spec, compact, masked_logits(CFG, params, masks, tokens)


@pytest.mark.parametrize("round_to", [None, 8, 64])
def test_flax_export_roundtrip_matches_masked_model(pruned, tmp_path, round_to):
    params, masks, tokens, spec, compact, ref = pruned
    assert not spec.uniform and len({l.num_kv_heads for l in spec.layers}) > 1
    export_model(str(tmp_path), spec, compact, "flax", round_to=round_to)
    lm = load_exported(str(tmp_path))
    assert np.abs(np.asarray(lm.logits(tokens)) - ref).max() <= 1e-5
    if round_to:
        assert lm.spec.hidden_dim % round_to == 0
        assert all(l.ffn_dim % round_to == 0 for l in lm.spec.layers)
        assert [l.q_per_kv for l in lm.spec.layers] == [l.q_per_kv for l in spec.layers]
    else:
        assert lm.spec.layers == spec.layers and lm.spec.hidden_dim == spec.hidden_dim


def test_bfloat16_export_equals_rounded_weights(pruned, tmp_path):
    params, masks, tokens, spec, compact, ref = pruned
    export_model(str(tmp_path), spec, compact, "flax", dtype="bfloat16")
    assert os.path.getsize(tmp_path / "model.safetensors") < 4 * widths.count_compact_params(spec)
    lm = load_exported(str(tmp_path))
    rounded = jax.tree.map(lambda x: np.asarray(x, ml_dtypes.bfloat16).astype(np.float32), compact)
    ref_bf16 = np.asarray(LanguageModel(spec, rounded).logits(tokens))
    assert np.abs(np.asarray(lm.logits(tokens)) - ref_bf16).max() <= 1e-5


def test_streaming_writer_matches_safetensors_reader(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b.c": np.arange(7, dtype=np.int32)}
    plans = [safetensors_io.TensorPlan(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
    path = str(tmp_path / "x.safetensors")
    safetensors_io.write_safetensors(path, plans, {"format": "np"})
    with safetensors_io.TensorSource(path) as src:
        assert sorted(src.names()) == ["a", "b.c"]
        for k, v in arrays.items():
            np.testing.assert_array_equal(src.get(k, v.shape), v)
        with pytest.raises(ValueError, match="has shape"):
            src.get("a", (5, 3))
    bad = [safetensors_io.TensorPlan("a", (2, 2), np.float32, lambda: np.zeros((3, 3), np.float32))]
    with pytest.raises(ValueError, match="built with shape"):
        safetensors_io.write_safetensors(str(tmp_path / "y.safetensors"), bad)


def _rewrite(path: str, edit) -> None:
    """Rewrites a safetensors file with `edit(dict of arrays)` applied."""
    with safetensors_io.TensorSource(path) as src:
        arrays = {n: src.get(n) for n in src.names()}
    edit(arrays)
    plans = [safetensors_io.TensorPlan(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
    safetensors_io.write_safetensors(path, plans)


def test_bad_flax_exports_give_clear_errors(pruned, tmp_path):
    _, _, _, spec, compact, _ = pruned
    out = str(tmp_path / "e")
    export_model(out, spec, compact, "flax")
    weights = os.path.join(out, "model.safetensors")
    _rewrite(weights, lambda a: a.pop("layers.1.mlp.w_up"))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.w_up .* missing"):
        load_exported(out)
    export_model(out, spec, compact, "flax")
    _rewrite(weights, lambda a: a.update({"layers.0.attn.wq": a["layers.0.attn.wq"][:, :1]}))
    with pytest.raises(ValueError, match=r"do not match spec\.json.*layers\.0\.attn\.wq"):
        load_exported(out)
    export_model(out, spec, compact, "flax")
    data = json.load(open(os.path.join(out, "spec.json")))
    data["layers"][2]["ffn_dim"] += 1  # spec no longer matches the weights
    json.dump(data, open(os.path.join(out, "spec.json"), "w"))
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.w_down.*has shape"):
        load_exported(out)
    data["layers"] = data["layers"][:2]
    json.dump(data, open(os.path.join(out, "spec.json"), "w"))
    with pytest.raises(ValueError, match="lists 2 layers"):
        load_exported(out)
    export_model(out, spec, compact, "flax")
    _rewrite(weights, lambda a: a.update({"stray": np.zeros(2, np.float32)}))
    with pytest.raises(ValueError, match="stray"):
        load_exported(out)
    wrong = dict(compact, layers={k: v for k, v in compact["layers"].items() if k != 2})
    with pytest.raises(ValueError, match="do not match the spec"):
        export_model(str(tmp_path / "f"), spec, wrong, "flax")
    with pytest.raises(FileNotFoundError, match="neither a compact export"):
        load_exported(str(tmp_path))


def test_relayout_refuses_layouts_that_drop_units(pruned):
    _, _, _, spec, compact, _ = pruned
    layouts = [widths.identity_layout(l) for l in spec.layers]
    layouts[0] = dataclasses.replace(layouts[0], ffn_dim=layouts[0].ffn_dim - 1)
    with pytest.raises(ValueError, match="drops units"):
        widths.relayout(spec, compact, layouts)


def write_run(workdir: str, params: dict, masks: dict, step: int, spec_masks: dict | None = None):
    """A training workdir as train.run leaves it: run config + an Orbax checkpoint (real
    Checkpointer), built from given params/masks instead of training (no compile)."""
    from conftest import make_tiny_config

    from effllm_jax import checkpoint, config as config_lib, train_step as ts

    config = make_tiny_config()
    config.model.update({f.name: getattr(CFG, f.name) for f in dataclasses.fields(CFG)})
    cfg = config_lib.model_config(config)
    assert cfg == CFG
    step_cfg = ts.StepConfig(cfg, None, None, config.prune.criterion)
    tx, _ = ts.make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda: ts.init_state(step_cfg, tx, jax.random.key(0)))
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    state = dataclasses.replace(state, params=params, masks=masks, step=np.int32(step))
    spec = ArchSpec.from_masks(spec_masks or masks, cfg, step, step * 100)
    checkpoint.save_run_config(workdir, config)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(step, state, spec, {"step": step, "seed": 0})
    ckpt.close()


@pytest.fixture(scope="module")
def run_dir(pruned, tmp_path_factory):
    """A pruned run at step 7 with the run's SentencePiece tokenizer (<workdir>/tokenizer.model)."""
    from effllm_jax.data import train_tokenizer

    params, masks, _, _, _, _ = pruned
    workdir = str(tmp_path_factory.mktemp("run"))
    write_run(workdir, params, masks, 7)
    text = open(os.path.join(os.path.dirname(os.__file__), "os.py")).read()
    tok = train_tokenizer([text], vocab_size=400)  # > the model vocab: warned about
    tok.save(workdir)  # what data.Dataset.save does
    return workdir, tok


def test_cli_exports_a_training_run(run_dir, pruned, tmp_path, capsys, caplog):
    workdir, tok = run_dir
    _, _, tokens, _, _, ref = pruned
    for fmt in ("flax", "hf"):
        out = str(tmp_path / fmt)
        assert export_cli([f"--workdir={workdir}", f"--out={out}", f"--format={fmt}",
                           "--round_to=8", "--step=7"]) == 0
        lm = load_language_model(out)
        assert np.abs(np.asarray(lm.logits(tokens)) - ref).max() <= 1e-5
        assert open(os.path.join(out, "tokenizer", "tokenizer.model"), "rb").read() == tok.model_proto
        sample = "import os\n\nprint(os.getcwd())  # 42"
        assert lm.tokenizer.encode(sample) == tok.encode(sample) and lm.tokenizer.eos_id == tok.eos_id
    assert "note: widths rounded up to multiples of 8" in capsys.readouterr().out
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert os.path.exists(tmp_path / "hf" / "tokenizer.model")
    lm = load_language_model(workdir)  # the workdir itself
    assert lm.spec.step == 7 and lm.spec.tokens_seen == 700
    assert np.abs(np.asarray(lm.logits(tokens)) - ref).max() <= 1e-5
    assert "the tokenizer has 400 tokens" in caplog.text


def test_run_with_inconsistent_spec_is_refused(pruned, tmp_path):
    params, masks, _, _, _, _ = pruned
    other = dict(masks, ffn=~masks["ffn"])
    write_run(str(tmp_path), params, masks, 3, spec_masks=other)
    with pytest.raises(ValueError, match="does not match the checkpoint's masks"):
        api.load_run(str(tmp_path))


def test_load_language_model_rejects_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_language_model(str(tmp_path / "nothing"))
    (tmp_path / "x.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not GGUF"):
        load_language_model(str(tmp_path / "x.bin"))


def test_generate_matches_full_forward_and_stops_at_eos(pruned):
    _, _, tokens, spec, compact, _ = pruned
    lm = LanguageModel(spec, compact)
    rows = [list(tokens[0]), list(tokens[1][:4])]
    greedy = generate_batch(lm, rows, max_new_tokens=5)
    seqs = np.zeros((2, len(rows[0]) + 4), np.int32)
    for b, (row, g) in enumerate(zip(rows, greedy)):
        assert len(g.tokens) == 5 and not g.stopped_at_eos
        seqs[b, :len(row) + 4] = row + g.tokens[:4]
    full = np.asarray(lm.logits(seqs))  # one full forward checks every step
    for b, (row, g) in enumerate(zip(rows, greedy)):
        assert g.tokens == list(np.argmax(full[b, len(row) - 1:len(row) + 4], axis=-1))
    nxt = next_token_logits(lm, rows)  # right-padded rows of different lengths
    np.testing.assert_allclose(nxt[0], full[0, len(rows[0]) - 1], atol=1e-5)
    np.testing.assert_allclose(nxt[1], full[1, len(rows[1]) - 1], atol=1e-5)
    stop = generate_batch(lm, rows, max_new_tokens=5, eos_id=greedy[0].tokens[2])
    assert stop[0].tokens == greedy[0].tokens[:2] and stop[0].stopped_at_eos
    a = generate_batch(lm, rows, max_new_tokens=4, temperature=1.0, top_k=3, seed=3)
    b = generate_batch(lm, [rows[0], rows[0]], max_new_tokens=4, temperature=1.0, top_k=3, seed=3)
    assert a[0].tokens == b[0].tokens  # a row's samples do not depend on its batch
    top3 = np.argsort(full[0, len(rows[0]) - 1])[-3:]
    assert a[0].tokens[0] in top3 and len(a[1].tokens) == 4
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(lm, "text", max_new_tokens=1)
    with pytest.raises(ValueError, match="top_k"):
        generate(lm, rows[0], max_new_tokens=1, top_k=0)
