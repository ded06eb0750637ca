import hashlib

import numpy as np
import pytest

from core.config import DataConfig
from core.data import Corpus, default_sources, eval_batches, get_batch, is_validation, prefix_lengths, resolve_sources
from core.errors import UserError
from core.tokenizer import ByteTokenizer, get_tokenizer


def test_tokenizer_round_trips_text_and_bytes():
    tok = ByteTokenizer()
    for text in ["", "hello", "def f(x):\n    return x  # ünïcödé ✓ 𝄞", "\x00\x7f"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.max(initial=0) < 256
        assert tok.decode(ids) == text
    raw = bytes(range(256)) + b"\xff\xfe\x80"
    assert tok.decode_bytes(tok.encode(raw)) == raw
    # specials are not bytes and are dropped on decode
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"
    assert tok.vocab_size == 259 and {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
    with pytest.raises(UserError, match="unknown tokenizer 'bpe-nope'; valid: byte"):
        get_tokenizer("bpe-nope")


def test_n_bytes_is_the_byte_table_on_host_and_in_jit():
    import jax
    import jax.numpy as jnp

    tok = get_tokenizer("byte")
    assert tok.bytes_per_id.shape == (tok.vocab_size,) and tok.bytes_per_id.dtype == np.int32
    ids = np.array([[0, 104, 255, tok.bos_id], [tok.eos_id, tok.pad_id, 7, 7]])
    want = np.array([[1, 1, 1, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(tok.n_bytes(ids), want)
    np.testing.assert_array_equal(jax.jit(tok.n_bytes)(jnp.asarray(ids)), want)
    text = "ünïcödé ✓"
    assert int(tok.n_bytes(tok.encode(text)).sum()) == len(text.encode("utf-8"))


def test_split_is_deterministic_and_hash_based():
    rels = [f"pkg/mod_{i}.py" for i in range(2000)]
    a = [is_validation(r, 0.05) for r in rels]
    b = [is_validation(r, 0.05) for r in reversed(rels)][::-1]
    assert a == b
    assert 0.02 < np.mean(a) < 0.08
    # the split depends on the path only, not on order or on other files
    h = int.from_bytes(hashlib.sha256(b"pkg/mod_7.py").digest()[:8], "little")
    assert is_validation("pkg/mod_7.py", 0.05) == ((h % 1_000_000) < 50_000)


def test_default_corpus_is_stdlib_without_site_packages():
    files = default_sources()
    rels = [r for r, _ in files]
    assert len(files) > 500 and "os.py" in rels
    assert not any(r.startswith(("site-packages/", "dist-packages/")) for r in rels)
    assert rels == sorted(rels)


def _small_corpus(tmp_path, n_files=30):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n_files):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    return DataConfig(sources=(str(src / "*.py"),), seq_len=32, batch_size=4, val_fraction=0.2,
                      cache_dir=str(tmp_path / "cache"))


def test_corpus_cache_is_built_once_and_keyed(tmp_path):
    cfg = _small_corpus(tmp_path)
    tok = get_tokenizer("byte")
    c1 = Corpus.open(cfg, tok)
    assert c1.train.dtype == np.uint16 and len(c1.train) > 0 and len(c1.val) > 0
    assert (np.asarray(c1.train) == tok.eos_id).sum() == c1.meta["train_files"]
    cache_dirs = list((tmp_path / "cache").iterdir())
    c2 = Corpus.open(cfg, tok)
    assert list((tmp_path / "cache").iterdir()) == cache_dirs  # reused, not rebuilt
    assert c2.key == c1.key and np.array_equal(c1.train, c2.train)
    # changing a source changes the key
    (tmp_path / "src" / "m0.py").write_text("changed = True\n")
    assert Corpus.open(cfg, tok).key != c1.key


def test_empty_glob_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="matched no files"):
        resolve_sources((str(tmp_path / "nothing" / "*.py"),))


def test_batches_depend_only_on_seed_step_process():
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(batch_size=8, seq_len=64)
    a = get_batch(tokens, seed=1, step=5, **kw)
    assert np.array_equal(a, get_batch(tokens, seed=1, step=5, **kw))
    assert not np.array_equal(a, get_batch(tokens, seed=1, step=6, **kw))
    assert not np.array_equal(a, get_batch(tokens, seed=2, step=5, **kw))
    # a process reads its own rows of the same global batch
    halves = [get_batch(tokens, seed=1, step=5, process_index=i, process_count=2, **kw) for i in range(2)]
    assert np.array_equal(np.concatenate(halves), a) and not np.array_equal(halves[0], halves[1])
    assert a.shape == (8, 65) and np.all(np.diff(a, axis=1) == 1)  # contiguous windows
    p = prefix_lengths(seed=1, step=5, batch_size=8, seq_len=64)
    assert np.array_equal(p, prefix_lengths(seed=1, step=5, batch_size=8, seq_len=64))
    assert p.min() >= 1 and p.max() <= 63
    ev = eval_batches(tokens, batch_size=4, seq_len=64, n_batches=3)
    assert len(ev) == 3 and all(np.array_equal(x, y) for x, y in zip(ev, eval_batches(tokens, batch_size=4, seq_len=64, n_batches=3)))
