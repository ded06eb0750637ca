"""The host's per-step bookkeeping (decode/speculation.py SpeculativeRun) and the step-time table it feeds
(ObservedCost), pinned to values written out by hand, without an engine."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from decode.drafters import Acceptance, ObservedCost, VerifyCost
from decode.speculation import SpeculativeRun

PAD = 0


class Scripted:
    """Drafts the first k tokens of `script` and logs what it is given."""

    observes = False

    def __init__(self, script):
        self.script, self.log = list(script), []

    def reset(self, prompt):
        self.log.append(("reset", np.asarray(prompt).tolist()))

    def draft(self, k):
        self.log.append(("draft", k))
        return np.asarray(self.script[:k], np.int32)

    def accept(self, tokens):
        self.log.append(("accept", np.asarray(tokens).tolist()))


def _run(drafters, max_new, first, stops=(3,), kmax=4, n_real=None, sizes=(), cost=None, stretch=1):
    b = len(max_new)
    n_real = len(drafters) if n_real is None else n_real
    req = SimpleNamespace(prompts=[np.asarray([1, 2], np.int32)] * b, n_real=n_real,
                          max_new_B=np.asarray(max_new, np.int32), stop_S=np.asarray(list(stops) + [-1], np.int32))
    live0 = np.asarray([m > 0 for m in max_new])
    return SpeculativeRun(req, drafters + [None] * (b - n_real), max_verify=kmax, pad_id=PAD, vocab_size=50,
                          observe_k=0, first=np.asarray(first, np.int32), n0=live0.astype(np.int32), done0=~live0,
                          prompt_topk=None, observed_cost=cost, sizes=sizes, stretch=stretch)


def _emitted(rows, w):
    """[tokens (w) | count | steps] per row from (tokens, steps)."""
    out = np.full((len(rows), w + 2), PAD, np.int32)
    for i, (toks, steps) in enumerate(rows):
        out[i, :len(toks)] = toks
        out[i, w], out[i, w + 1] = len(toks), steps
    return out


def test_step_emits_stops_and_writes_next_inputs_lengths_live_and_room():
    w = 5
    a, b = Scripted([11, 12, 13, 14, 15]), Scripted([])
    run = _run([a, b], max_new=[6, 9, 0], first=[7, 8, 0], n_real=2)
    inputs, draft_len, live = run.drafts()
    # row 0 may emit 5 more: a draft of min(4, 5 - 1); row 1 drafts nothing; row 2 is padding
    np.testing.assert_array_equal(inputs, [[7, 11, 12, 13, 14], [8, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(draft_len, [4, 0, 0])
    np.testing.assert_array_equal(live, [True, True, False])
    np.testing.assert_array_equal(run.room(), [5, 8, 0])
    # row 0: two drafts accepted, then 9; row 1: a plain stretch of 3 steps that hits stop id 3 at its second
    out = run.step(_emitted([([11, 12, 9], 1), ([5, 3, 8], 3), ([], 0)], w), w)
    assert run.emitted[:2] == [[7, 11, 12, 9], [8, 5, 3]]
    assert run.steps == [1, 3, 0] and run.calls == 1
    # row 0 has room for 2 more: a draft of 1; row 1 stopped
    np.testing.assert_array_equal(out, [[9, 11, 0, 0, 0, 1, 1, 2],
                                        [3, 0, 0, 0, 0, 0, 0, 6],
                                        [0, 0, 0, 0, 0, 0, 0, 0]])
    assert a.log[-2:] == [("accept", [11, 12, 9]), ("draft", 1)] and b.log[-1] == ("accept", [5, 3])
    # the verifier emits more than the budget: cut at it, and the row ends
    out = run.step(_emitted([([11, 4, 4], 1), ([], 0), ([], 0)], w), w)
    assert run.emitted[0] == [7, 11, 12, 9, 11, 4] and run.steps == [2, 3, 0]
    np.testing.assert_array_equal(out[:, 5:], [[0, 0, 0], [0, 0, 6], [0, 0, 0]])
    np.testing.assert_array_equal(out[0, :5], [4, 0, 0, 0, 0])


def test_a_drafter_error_ends_the_loop_and_is_kept():
    w = 5
    bad = Scripted([1])
    run = _run([bad], max_new=[8], first=[7])
    run.drafts()
    bad.script = [5, 99]  # 99 is outside the vocabulary
    out = run.step(_emitted([([1, 5], 1)], w), w)
    assert isinstance(run.error, ValueError) and "outside [0, 50)" in str(run.error)
    assert out[0, 6] == 0 and out[0, 7] == 5  # no live row: the loop ends
    out = run.step(_emitted([([5], 1)], w), w)  # a late call changes nothing
    assert out[0, 6] == 0 and run.emitted[0] == [7, 1, 5]


def test_observed_sizes_are_the_verify_size_of_the_longest_draft_or_a_plain_step():
    w = 5
    seen = []
    cost = SimpleNamespace(observe=lambda size, s: seen.append(size))
    a, b = Scripted([11, 12, 13]), Scripted([21])
    run = _run([a, b], max_new=[40, 40], first=[7, 8], sizes=(0, 1, 2, 4), cost=cost)
    run.drafts()  # drafts of 3 and 1: verify size 4
    run.step(_emitted([([11, 12, 13, 14], 1), ([21, 22], 1)], w), w)  # first call: nothing to time yet
    run.step(_emitted([([30], 1), ([31], 1)], w), w)  # the step that verified 3 + 1 tokens
    a.script, b.script = [], [21, 22]
    run.step(_emitted([([32], 1), ([33], 1)], w), w)  # still size 4 (drafts of 3, 1)
    run.step(_emitted([([34], 1), ([35, 36], 1)], w), w)  # drafts of 0 and 2: size 2
    a.script = b.script = []
    run.step(_emitted([([37], 1), ([38, 39, 40], 1)], w), w)  # drafts of 0 and 2 again: size 2
    run.step(_emitted([([41], 1), ([42], 1)], w), w)  # no draft, one step: a plain step (size 0)
    run.step(_emitted([([43, 44], 2), ([45, 46], 2)], w), w)  # a stretch of 2 steps: not timed
    assert seen == [4, 4, 2, 2, 0]



def test_size_0_is_timed_per_token_at_the_longest_stretch_only(monkeypatch):
    """With plain stretches (here up to 4 steps per host call), an undrafted iteration is timed as size 0 only at
    the longest stretch, per token (the price of not drafting); the ramp's shorter stretches are not timed."""
    import decode.speculation as spec

    monkeypatch.setattr(spec, "step_elapsed", lambda a, b: 1.0)  # every interval between host calls costs 1
    w, seen = 5, []
    cost = SimpleNamespace(observe=lambda size, s: seen.append((size, s)))
    a = Scripted([])
    run = _run([a], max_new=[60], first=[7], sizes=(0, 1, 2, 4), cost=cost, stretch=4)
    run.drafts()
    run.step(_emitted([([11], 1)], w), w)  # first call: nothing to time yet
    run.step(_emitted([([12, 13], 2)], w), w)  # a stretch of 2: the ramp, not timed
    run.step(_emitted([([14, 15, 16, 17], 4)], w), w)  # the longest stretch: 1/4 per token
    a.script = [21, 22]
    run.step(_emitted([([18, 19, 20, 21], 4)], w), w)  # again; this call drafts 2
    a.script = []
    run.step(_emitted([([21, 22, 23], 1)], w), w)  # the verify of 2 drafts: size 2
    run.step(_emitted([([24], 1)], w), w)  # one undrafted step after a draft: not timed
    assert seen == [(0, 0.25), (0, 0.25), (2, 1.0)]

