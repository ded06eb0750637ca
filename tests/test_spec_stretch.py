"""Plain stretches: when no row drafts, the speculative loop runs 1, 2, 4, ... plain steps without the host.

Greedy output stays identical to plain decoding; each stretch token counts as one step of its row; the host
is called once per stretch (`verify_calls`); stop ids and budgets end a row inside a stretch; observing
drafters see every position a stretch verified; and a stretch after accepted drafts (or drafts after a
stretch) reads no stale cache, recurrent or concept state, for every architecture.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from core.tokenizer import get_tokenizer
from decode.drafters import Drafter, ObservedCost, VerifyCost
from decode.engine import Engine
from models.decoder import DecoderConfig, DecoderLM
from models.registry import MODELS

TOK = get_tokenizer("byte")
ROWS = 3


class Scripted(Drafter):
    """Knows the true greedy continuation; drafts it (up to k) on the calls listed in `on`, else nothing.
    Records the number of tokens accepted before each draft call (where in the output each call came)."""

    def __init__(self, ref, on=(), observes=False):
        super().__init__(observes=observes)
        self.ref = np.asarray(ref, np.int32)
        self.on = set(on)
        self.at, self.accepted, self.seen = [], [], []

    def reset(self, prompt):
        self.at, self.accepted, self.seen = [], [], []

    def accept(self, tokens):
        self.accepted += [int(t) for t in tokens]

    def observe(self, inputs, topk):
        self.seen.append((np.array(inputs), np.array(topk)))

    def draft(self, k):
        call = len(self.at)
        pos = len(self.accepted)
        self.at.append(pos)
        return self.ref[pos:pos + k] if call in self.on else self.ref[:0]


@pytest.fixture(scope="module")
def engine():
    model = DecoderLM(DecoderConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attn_block=16), rngs=nnx.Rngs(2))
    return Engine(model, max_len=96, bos_id=TOK.bos_id, verify_sizes=(0, 1, 4), max_stretch=16)


def prompts(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(32, 127, size=n).astype(np.int32) for n in lengths]


def test_stretches_double_while_nothing_drafts_and_keep_output_and_steps(engine):
    ps = prompts(11, seed=1)
    ref = engine.generate(ps, max_new_tokens=40, stop_ids=()).tokens
    d = Scripted(ref[0])
    res = engine.generate_speculative(ps, [d], max_new_tokens=40, stop_ids=())
    assert res.tokens[0].tolist() == ref[0].tolist()
    assert d.accepted == ref[0].tolist()  # the drafter saw exactly the final tokens, none twice
    # the first token comes from prefill; then stretches of 1, 2, 4, 8, 16 steps, then the 8 left
    assert d.at == [1, 2, 4, 8, 16, 32]
    assert res.steps == [39] and res.mat == 1.0 and res.verify_calls == 6
    # a request may cap the stretch (no recompile); 0 or 1: the old loop, one host call per plain step
    traces = engine.traces["speculate"]
    for cap, calls in ((1, 39), (0, 39), (4, 3 + 8)):
        d = Scripted(ref[0])
        res = engine.generate_speculative(ps, [d], max_new_tokens=40, stop_ids=(), max_stretch=cap)
        assert res.tokens[0].tolist() == ref[0].tolist() and res.steps == [39]
        assert res.verify_calls == calls, cap
    assert engine.traces["speculate"] == traces


def test_a_draft_resets_the_stretch_and_drafts_after_stretches_are_right(engine):
    ps = prompts(7, seed=2)
    ref = engine.generate(ps, max_new_tokens=50, stop_ids=()).tokens
    d = Scripted(ref[0], on={3, 4, 9})
    res = engine.generate_speculative(ps, [d], max_new_tokens=50, stop_ids=())
    assert res.tokens[0].tolist() == ref[0].tolist() and d.accepted == ref[0].tolist()
    # calls 0-2 draft nothing (stretches 1, 2, 4); calls 3 and 4 draft 4 (all accepted, +5 each); call 5
    # drafts nothing again: the stretch starts over at 1, then 2, 4, 8; call 9 drafts again
    assert d.at[:10] == [1, 2, 4, 8, 13, 18, 19, 21, 25, 33]
    assert d.at[10] == 38 and res.steps == [49 - 3 * 4]


def test_stops_and_budgets_end_a_row_inside_a_stretch(engine):
    ps = prompts(5, 21, 9, seed=3)
    ref = engine.generate(ps, max_new_tokens=40, stop_ids=(), batch_size=ROWS).tokens
    # a stop id first emitted inside the stretch that covers outputs 8..15 (of 1, 2, 4, 8 steps), by no row
    # earlier: the device must end that row there (each stretch token is a step: the count shows it)
    first = lambda t: min(r.tolist().index(t) if t in r.tolist() else 99 for r in ref)  # noqa: E731
    stop = next(int(t) for r in ref for t in r[9:15] if 9 <= first(int(t)) < 15)
    plain = engine.generate(ps, max_new_tokens=[40, 40, 23], stop_ids=(stop,), batch_size=ROWS)
    assert any(len(t) < 16 and t[-1] == stop for t in plain.tokens) and len(plain.tokens[2]) <= 23
    ds = [Scripted(r) for r in ref]
    spec = engine.generate_speculative(ps, ds, max_new_tokens=[40, 40, 23], stop_ids=(stop,), batch_size=ROWS)
    assert [t.tolist() for t in spec.tokens] == [t.tolist() for t in plain.tokens]
    assert [d.accepted for d in ds] == [t.tolist() for t in plain.tokens]
    assert spec.steps == [len(t) - 1 for t in plain.tokens]


def test_observers_see_every_position_a_stretch_verified(engine):
    ps = prompts(6, seed=5)
    ref = engine.generate(ps, max_new_tokens=30, stop_ids=()).tokens
    d = Scripted(ref[0], on={2}, observes=True)
    engine.generate_speculative(ps, [d], max_new_tokens=30, stop_ids=())
    seq = ref[0].tolist()
    assert len(set(seq[:8])) >= 4  # tokens that vary inside the stretches, so their order is checked
    pos = 0
    assert len(d.seen) > 3
    for inputs, topk in d.seen[1:]:  # [0] is the prompt
        assert topk.shape == (len(inputs), engine.observe_k)
        assert inputs.tolist() == seq[pos:pos + len(inputs)]
        assert topk[:, 0].tolist() == seq[pos + 1:pos + 1 + len(inputs)]  # the greedy token after each input
        pos += len(inputs)
    assert pos == len(seq) - 1


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_architecture_alternating_stretches_and_drafts_equals_plain(arch):
    """Stretches after accepted drafts and drafts after stretches, rows out of step: no stale state."""
    cls = MODELS[arch]
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    small = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attn_block=16, window=8)
    model = cls(cls.config_class(**{k: v for k, v in small.items() if k in names}), rngs=nnx.Rngs(0))
    eng = Engine(model, max_len=64, bos_id=TOK.bos_id, verify_sizes=(0, 4), max_stretch=8)
    ps = prompts(5, 19, seed=8)
    plain = eng.generate(ps, max_new_tokens=30, stop_ids=(), batch_size=2)
    ds = [Scripted(plain.tokens[0], on={2, 3, 6}), Scripted(plain.tokens[1], on={0, 4, 5})]
    spec = eng.generate_speculative(ps, ds, max_new_tokens=30, stop_ids=(), batch_size=2)
    assert [t.tolist() for t in spec.tokens] == [t.tolist() for t in plain.tokens]
    assert spec.mat > 1.0


def test_the_engine_corrects_its_cost_table_from_the_steps_it_serves(engine):
    ps = prompts(7, seed=2)
    ref = engine.generate(ps, max_new_tokens=50, stop_ids=()).tokens
    observed = engine._observed[1] = ObservedCost(VerifyCost((0, 1, 4), (1e-3, 2e-3, 3e-3)))
    try:
        d = Scripted(ref[0], on={3, 4})
        res = engine.generate_speculative(ps, [d], max_new_tokens=50, stop_ids=())
        assert res.tokens[0].tolist() == ref[0].tolist()
        assert engine.observed_cost(1) is observed
        # two verify steps of size 4; size 0 is a token of the longest stretch (16): the one of outputs 33..48
        # (after the drafts the stretch starts over at 1, 2, 4, 8); shorter stretches are not timed
        assert observed.n.tolist() == [1, 0, 2]
        assert observed.mean[0] > 0 and observed.mean[2] > 0
    finally:
        del engine._observed[1]
