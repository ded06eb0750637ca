"""Speculative decoding at the edge of max_len with the largest verify size, for every architecture, and
speculative == plain under bf16 compute.

A row whose prompt + budget fills the room exactly (max_len - slack, slack = max verify size + 1), with a
drafter that always proposes the full K = 8 tokens (the true greedy continuation, then junk past its end), makes
the last verify steps write K + 1 positions ending at max_len: the output must still equal plain greedy
decoding, whose last tokens must equal the training forward's argmax (the cache is right up to its edge).
Mamba and SAMBA run the associative inner scan here (what accelerators run; CPU defaults to the sequential
one, which the other equality tests cover), in the full forward, the verify extend and the commit replay.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decode.drafters import Drafter
from decode.engine import Engine
from models.registry import MODELS

MAX_LEN, K, NEW = 48, 8, 12


class FullDrafts(Drafter):
    """Always K tokens: the reference continuation, then junk past its end."""

    def __init__(self, ref):
        super().__init__()
        self.ref = np.concatenate([np.asarray(ref, np.int32), np.full(2 * K, 7, np.int32)])

    def reset(self, prompt):
        self.pos = 0

    def accept(self, tokens):
        self.pos += len(tokens)

    def draft(self, k):
        return self.ref[self.pos:self.pos + k]


def _model(arch, dtype="float32"):
    cls = MODELS[arch]
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    small = dict(d_model=32, n_layers=2, n_heads=2, attn_block=16, window=8, enc_layers=1, dec_layers=1,
                 d_concept=32, bb_layers=1, bb_heads=2, cross_heads=2, d_scan=16, tie_embeddings=False,
                 scan_chunk=8, scan_inner="assoc", dtype=dtype)
    return cls(cls.config_class(**{k: v for k, v in small.items() if k in names}), rngs=nnx.Rngs(2))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_speculative_fills_the_cache_to_max_len_and_equals_plain(arch):
    model = _model(arch)
    eng = Engine(model, max_len=MAX_LEN, verify_sizes=(K,))
    room = MAX_LEN - eng.slack
    assert eng.slack == K + 1
    prompt = np.random.default_rng(0).integers(32, 127, room - NEW).astype(np.int32)
    plain = eng.generate([prompt], max_new_tokens=NEW, stop_ids=()).tokens[0]
    assert len(plain) == NEW
    with pytest.raises(ValueError, match="exceed max_len"):  # one more token does not fit
        eng.generate([prompt], max_new_tokens=NEW + 1, stop_ids=())
    res = eng.generate_speculative([prompt], [FullDrafts(plain)], max_new_tokens=NEW, stop_ids=())
    assert res.tokens[0].tolist() == plain.tolist()
    assert res.steps[0] <= 2  # 11 tokens after prefill at up to K + 1 per step
    # plain decoding right up to the room's edge equals the training forward's argmax
    seq = np.concatenate([prompt, plain])[None]
    logits = jax.jit(lambda t: model(t)[0])(jnp.asarray(seq))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1)), plain)


def test_speculative_equals_plain_under_bf16_compute():
    """Holds here for the decoder: verify (K + 1 tokens per forward) and plain decoding (one) run the same
    bf16 ops per position, and this model's greedy margins exceed the accumulation-order differences. It is
    not guaranteed in general: a near-tie in the argmax can flip between the two shapes (docs/ARCHITECTURE.md,
    "Faults and checkpoint integrity")."""
    model = _model("decoder", "bfloat16")
    eng = Engine(model, max_len=MAX_LEN, verify_sizes=(K,))
    prompt = np.random.default_rng(1).integers(32, 127, 20).astype(np.int32)
    plain = eng.generate([prompt], max_new_tokens=NEW, stop_ids=()).tokens[0]
    res = eng.generate_speculative([prompt], [FullDrafts(plain)], max_new_tokens=NEW, stop_ids=())
    assert res.tokens[0].tolist() == plain.tolist()