def test_observed_cost_is_its_definition():
    """Each size: (w * base * load + n * mean) / (w + n), load = exp(sum n log(mean / base) / sum n) over the
    observed sizes, running means that forget beyond `memory`, then never decreasing in size."""
    rng = np.random.default_rng(0)
    base = VerifyCost((0, 1, 2, 4), (1.0, 1.5, 1.6, 2.0))
    c = ObservedCost(base, weight=4.0, memory=8)
    n, mean = [0] * 4, [0.0] * 4
    for _ in range(60):
        i = int(rng.integers(0, 4))
        s = float(rng.uniform(0.5, 5.0))
        c.observe(base.sizes[i], s)
        n[i] = min(n[i] + 1, 8)
        mean[i] += (s - mean[i]) / n[i]
        seen = [j for j in range(4) if n[j]]
        load = math.exp(sum(n[j] * math.log(mean[j] / base.cost[j]) for j in seen) / sum(n[j] for j in seen))
        want = [(4.0 * base.cost[j] * load + n[j] * mean[j]) / (4.0 + n[j]) for j in range(4)]
        want = [min(want[j:]) for j in range(4)]
        assert c.cost == pytest.approx(want, rel=1e-12)
        assert c.of(3) == c.cost[3]
    np.testing.assert_array_equal(c.n, n)


def test_acceptance_rate_is_counts_plus_scaled_history_plus_prior():
    hist = Acceptance()
    for _ in range(30):  # an earlier request: 30 drafts of 4 from dynamic matches of length 3, 2 tokens taken
        hist.record(0, 3, 4, 2)
    hist.record(1, 3, 2, 1)  # and one static draft of 2, 1 taken: fewer than 8 observations, kept as they are
    a = Acceptance(history=hist)  # begins now: the history's 60 hits / 90 tokens, scaled to 8 observations
    a.record(0, 3, 4, 4)  # this request: 4 hits, no miss
    scale = 8.0 / 90.0
    prior = 3 / 5.0
    assert a.rate(0, 3) == pytest.approx((4 + scale * 60 + 2 * prior) / (4 + scale * 90 + 2), rel=1e-12)
    assert a.rate(1, 3) == pytest.approx((1 + 2 * prior) / (2 + 2), rel=1e-12)
    assert a.rate(2, 0) == pytest.approx(0.5)  # a source without counts: the prior alone
    assert a.rate(0, 12) == pytest.approx(12 / 14.0)  # bucket 8+ holds nothing yet
    a.record(0, 11, 3, 1)
    assert a.rate(0, 9) == pytest.approx((1 + 2 * 9 / 11.0) / (2 + 2))  # lengths 8+ share a bucket
    np.testing.assert_array_equal(a.hit[0, [3, 8]], [4, 1])
    np.testing.assert_array_equal(hist.hit[0, 3], 64)  # records reach the history too
