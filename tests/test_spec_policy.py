"""sam's cost rule: draft lengths from expected accepted tokens per unit of measured verify cost."""

import numpy as np
import pytest

from decode.drafters import Acceptance, ObservedCost, SAMDrafter, VerifyCost, best_length, make_drafter

V = 259
CHEAP = VerifyCost((0, 1, 2, 4), (1.0, 1.1, 1.2, 1.4))  # verifying is almost free (an accelerator)
DEAR = VerifyCost((0, 1, 2, 4), (1.0, 2.0, 2.5, 3.0))  # each drafted token costs most of a step


def test_best_length_maximises_tokens_per_cost():
    # rate 0.5: n=1 -> 1.5/1.1, n=2 -> 1.75/1.2 (best), n=4 -> 1.9375/1.4; a plain step is 1/1.0
    n, v = best_length(0.5, 10, 4, CHEAP)
    assert n == 2 and v == pytest.approx(1.75 / 1.2)
    assert best_length(0.5, 10, 4, DEAR)[0] == 0  # 1.5/2 < 1: a plain step pays more
    assert best_length(0.95, 10, 4, DEAR)[0] == 4  # (1 + .95 + ... + .95^4)/3 = 1.49 > 1
    assert best_length(0.95, 1, 4, CHEAP)[0] == 1  # only one token to copy
    assert best_length(0.95, 10, 1, CHEAP)[0] == 1  # room for one
    assert VerifyCost.default((0, 4)).of(3) == VerifyCost.default((0, 4)).of(4)  # smallest size that holds it


def short_match_prompt():
    # the last two tokens [1, 2] occurred earlier, followed by 9 9 9: a dynamic match of length 2
    return np.array([5, 6, 7, 8, 1, 2, 9, 9, 9, 3, 4, 1, 2], np.int32)


def test_short_dynamic_match_drafts_only_when_the_cost_table_makes_it_pay():
    p = short_match_prompt()
    cheap = make_drafter("sam", vocab_size=V, cost=CHEAP)
    cheap.reset(p)
    assert cheap.matches()[0] == 2
    d = cheap.draft(4)
    assert d.tolist() == [9, 9, 9, 3][:len(d)] and len(d) >= 1 and cheap.last_source == "dynamic"

    dear = make_drafter("sam", vocab_size=V, cost=DEAR)
    dear.reset(p)
    assert dear.draft(4).shape == (0,) and dear.last_source == "none"

    paper = make_drafter("sam", vocab_size=V, cost=CHEAP, rule="paper")  # l_threshold 5 > 2: never drafts
    paper.reset(p)
    assert paper.draft(4).shape == (0,)


def test_acceptance_is_learnt_online_and_stops_drafts_that_keep_failing():
    d = make_drafter("sam", vocab_size=V, cost=VerifyCost((0, 1, 2, 4), (1.0, 1.3, 1.4, 1.6)))
    assert isinstance(d, SAMDrafter)
    p = short_match_prompt()
    d.reset(p)
    prior = d.acceptance.rate(0, 2)
    drafted = 0
    for _ in range(6):  # every draft rejected at its first token: the bonus token is never 9
        out = d.draft(4)
        drafted += len(out) > 0
        d.accept(np.array([77], np.int32))
        d.dynamic.reset(p)  # keep the same short match in front of the drafter
    assert d.acceptance.rate(0, 2) <= prior / 2
    assert drafted >= 1 and d.draft(4).shape == (0,)  # no longer pays
    d.reset(p)
    assert d.acceptance.rate(0, 2) == prior  # a new request starts from the prior

    a = Acceptance()
    for _ in range(20):
        a.record(0, 3, 4, 4)  # whole drafts accepted
    assert a.rate(0, 3) > 0.95 and a.rate(0, 4) == Acceptance.prior(0, 4)


