import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from decode.sam import DynamicMatcher, SuffixAutomaton


def brute_match(text, query):
    """(longest suffix of query occurring in text, exclusive end of its earliest occurrence)."""
    text, query = np.asarray(text, np.int64), np.asarray(query, np.int64)
    ends = np.arange(1, len(text) + 1)  # candidate exclusive ends still matching the last j tokens
    best = (0, 0)
    for j in range(len(query)):
        ends = ends[ends - 1 - j >= 0]
        ends = ends[text[ends - 1 - j] == query[-1 - j]]
        if not ends.size:
            break
        best = (j + 1, int(ends[0]))
    return best


def random_text(rng, n, vocab, repetitive=False):
    if not repetitive:
        return rng.integers(0, vocab, n)
    motif = rng.integers(0, vocab, rng.integers(3, 12))
    text = np.resize(motif, n)
    flips = rng.random(n) < 0.05
    text[flips] = rng.integers(0, vocab, flips.sum())
    return text


def queries_for(rng, text, vocab, count):
    """A mix of random queries and (mutated) substrings of text, so long matches occur."""
    out = []
    for _ in range(count):
        m = int(rng.integers(0, 25))
        if len(text) > m and rng.random() < 0.7:
            s = int(rng.integers(0, len(text) - m + 1))
            q = np.array(text[s:s + m])
            if m and rng.random() < 0.5:
                q[rng.integers(0, m)] = rng.integers(0, vocab + 1)
        else:
            q = rng.integers(0, vocab + 1, m)
        out.append(q)
    return out


@pytest.mark.parametrize("vocab", [2, 3, 7, 259])
@pytest.mark.parametrize("repetitive", [False, True])
def test_longest_suffix_match_equals_brute_force(vocab, repetitive):
    rng = np.random.default_rng(vocab * 2 + repetitive)
    for n in [0, 1, 2, 5, 17, 60, 300, 3000]:
        text = random_text(rng, n, vocab, repetitive)
        sam = SuffixAutomaton.build(text)
        assert sam.frozen and sam.n_tokens == n
        assert sam.arrays()["states"][-1, 3] == sam.n_edges == len(sam.arrays()["edge_tok"])
        assert sam.n_states <= max(2 * n - 1, n + 1) and sam.n_edges <= max(3 * n - 4, 2 * n - 1, 0)
        for q in queries_for(rng, text, vocab, 40):
            assert sam.longest_suffix_match(q) == brute_match(text, q), (text[:50], q)


def test_match_reports_earliest_occurrence_and_continuation():
    text = np.array([5, 1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3, 7])
    sam = SuffixAutomaton.build(text)
    assert sam.longest_suffix_match([1, 2, 3]) == (3, 4)
    assert sam.longest_suffix_match([8, 8, 2, 3, 4]) == (3, 9)
    assert sam.longest_suffix_match([42]) == (0, 0)
    assert sam.continuation(4, 3).tolist() == [9, 1, 2]
    assert sam.continuation(11, 5).tolist() == [3, 7]
    assert sam.continuation(13, 5).tolist() == []
    assert sam.longest_suffix_match([1, 2, 3, 70000]) == (0, 0)
    assert sam.longest_suffix_match([-1, 1, 2]) == (2, 3)
    with pytest.raises(ValueError, match="token ids"):
        sam.extend_many([1, 2 ** 31])  # ids above 65535 widen the automaton (see the any-vocabulary test)
    with pytest.raises(ValueError, match="token ids"):
        sam.extend(-1)
    assert sam.n_tokens == len(text)  # a refused append changes nothing
    assert sam.longest_suffix_match([1, 2, 3]) == (3, 4)


def assert_same_automaton(a: SuffixAutomaton, b: SuffixAutomaton):
    a.freeze()
    b.freeze()
    for name, arr in a.arrays().items():
        np.testing.assert_array_equal(arr, b.arrays()[name], err_msg=name)


@pytest.mark.parametrize("vocab", [2, 5, 259])
def test_extend_equals_rebuild(vocab):
    rng = np.random.default_rng(vocab)
    text = random_text(rng, 2500, vocab, repetitive=vocab == 5)
    full = SuffixAutomaton.build(text)

    grown = SuffixAutomaton(capacity=16)  # forces several capacity doublings
    i = 0
    while i < len(text):
        m = int(rng.integers(0, 40))
        if m == 1:
            grown.extend(int(text[i]))
        else:
            grown.extend_many(text[i:i + m])
        i += m
        if rng.random() < 0.05:  # queries on the mutable layout agree with the frozen one
            for q in queries_for(rng, text[:i], vocab, 5):
                assert grown.longest_suffix_match(q) == brute_match(text[:i], q)
    assert not grown.frozen
    for q in queries_for(rng, text, vocab, 50):
        assert grown.longest_suffix_match(q) == full.longest_suffix_match(q)
    assert_same_automaton(grown, full)

    # A frozen automaton thaws on extend and ends up identical too.
    thawed = SuffixAutomaton.build(text[:1000])
    thawed.extend_many(text[1000:])
    assert_same_automaton(thawed, full)


