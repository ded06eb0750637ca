import numpy as np
import pytest

from decode.drafters import DRAFTERS, DraftPolicy, SAMDrafter, make_drafter
from decode.sam import SuffixAutomaton

V = 259


def arr(*xs):
    return np.array(xs, np.int32)


def test_none_never_drafts():
    d = make_drafter("none", vocab_size=V)
    d.reset(arr(1, 2, 3, 1, 2))
    d.accept(arr(3))
    assert d.draft(8).shape == (0,)
    d.observe(arr(3), np.zeros((1, 8), np.int32))  # the hook exists and is harmless


def test_pld_proposes_continuation_of_most_recent_ngram():
    d = make_drafter("pld", vocab_size=V, alpha=1.0, max_len=8)
    # "7 8 9" occurs twice; the most recent occurrence is followed by 40 41 42.
    prompt = arr(7, 8, 9, 10, 11, 12, 5, 7, 8, 9, 40, 41, 42, 43, 6)
    d.reset(prompt)
    assert d.draft(8).shape == (0,)  # last token 6 never occurred before
    d.accept(arr(7, 8))
    d.accept(arr(9))
    out = d.draft(8)
    assert d.last_match_len >= 3
    assert out.dtype == np.int32 and out.tolist() == [40, 41, 42, 43, 6, 7, 8, 9][:len(out)] and len(out) >= 3
    assert d.draft(2).tolist() == [40, 41]  # never more than k
    # Falls back to shorter n-grams: only the last token 12 has occurred.
    d.reset(arr(1, 12, 30, 31, 2, 3, 12))
    assert d.draft(8).tolist() == [30]
    assert d.last_match_len == 1


def test_pld_sizes_drafts_from_the_match_length():
    motif = np.arange(20, 60, dtype=np.int32)
    short = make_drafter("pld", vocab_size=V)
    short.reset(np.concatenate([motif, arr(1), motif[:3]]))
    long_ = make_drafter("pld", vocab_size=V)
    long_.reset(np.concatenate([motif, arr(1), motif[:30]]))
    assert 0 < len(short.draft(40)) < len(long_.draft(40)) <= DraftPolicy().max_len
    accel = make_drafter("pld", vocab_size=V, alpha=4.0, max_len=40)
    accel.reset(np.concatenate([motif, arr(1), motif[:30]]))
    out = accel.draft(40)
    assert len(out) == 40 and out[:11].tolist() == motif[30:].tolist() + [1]


def test_sam_uses_dynamic_match_without_static():
    # the paper's rule; the cost rule is tested in test_spec_policy.py
    d = make_drafter("sam", vocab_size=V, alpha=1.0, rule="paper")
    seg = arr(11, 12, 13, 14, 15, 16, 17, 18, 19)
    d.reset(np.concatenate([arr(1, 2), seg, arr(3, 4)]))
    assert d.draft(8).shape == (0,) and d.last_source == "none"
    d.accept(seg[:4])
    assert d.draft(8).shape == (0,)  # match of 4 < l_threshold
    d.accept(seg[4:6])
    out = d.draft(8)
    assert d.last_source == "dynamic" and d.last_match_len == 6
    assert out.tolist() == [17, 18, 19, 3, 4, 11][: len(out)] and len(out) == 6


def _static_with(tokens):
    return SuffixAutomaton.build(np.asarray(tokens))


def test_sam_prefers_static_only_when_it_beats_dynamic_by_more_than_bias():
    # Static corpus has a 12-token run; the request repeats 7 of them (dynamic match 7 after the repeat).
    run = np.arange(100, 112, dtype=np.int32)
    corpus = np.concatenate([arr(5, 5), run, arr(200, 201, 202, 203, 204, 205)])
    static = _static_with(corpus)

    # Dynamic match 7, static match 12: 12 - 5 = 7 ties -> dynamic.
    d = make_drafter("sam", vocab_size=V, static_sam=static, alpha=1.0, rule="paper")
    d.reset(np.concatenate([run[5:12], arr(9)]))
    d.accept(run[:12])
    assert d.matches() == (7, 12)
    out = d.draft(8)
    assert d.last_source == "dynamic"
    assert out[0] == 9  # what followed the earlier occurrence in the request

    # Dynamic match 6, static 12: 12 - 5 = 7 > 6 -> static continuation from the corpus.
    d.reset(np.concatenate([run[6:12], arr(9)]))
    d.accept(run[:12])
    assert d.matches() == (6, 12)
    out = d.draft(8)
    assert d.last_source == "static"
    assert out.tolist() == [200, 201, 202, 203, 204, 205][: len(out)] and len(out) >= 3

    # Static alone must reach l_threshold after the bias: 9 - 5 = 4 < 5 -> no draft.
    d.reset(arr(1))
    d.accept(run[3:12])
    assert d.matches()[1] == 9 and d.draft(8).shape == (0,)
    d.accept(arr(200))
    assert d.draft(8).tolist()[:1] == [201] and d.last_source == "static"


