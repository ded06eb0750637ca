"""Decoupled muP coordinate check: the activation scales of a DLCM after a few AdamW steps at one learning
rate stay flat across three widths under muP (train/loop.py's make_optimizer with the model's groups), while
the standard parametrisation (one AdamW, no output scale) lets the logits grow with width."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.config import TrainConfig
from models.contract import full_positions
from models.dlcm import DLCMConfig, DLCMLM
from train.loop import loss_terms, make_optimizer, optimizer_groups

WIDTHS = (32, 64, 128)
B, L, STEPS = 4, 32, 4


def coord_sizes(width: int, mup: bool, lr: float = 1e-2):
    """RMS per coordinate of the CHANGE (after STEPS AdamW steps on a fixed batch, minus at init) of the
    encoder output, the concept backbone output and the logits (d_concept = 2 d, head width 16, base 32)."""
    cfg = DLCMConfig(d_model=width, n_heads=width // 16, enc_layers=1, dec_layers=1, d_concept=2 * width,
                     bb_layers=1, bb_heads=width // 16, cross_heads=width // 16, cross_mlp=False, attn_block=16,
                     mup=mup, mup_base_width=32, concept_slack=4)
    model = DLCMLM(cfg, rngs=nnx.Rngs(0))
    gdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tcfg = TrainConfig(steps=100, lr=lr, warmup_steps=1, weight_decay=0.0, grad_clip=1e9)
    tx = make_optimizer(tcfg, model.decay_mask(params), optimizer_groups(model, params))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, L + 1)) * 3 % 256, jnp.int32)

    def acts(params):
        m = nnx.merge(gdef, params)
        h = m._stack(m.enc_blocks, m._embed(x[:, :-1]), full_positions(B, L))
        logits, _ = m(x[:, :-1])
        c = m._concepts_in(jnp.sum(m.enc_norm(h), 1, dtype=jnp.float32)[:, None], jnp.full((B, 1), L))
        return h, m._stack(m.bb_blocks, c, full_positions(B, 1)), logits

    def loss(p, key):
        logits, aux = nnx.merge(gdef, p)(x[:, :-1], rng=key)
        s, n = loss_terms(logits, x[:, 1:], jnp.ones((B, L)))
        return s / n + aux["loss_parser"]

    @jax.jit
    def run(params):
        def step(carry, i):
            params, opt = carry
            upd, opt = tx.update(jax.grad(loss)(params, jax.random.key(i)), opt, params)
            return (jax.tree.map(lambda a, u: a + u, params, upd), opt), None

        (trained, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(STEPS))
        rms = lambda a: jnp.sqrt(jnp.mean(jnp.square(a)))  # noqa: E731
        return jnp.stack([rms(a - b) for a, b in zip(acts(trained), acts(params))])

    return np.asarray(run(params))


def test_mup_coordinates_stay_flat_across_widths():
    """Under muP the change of every activation after a few steps is about the same at d = 32, 64, 128.
    Mutation check (report_i11): with mup = False (one AdamW, no output scale) the backbone's change grows
    about 4x from d = 32 to 128 and this test fails."""
    got = np.stack([coord_sizes(w, True) for w in WIDTHS])
    spread = got.max(0) / got.min(0)  # per quantity, largest over smallest across the widths
    assert (spread < 1.6).all(), got
