"""KV-cached decoding: exact against full forwards, padding-invariant, sampling, stop strings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effllm_jax.export import export_model, load_exported
from effllm_jax.generate import generate_batch
from effllm_jax.model import decode
from effllm_jax.model.compact import slice_params
from effllm_jax.model.lm import LanguageModel, MaskedLanguageModel
from test_export import CFG, nonuniform_masks, random_params

N_TOKENS = 64  # every call decodes 64 tokens from prompts of <= 16: few shapes, few compiles


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(pruned non-uniform export reloaded, the masked source with the same masks, prompts)."""
    params, masks = random_params(CFG), nonuniform_masks(CFG)
    spec, compact = slice_params(params, masks, CFG)
    out = str(tmp_path_factory.mktemp("pruned"))
    export_model(out, spec, compact, "flax")
    masked = MaskedLanguageModel(CFG, jax.tree.map(jnp.asarray, params),
                                 {k: jnp.asarray(v) for k, v in masks.items()})
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (11, 3, 16)]
    return load_exported(out), masked, prompts


def assert_greedy_against_full_forward(lm, prompts, generated):
    """Each generated token is the argmax of one full (uncached) forward over its sequence.

    Rows are right-padded into one batch (invisible under causal attention): one compile.
    """
    seqs = np.zeros((len(prompts), 16 + N_TOKENS), np.int32)
    for b, (p, g) in enumerate(zip(prompts, generated)):
        seqs[b, :len(p) + len(g)] = list(p) + list(g)
    full = np.asarray(lm.logits(seqs))
    for b, (p, g) in enumerate(zip(prompts, generated)):
        assert list(g) == list(np.argmax(full[b, len(p) - 1:len(p) - 1 + len(g)], axis=-1))


def test_cached_greedy_equals_full_forward_on_pruned_export(models):
    lm, masked, prompts = models
    assert not lm.spec.uniform
    gens = generate_batch(lm, prompts, max_new_tokens=N_TOKENS, stop_at_eos=False)
    assert [len(g.tokens) for g in gens] == [N_TOKENS] * 3
    # batched: rows of 11, 3 and 16 tokens, left-padded in the cache
    assert_greedy_against_full_forward(lm, prompts, [g.tokens for g in gens])
    [alone] = generate_batch(lm, [prompts[1]], max_new_tokens=N_TOKENS, stop_at_eos=False)
    assert alone.tokens == gens[1].tokens  # 13 slots of left padding change nothing
    masked_gens = generate_batch(masked, prompts, max_new_tokens=N_TOKENS, stop_at_eos=False)
    assert [g.tokens for g in masked_gens] == [g.tokens for g in gens]


def test_prefill_logits_match_full_forward_under_left_padding(models):
    lm, _, prompts = models
    decoder = decode.Decoder(lm, prompts, max_new_tokens=N_TOKENS)
    logits = np.asarray(decoder.state["logits"])
    seqs = np.zeros((len(prompts), 16 + N_TOKENS), np.int32)
    for b, p in enumerate(prompts):
        seqs[b, :len(p)] = p
    full = np.asarray(lm.logits(seqs))
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(logits[b], full[b, len(p) - 1], atol=1e-5)


def test_sampling_filters_and_is_reproducible(models):
    lm, _, prompts = models
    def run(rows=prompts, **kw):
        return [g.tokens for g in generate_batch(lm, rows, max_new_tokens=N_TOKENS,
                                                 stop_at_eos=False, **kw)]

    greedy = run()
    assert run(temperature=2.0, top_k=1, seed=5) == greedy
    assert run(temperature=2.0, top_p=1e-6, seed=5) == greedy
    a, b, c = run(temperature=1.0, seed=7), run(temperature=1.0, seed=7), run(temperature=1.0,
                                                                            seed=8)
    assert a == b != c and a != greedy
    # a row's samples do not depend on what else is in the batch
    assert run([prompts[0]], temperature=1.0, seed=7) == [a[0]]


def test_choose_top_k_and_top_p_sets():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
    key = jax.random.key(0)

    def drawn(top_k, top_p):
        s = decode.Sampling(jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p))
        return set(np.asarray(decode.choose(logits, key, s)).tolist())

    assert drawn(4, 1.0) == {0, 1, 2, 3}
    assert drawn(2, 1.0) == {0, 1}
    assert drawn(4, 0.7) == {0, 1}  # 0.5 < 0.7, then 0.8 covers it
    assert drawn(4, 0.85) == {0, 1, 2}
    greedy = decode.Sampling(jnp.float32(0.0), jnp.int32(4), jnp.float32(1.0))
    assert set(np.asarray(decode.choose(logits, key, greedy)).tolist()) == {0}


class CharTokenizer:
    """One token per character 'a'.. (ids 0..60); id 60 is EOS."""

    bos_id, eos_id = None, 60

    def encode(self, text):
        return [ord(c) - 48 for c in text]

    def decode(self, ids):
        return "".join(chr(48 + i) for i in ids)


def test_stop_strings_and_eos(models):
    lm, _, prompts = models
    lm = LanguageModel(lm.spec, lm.params, CharTokenizer())
    text = "".join(chr(48 + i) for i in prompts[0])
    [full] = generate_batch(lm, [text], max_new_tokens=N_TOKENS, stop_at_eos=False)
    stop = full.text[5:7]
    first = full.text.index(stop)
    [cut] = generate_batch(lm, [text], max_new_tokens=N_TOKENS, stop=[stop, "never"], chunk=4,
                           stop_at_eos=False)
    assert cut.text == full.text[:first] and cut.tokens == full.tokens[:first + len(stop)]
    eos = full.tokens[3]
    [ended] = generate_batch(lm, [text], max_new_tokens=N_TOKENS, eos_id=eos)
    k = full.tokens.index(eos)
    assert ended.stopped_at_eos and ended.tokens == full.tokens[:k]
    [short] = generate_batch(lm, [text * 4], max_new_tokens=N_TOKENS, max_length=80)
    [tail] = generate_batch(lm, [(text * 4)[-16:]], max_new_tokens=N_TOKENS)
    assert short.tokens == tail.tokens  # left-truncated to fit max_length
    with pytest.raises(ValueError, match="top_p"):
        generate_batch(lm, [text], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="leaves no room"):
        generate_batch(lm, [text], max_new_tokens=16, max_length=16)
    with pytest.raises(TypeError, match="cannot be decoded"):
        decode.Decoder(object(), [[1]], 2)