def test_cursor_advance_and_peek():
    rng = np.random.default_rng(1)
    text = random_text(rng, 800, 3, repetitive=True)
    sam = SuffixAutomaton.build(text)
    stream = random_text(rng, 300, 3, repetitive=True)
    cur = sam.cursor()
    assert cur.match == (0, 0)
    for i, t in enumerate(stream):
        before = cur.match
        state = cur.state
        peeked = cur.peek(int(t))
        assert cur.match == before and cur.state == state  # peek never commits
        assert peeked == brute_match(text, stream[:i + 1])
        assert cur.advance(int(t)) == peeked
    other = sam.cursor()
    assert other.advance_many(stream) == cur.match


def earlier_match(tokens):
    """The dynamic semantics: longest suffix of tokens that also ends strictly before the last token."""
    tokens = np.asarray(tokens)
    return brute_match(tokens[:-1], tokens) if len(tokens) else (0, 0)


def test_dynamic_matcher_tracks_earlier_occurrence_not_self_match():
    dm = DynamicMatcher(capacity=8)
    dm.reset([1, 2, 3])
    assert dm.match() == (0, 0)  # the trivial self-match of [1, 2, 3] does not count
    assert dm.peek(1) == (1, 1)
    dm.commit([1, 2])
    assert dm.match() == (2, 2)
    assert dm.continuation(dm.match()[1], 4).tolist() == [3, 1, 2]
    dm.commit([3, 4])
    assert dm.match() == (0, 0)
    assert dm.peek(1) == (1, 1)

    rng = np.random.default_rng(7)
    for vocab in (2, 3, 259):
        text = random_text(rng, 1500, vocab, repetitive=vocab != 259)
        dm.reset(text[:200])
        n = 200
        assert dm.match() == earlier_match(text[:n])
        while n < len(text):
            m = int(rng.integers(1, 6))
            t = int(text[n])
            assert dm.peek(t) == brute_match(text[:n], text[:n + 1])
            dm.commit(text[n:n + m])
            n = min(n + m, len(text))
            assert dm.match() == earlier_match(text[:n])
        np.testing.assert_array_equal(dm.tokens, text)
        length, end = dm.match()
        assert end < n or length == 0  # something always follows an earlier occurrence


def test_cursor_survives_extension_that_splits_its_state():
    # After [0, 1, 0] the cursor sits on a state that inserting the next tokens splits; it must still
    # give the same answers as a fresh match against the grown automaton.
    rng = np.random.default_rng(3)
    for _ in range(200):
        text = rng.integers(0, 2, 30)
        sam = SuffixAutomaton.build(text[:10])
        sam.extend_many([])
        cur = sam.cursor()
        cur.advance_many(text[:10])
        sam.extend_many(text[10:20])
        for i in range(10, 30):
            assert cur.peek(int(text[i])) == brute_match(text[:20], text[:i + 1])
            cur.advance(int(text[i]))


def test_save_load_round_trip_memory_maps(tmp_path):
    rng = np.random.default_rng(0)
    text = random_text(rng, 5000, 259, repetitive=True)
    sam = SuffixAutomaton.build(text)
    out = sam.save(tmp_path / "sam", tokenizer="byte-v1", corpus_hash="abc123")
    header = json.loads((out / "header.json").read_text())
    assert header["tokenizer"] == "byte-v1" and header["corpus_hash"] == "abc123"
    assert header["n_tokens"] == 5000 and header["n_states"] == sam.n_states and header["format_version"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["edge_dst.npy", "edge_tok.npy", "header.json",
                                                     "states.npy", "tokens.npy"]

    loaded = SuffixAutomaton.load(out, tokenizer="byte-v1", corpus_hash="abc123")
    for name, arr in sam.arrays().items():
        got = loaded.arrays()[name]
        assert isinstance(got.base, np.memmap) or "mmap" in type(got.base).__name__, name
        np.testing.assert_array_equal(got, arr)
    for q in queries_for(rng, text, 259, 100):
        assert loaded.longest_suffix_match(q) == sam.longest_suffix_match(q)
    assert loaded.continuation(10, 5).tolist() == text[10:15].tolist()

    # Extending a memory-mapped automaton copies; the files stay as saved.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    loaded.extend_many(text[:100])
    query = np.concatenate([text[-3:], text[:100]])
    assert loaded.longest_suffix_match(query) == brute_match(np.concatenate([text, text[:100]]), query)
    assert loaded.longest_suffix_match(query)[0] == 103
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    eager = SuffixAutomaton.load(out, mmap=False)
    np.testing.assert_array_equal(eager.arrays()["states"], sam.arrays()["states"])


def test_load_refuses_mismatch(tmp_path):
    sam = SuffixAutomaton.build(np.arange(50) % 7)
    out = sam.save(tmp_path / "sam", tokenizer="byte-v1", corpus_hash="abc123")
    with pytest.raises(ValueError, match="tokenizer 'byte-v1'.*'bpe-32k'"):
        SuffixAutomaton.load(out, tokenizer="bpe-32k", corpus_hash="abc123")
    with pytest.raises(ValueError, match="corpus 'abc123'.*'fff'"):
        SuffixAutomaton.load(out, tokenizer="byte-v1", corpus_hash="fff")
    with pytest.raises(ValueError, match="missing header.json"):
        SuffixAutomaton.load(tmp_path / "nothing")
    (out / "edge_dst.npy").unlink()
    with pytest.raises(ValueError, match="edge_dst.npy"):
        SuffixAutomaton.load(out)
    # Saving over an existing directory replaces it whole.
    sam.save(out, tokenizer="byte-v1", corpus_hash="new")
    assert SuffixAutomaton.load(out, corpus_hash="new").n_tokens == 50


# ------------------------------------------------------------------------------------ decode.build_sam

ROOT = Path(__file__).resolve().parents[1]


def _tiny_run(tmp_path, sources):
    cfg = (ROOT / "configs" / "decoder_tiny.toml").read_text()
    cfg = cfg.replace("[data]", f"[data]\nsources = {json.dumps(sources)}\ncache_dir = "
                                f"{json.dumps(str(tmp_path / 'cache'))}\nval_fraction = 0.2")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(cfg)
    return run


def test_build_sam_indexes_training_split(tmp_path):
    from core.config import load_config
    from core.data import Corpus
    from core.tokenizer import get_tokenizer
    from decode import build_sam

    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 1))
    run = _tiny_run(tmp_path, [str(src / "*.py")])
    assert build_sam.main([str(run)]) == 0
    cfg = load_config(run / "config.toml")
    tok = get_tokenizer(cfg.data)
    corpus = Corpus.open(cfg.data, tok)
    sam = SuffixAutomaton.load(run / "sam", tokenizer=tok.name, corpus_hash=corpus.key)
    np.testing.assert_array_equal(sam.tokens, corpus.train)
    assert (np.asarray(corpus.train) == tok.eos_id).sum() >= 2  # documents separated by EOS

    assert build_sam.main([str(run), "--max-tokens", "40", "--out", str(tmp_path / "small")]) == 0
    small = SuffixAutomaton.load(tmp_path / "small", tokenizer=tok.name, corpus_hash=corpus.key)
    np.testing.assert_array_equal(small.tokens, corpus.train[:40])