def test_rejected_tokens_never_enter_the_automata():
    rng = np.random.default_rng(0)
    corpus = rng.integers(0, 6, 3000)
    static = _static_with(corpus)
    for name in ("sam", "sam+recycle"):
        d = make_drafter(name, vocab_size=V, static_sam=static)
        assert isinstance(d, SAMDrafter)
        prompt = rng.integers(0, 6, 50)
        d.reset(prompt)
        final = list(prompt)
        for _ in range(60):
            draft = d.draft(8)
            # Accept a random prefix of the draft plus a bonus token; the rest is rejected.
            keep = int(rng.integers(0, len(draft) + 1))
            new = np.concatenate([draft[:keep], rng.integers(0, 6, 1)]).astype(np.int32)
            d.accept(new)
            final.extend(new.tolist())
            np.testing.assert_array_equal(d.dynamic.tokens, final)
            assert d.static_cursor.match == static.longest_suffix_match(final)
        # A fresh request starts from its prompt alone.
        d.reset(prompt[:10])
        np.testing.assert_array_equal(d.dynamic.tokens, prompt[:10])


def test_recycle_table_updates_from_observe_and_resets_per_request():
    d = make_drafter("sam+recycle", vocab_size=V, aux_len=3, rule="paper")
    d.reset(arr(1, 2, 3))
    assert d.draft(8).shape == (0,)  # empty table
    inputs = arr(3, 50, 60)
    topk = np.array([[50, 51, 52], [60, 61, 62], [70, 71, 72]], np.int32)
    d.observe(inputs, topk)
    assert d.aux.table.succ[3, :3].tolist() == [50, 51, 52]
    out = d.draft(8)
    assert out.tolist() == [50, 60, 70] and d.last_source == "recycle"
    assert d.draft(2).tolist() == [50, 60]
    d.accept(arr(50, 60))
    assert d.draft(8).tolist() == [70]  # chain stops at a token never verified
    # Newer verification results overwrite older ones.
    d.observe(arr(60), np.array([[99, 98, 97]], np.int32))
    assert d.draft(8).tolist() == [99]
    d.reset(arr(1, 2, 3))
    assert (d.aux.table.succ == -1).all()
    assert d.draft(8).shape == (0,)

    solo = make_drafter("recycle", vocab_size=V)
    solo.reset(arr(4))
    solo.observe(arr(4, 5), np.array([[5, 0], [6, 0]], np.int32))
    assert solo.draft(8).tolist() == [5, 6]


def test_sam_recycle_prefers_a_strong_match_over_recycling():
    d = make_drafter("sam+recycle", vocab_size=V, alpha=1.0)
    seg = arr(11, 12, 13, 14, 15, 16, 17)
    d.reset(np.concatenate([seg, arr(30)]))
    d.observe(arr(16), np.array([[90]], np.int32))
    d.accept(seg[:6])
    assert d.draft(8).tolist()[:2] == [17, 30] and d.last_source == "dynamic"
    d.accept(arr(40))
    d.observe(arr(40), np.array([[41]], np.int32))
    assert d.draft(8).tolist() == [41] and d.last_source == "recycle"


def test_make_drafter_validates():
    for name in DRAFTERS:
        d = make_drafter(name, vocab_size=V)
        assert d.observes == name.endswith("recycle")
        d.reset(arr(1, 2, 1))
        assert d.draft(4).shape[0] <= 4
    with pytest.raises(ValueError, match="unknown drafter 'eagle'.*none, pld.*sam\\+recycle"):
        make_drafter("eagle", vocab_size=V)
    with pytest.raises(ValueError, match="unknown draft policy key 'l_thresh'.*l_threshold"):
        make_drafter("sam", vocab_size=V, l_thresh=3)
    with pytest.raises(ValueError, match="min_len"):
        make_drafter("sam", vocab_size=V, max_len=0)
