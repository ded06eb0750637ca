"""The contract's cached-vs-full and speculative checks (tests/test_contract.py) on DLCM with replicated
cross-attention weighting (the log-count bias, whose per-slot counts live in the concept cache and roll back
with J). The uniform weighting runs the whole contract suite there; here only two checks that exercise the
counts (kept to two for the test-time budget): mixed-size extends against the full forward, and speculative
greedy against plain greedy (verify extends of 5 committed at every accepted count, so the counts roll back). The slot cap binds for this random model (a boundary every 2-3 tokens)."""

import jax
import pytest
from flax import nnx

from models.dlcm import DLCMConfig, DLCMLM
from tests.test_contract import TINY
from tests.test_contract import test_forward_equals_prefill_then_decode  # noqa: F401
from tests.test_contract import test_speculative_greedy_equals_plain_greedy  # noqa: F401


@pytest.fixture(scope="module")
def arch():
    cfg = DLCMConfig(**TINY["dlcm"], cross_weighting="replicated")
    model = nnx.jit(lambda: DLCMLM(cfg, rngs=nnx.Rngs(0)))()
    gdef, state = nnx.split(model)

    @jax.jit
    def forward(tokens, prefix=None):
        return nnx.merge(gdef, state)(tokens, prefix)[0]

    @jax.jit
    def step(cache, tokens_BxK, n_B, prefix=None):
        m = nnx.merge(gdef, state)
        logits, cache = m.extend(tokens_BxK, cache, prefix)
        return logits, m.commit(cache, n_B)

    return "dlcm", model, forward, step