def test_acceptance_history_carries_across_requests_of_one_maker():
    """Drafters made with one `history` start a request from what earlier requests learnt (bounded), and a
    drafter without one starts from the prior."""
    cost = VerifyCost((0, 1, 2, 4), (1.0, 1.3, 1.4, 1.6))
    hist = Acceptance()
    p = short_match_prompt()
    first = make_drafter("sam", vocab_size=V, cost=cost, history=hist)
    first.reset(p)
    prior = first.acceptance.rate(0, 2)
    for _ in range(30):  # every draft rejected at its first token
        if len(first.draft(4)):
            first.accept(np.array([77], np.int32))
        first.dynamic.reset(p)
    assert first.acceptance.rate(0, 2) <= prior / 2
    for _ in range(100):  # a long history of failures elsewhere
        hist.record(0, 2, 4, 0)
    second = make_drafter("sam", vocab_size=V, cost=cost, history=hist)
    second.reset(p)
    learnt = second.acceptance.rate(0, 2)
    assert learnt <= prior / 2 and second.draft(4).shape == (0,)  # the new request knows short matches fail
    assert second.acceptance.rate(0, 5) == Acceptance.prior(0, 5)  # other buckets: the prior
    # bounded: however long the history, this request's own evidence moves the estimate
    for _ in range(4):
        second.acceptance.record(0, 2, 4, 4)
    assert second.acceptance.rate(0, 2) > learnt + 0.2
    fresh = make_drafter("sam", vocab_size=V, cost=cost)
    fresh.reset(p)
    assert fresh.acceptance.rate(0, 2) == prior


def test_observed_cost_follows_the_machine_and_keeps_the_ratios_it_has_not_seen():
    base = VerifyCost((0, 1, 4), (1.0, 2.0, 3.0))
    c = ObservedCost(base)
    assert c.cost == base.cost and c.of(3) == 3.0 and c.max_size == 4
    for _ in range(200):  # the machine is twice as slow as at warm-up (only size 4 is seen)
        c.observe(4, 6.0)
    assert c.cost == pytest.approx((2.0, 4.0, 6.0))  # unseen sizes scaled by the same load
    assert c.relative() == pytest.approx({0: 1.0, 1: 2.0, 4: 3.0})
    for _ in range(200):  # size 1 turns out cheap: its own mean outweighs the base
        c.observe(1, 2.0)
    assert c.of(1) < 3.0 and c.of(1) <= c.of(4) and c.of(0) <= c.of(1)
    c.observe(2, 1.0)  # not a compiled size: ignored
    for _ in range(200):  # a spike at size 1 above size 4 is noise: never more than a larger size
        c.observe(1, 50.0)
    assert c.of(1) == c.of(4)
    # the cost rule reads it like a VerifyCost
    assert best_length(0.9, 10, 4, c)[0] in (0, 1, 2, 3, 4)


def test_sam_is_never_behind_pld_on_a_repeat_it_can_see():
    """Where pld drafts from a short n-gram, sam (cost rule, cheap verify) drafts the same continuation."""
    rng = np.random.default_rng(0)
    text = rng.integers(0, 50, 60).astype(np.int32)
    ctx = np.concatenate([text, text[:20]])
    sam = make_drafter("sam", vocab_size=V, cost=CHEAP)
    pld = make_drafter("pld", vocab_size=V, max_len=4)
    for d in (sam, pld):
        d.reset(ctx)
    s, q = sam.draft(4), pld.draft(4)
    assert len(s) >= 1 and s.tolist() == text[20:20 + len(s)].tolist()
    assert q.tolist()[:len(s)] == s.tolist()[:len(q)]


def test_verify_cost_and_rule_validate():
    with pytest.raises(ValueError, match="size 0"):
        VerifyCost((1, 2), (1.0, 1.0))
    with pytest.raises(ValueError, match="unknown draft rule 'fast'"):
        make_drafter("sam", vocab_size=V, rule="fast")


def test_step_elapsed_uses_the_thread_clock_and_wall_time_across_threads():
    """Steps are timed by the CPU clock of the thread that runs the loop (cheap, and load-proof); a pair of
    stamps from two threads (the loop moved) falls back to wall time rather than mixing two threads' clocks."""
    from decode.speculation import step_elapsed

    a = (1.0, 7, 100.0)
    assert step_elapsed(a, (1.25, 7, 100.5)) == 0.25  # same thread: its CPU time
    assert step_elapsed(a, (0.10, 8, 100.5)) == 0.5  # another thread: wall time
