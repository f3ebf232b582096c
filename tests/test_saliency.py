"""Saliency is what it says: each group's score sums exactly the weights that group owns, the
criteria are the stated formulas, and they rank groups by the real loss change better than
magnitude does."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effllm_jax.model import llama
from effllm_jax.pruning import groups, saliency
from effllm_jax.train_step import cross_entropy

CFG = llama.ModelConfig(vocab_size=24, d_model=12, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=4, ffn_dim=10, tie_embeddings=False)


def distinct_tree(cfg, offset):
    """A params-shaped tree whose every entry is a different number."""
    leaves, treedef = jax.tree.flatten(llama.abstract_params(cfg))
    out, start = [], offset
    for leaf in leaves:
        n = int(np.prod(leaf.shape))
        values = np.sqrt(np.arange(start, start + n, dtype=np.float64) + 2.0) * 1e-2
        out.append(values.reshape(leaf.shape).astype(np.float32))
        start += n
    return jax.tree.unflatten(treedef, out)


def owners(path: str, index: tuple, cfg) -> list:
    """The groups owning weight `path`[index], written out per weight (independently of
    groups.py): ('heads', l, h), ('kv_heads', l, k), ('ffn', l, f), ('hidden', d)."""
    if path == "embed":
        return [("hidden", index[1])]
    if path == "lm_head":
        return [("hidden", index[0])]
    if path == "final_norm/scale":
        return [("hidden", index[0])]
    if path in ("layers/attn_norm/scale", "layers/mlp_norm/scale"):
        return [("hidden", index[1])]
    l = index[0]
    if path == "layers/attn/wq":  # [L, D, H, hd]
        return [("hidden", index[1]), ("heads", l, index[2])]
    if path in ("layers/attn/wk", "layers/attn/wv"):  # [L, D, K, hd]
        return [("hidden", index[1]), ("kv_heads", l, index[2])]
    if path == "layers/attn/wo":  # [L, H, hd, D]
        return [("heads", l, index[1]), ("hidden", index[3])]
    if path in ("layers/mlp/w_gate", "layers/mlp/w_up"):  # [L, D, F]
        return [("hidden", index[1]), ("ffn", l, index[2])]
    if path == "layers/mlp/w_down":  # [L, F, D]
        return [("ffn", l, index[1]), ("hidden", index[2])]
    raise KeyError(path)


def each_weight(tree):
    """(path, index, value) of every entry of a params-shaped tree."""
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = "/".join(k.key for k in keys)
        leaf = np.asarray(leaf)
        for index in np.ndindex(leaf.shape):
            yield path, index, leaf[index]


def test_group_sums_add_exactly_the_weights_each_group_owns():
    per_weight = distinct_tree(CFG, 0)
    expected = {"heads": np.zeros((2, 4)), "kv_heads": np.zeros((2, 2)), "ffn": np.zeros((2, 10)),
                "hidden": np.zeros(12)}
    for path, index, value in each_weight(per_weight):
        for kind, *unit in owners(path, index, CFG):
            expected[kind][tuple(unit)] += value
    got = saliency.group_sums(per_weight)
    for kind in expected:
        np.testing.assert_allclose(np.asarray(got[kind]), expected[kind], rtol=1e-5)


def test_param_masks_and_group_sizes_follow_the_same_ownership():
    rng = np.random.default_rng(0)
    masks = {"hidden": rng.random(12) < 0.7, "heads": rng.random((2, 4)) < 0.6,
             "ffn": rng.random((2, 10)) < 0.5}
    masks["heads"][1, :2] = False  # a dead KV group
    g = CFG.group_size  # KV head k is read by query heads k*g .. k*g+g-1
    kv = np.array([[masks["heads"][l, k * g:(k + 1) * g].any() for k in range(2)] for l in range(2)])
    alive_of = {"hidden": lambda d: masks["hidden"][d], "heads": lambda l, h: masks["heads"][l, h],
                "kv_heads": lambda l, k: kv[l, k], "ffn": lambda l, f: masks["ffn"][l, f]}
    pmask = groups.param_masks(masks, CFG)
    sizes = groups.group_sizes(masks, CFG)
    owned = {"heads": np.zeros((2, 4)), "ffn": np.zeros((2, 10)), "hidden": np.zeros(12)}
    live_total = 0
    flat_masks = {"/".join(k.key for k in keys): np.asarray(m)
                  for keys, m in jax.tree_util.tree_flatten_with_path(pmask)[0]}
    zeros = jax.tree.map(lambda x: np.zeros(x.shape), llama.abstract_params(CFG))
    for path, index, _ in each_weight(zeros):
        own = owners(path, index, CFG)
        alive = all(alive_of[kind](*unit) for kind, *unit in own)
        shape = np.shape(_leaf(zeros, path))
        assert bool(np.broadcast_to(flat_masks[path], shape)[index]) == alive, (path, index)
        live_total += alive
        if alive:
            for kind, *unit in own:
                if kind in owned:
                    owned[kind][tuple(unit)] += 1
    assert live_total == int(groups.count_params(masks, CFG))
    live_heads = masks["heads"]
    np.testing.assert_array_equal(owned["heads"][live_heads], float(sizes["head"]))
    np.testing.assert_array_equal(owned["ffn"][masks["ffn"]], float(sizes["ffn"]))
    np.testing.assert_array_equal(owned["hidden"][masks["hidden"]], float(sizes["hidden"]))


def _leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def test_criteria_are_the_stated_formulas_and_accumulators():
    params = distinct_tree(CFG, 0)
    steps = [jax.tree.map(lambda x, s=s: x * (s - 1.5), distinct_tree(CFG, 7)) for s in range(3)]
    acc = {c: saliency.zeros(CFG, c) for c in saliency.CRITERIA}
    assert "grad_sum" not in acc["taylor"] and "grad_sum" not in acc["fisher"]
    for g in steps:
        acc = {c: saliency.accumulate(a, params, g, c) for c, a in acc.items()}
    fisher = distinct_tree(CFG, 3)
    w = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]).astype(np.float64)
    gs = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in steps]
    f = np.concatenate([np.ravel(x) for x in jax.tree.leaves(fisher)])
    mean_g = sum(gs) / 3
    per_weight = {"taylor": sum(np.abs(w * g) for g in gs),  # noise adds up here ...
                  "taylor_acc": np.abs(w * mean_g),  # ... and cancels here
                  "fisher": 0.5 * w * w * f,
                  "taylor_fisher": np.abs(w * mean_g - 0.5 * w * w * f)}
    for criterion, expected in per_weight.items():
        got = saliency.event_saliency(acc[criterion], params, criterion, fisher)
        leaves, treedef = jax.tree.flatten(params)
        split = np.cumsum([x.size for x in leaves])[:-1]
        tree = jax.tree.unflatten(treedef, [p.reshape(x.shape) for p, x in
                                            zip(np.split(expected, split), leaves)])
        want = saliency.group_sums(tree)
        for kind in want:
            np.testing.assert_allclose(np.asarray(got[kind]), np.asarray(want[kind]), rtol=1e-4,
                                       err_msg=criterion)


def test_one_shot_group_saliency_is_a_window_of_one_gradient():
    params, grads, fisher = distinct_tree(CFG, 0), distinct_tree(CFG, 5), distinct_tree(CFG, 9)
    for criterion in saliency.CRITERIA:
        window = saliency.accumulate(saliency.zeros(CFG, criterion), params, grads, criterion)
        want = saliency.event_saliency(window, params, criterion, fisher)
        got = saliency.group_saliency(params, grads, criterion, fisher)
        for kind in saliency.GROUP_KEYS:
            np.testing.assert_allclose(np.asarray(got[kind]), np.asarray(want[kind]), rtol=1e-6)


def test_fisher_is_bias_corrected_adam_nu_times_sequences():
    tx = optax.adam(1e-2, b2=0.9)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    gs = [np.array([1.0, -2.0, 0.5]), np.array([3.0, 0.0, -1.0])]
    for g in gs:
        _, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    ema = 0.1 * 0.9 * gs[0] ** 2 + 0.1 * gs[1] ** 2
    fisher = saliency.adam_fisher(state[0].nu, state[0].count, 0.9, 16.0)
    np.testing.assert_allclose(np.asarray(fisher["w"]), 16 * ema / (1 - 0.9 ** 2), rtol=1e-5)


# ----------------------------------------------------------------- against the real loss change
def spearman(a, b) -> float:
    """Rank correlation (no ties in these continuous values)."""
    ranks = lambda x: np.argsort(np.argsort(np.ravel(x))).astype(np.float64)
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])



SMALL = llama.ModelConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8, ffn_dim=32)
TRANSITIONS = np.random.default_rng(0).dirichlet(np.full(32, 0.1), size=32)


def _batch(seed, rows=16, length=24):
    """A source that needs attention: half the tokens copy the one two back, half follow a
    noisy bigram table."""
    rng = np.random.default_rng(seed)
    out = np.zeros((rows, length + 1), np.int32)
    out[:, :2] = rng.integers(0, 32, (rows, 2))
    for t in range(1, length):
        cdf = np.cumsum(TRANSITIONS[out[:, t]], 1)
        bigram = (cdf < rng.random(rows)[:, None]).sum(1).clip(max=31)
        out[:, t + 1] = np.where(rng.random(rows) < 0.5, out[:, t - 1], bigram)
    return out


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for 300 Adam steps, then a 30-step pruning window."""
    tx = optax.adam(3e-3, b2=0.95)
    loss = lambda p, b, m=None: cross_entropy(llama.apply(SMALL, p, b[:, :-1], m), b[:, 1:])

    @jax.jit
    def step(p, o, b):
        g = jax.grad(loss)(p, b)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, g

    params = llama.init_params(SMALL, jax.random.key(0))
    opt = tx.init(params)
    for i in range(300):
        params, opt, _ = step(params, opt, jnp.asarray(_batch(i)))
    acc = {c: saliency.zeros(SMALL, c) for c in ("taylor", "taylor_acc")}
    for i in range(300, 330):
        before = params
        params, opt, g = step(params, opt, jnp.asarray(_batch(i)))
        acc = {c: saliency.accumulate(a, before, g, c) for c, a in acc.items()}
    fisher = saliency.adam_fisher(opt[0].nu, opt[0].count, 0.95, 16.0)
    scores = {c: saliency.event_saliency(acc["taylor" if c == "taylor" else "taylor_acc"],
                                         params, c, fisher) for c in saliency.CRITERIA}
    scores["magnitude"] = saliency.group_sums(jax.tree.map(lambda w: w * w, params))
    heldout = jnp.asarray(np.concatenate([_batch(10_000 + i) for i in range(8)]))
    masked_loss = jax.jit(lambda m: loss(params, heldout, m))
    full = jax.tree.map(np.asarray, llama.full_masks(SMALL))
    base = float(masked_loss(full))
    change = {u: np.zeros(np.shape(full[u])) for u in full}
    for unit in change:  # brute force: remove each group alone and measure the loss
        for index in np.ndindex(change[unit].shape):
            masks = {k: v.copy() for k, v in full.items()}
            masks[unit][index] = False
            change[unit][index] = float(masked_loss(masks)) - base
    return scores, change


def test_each_criterion_ranks_groups_by_loss_change_better_than_magnitude(trained):
    scores, change = trained
    g = SMALL.group_size

    def correlation(s):
        heads = np.asarray(s["heads"]) + np.repeat(np.asarray(s["kv_heads"]), g, 1) / g
        return {"heads": spearman(heads, change["heads"]),
                "ffn": spearman(s["ffn"], change["ffn"]),
                "hidden": spearman(s["hidden"], change["hidden"])}

    rho = {name: correlation(s) for name, s in scores.items()}
    mean = {name: np.mean(list(r.values())) for name, r in rho.items()}
    for criterion in saliency.CRITERIA:
        assert mean[criterion] > mean["magnitude"] + 0.05, rho
        assert rho[criterion]["ffn"] > rho["magnitude"]["ffn"], rho