def test_build_sam_bad_input_exits_2_without_output(tmp_path, capsys):
    from decode import build_sam

    foreign = tmp_path / "foreign.toml"
    foreign.write_text("[server]\nport = 80\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in [str(tmp_path / "missing"), str(foreign), str(empty)]:
        out = tmp_path / "out"
        assert build_sam.main([target, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()
    run = _tiny_run(tmp_path, [str(tmp_path / "nothing" / "*.py")])
    assert build_sam.main([str(run)]) == 2
    assert "matched no files" in capsys.readouterr().err
    assert not (run / "sam").exists()
    shutil.rmtree(run)


def test_any_vocabulary_ids_above_65535_index_match_and_round_trip(tmp_path):
    """Hugging Face vocabularies (150k ids) need uint32 storage: build, extend, the dynamic matcher (which
    widens itself on its first large id) and save/load all keep ids above 65535 intact."""
    rng = np.random.default_rng(11)
    big = 151_000  # a Qwen-sized vocabulary
    text = random_text(rng, 3000, 300, repetitive=True) * 500 + rng.integers(0, 2, 3000)  # ids up to ~150k
    assert text.max() > 65535
    sam = SuffixAutomaton.build(text)
    assert sam.token_dtype == np.uint32 and sam.arrays()["edge_tok"].dtype == np.uint32
    for q in queries_for(rng, text, big, 40):
        assert sam.longest_suffix_match(q) == brute_match(text, q)
    length, end = sam.longest_suffix_match(text[100:120])
    np.testing.assert_array_equal(sam.continuation(end, 5), text[end:end + 5])
    sam.save(tmp_path / "s", tokenizer="hf", corpus_hash="h")
    back = SuffixAutomaton.load(tmp_path / "s")
    assert back.token_dtype == np.uint32 and json.loads((tmp_path / "s" / "header.json").read_text())[
        "token_dtype"] == "uint32"
    for q in queries_for(rng, text, big, 20):
        assert back.longest_suffix_match(q) == brute_match(text, q)
    small = SuffixAutomaton.build(text % 1000)  # a small vocabulary stays uint16
    assert small.token_dtype == np.uint16

    dm = DynamicMatcher(capacity=8)
    dm.reset(text[:50] % 1000)  # starts uint16 ...
    assert dm.sam.token_dtype == np.uint16
    dm.commit(text[50:400])  # ... and widens on the first id > 65535, keeping what it held
    assert dm.sam.token_dtype == np.uint32
    full = np.concatenate([text[:50] % 1000, text[50:]])
    np.testing.assert_array_equal(dm.tokens, full[:400])
    n = 400
    while n < 1500:
        dm.commit(full[n:n + 3])
        n += 3
        assert dm.match() == earlier_match(full[:n])
    with pytest.raises(ValueError, match="token ids"):
        dm.commit([2 ** 31])
    with pytest.raises(ValueError, match="token ids"):
        SuffixAutomaton.build([-1, 2])
