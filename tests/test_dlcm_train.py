"""DLCM through the trainer: decoupled muP optimizer groups (per-component AdamW lr and eps through
optax.multi_transform), the parser term in the loss, the logged boundary statistics, and a bit-identical
resume (the boundary draws are keyed by the step)."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from core.checkpoint import load_model
from core.config import from_dict
from core.errors import UserError
from core.tokenizer import get_tokenizer
from models.dlcm import DLCMConfig, DLCMLM
from train.loop import make_optimizer, optimizer_groups, train
from tests.test_train import _corpus

DLCM = {"arch": "dlcm", "d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "d_concept": 64,
        "bb_layers": 1, "bb_heads": 2, "cross_heads": 2, "cross_mlp": False, "attn_block": 16,
        "mup_base_width": 16}


def test_mup_groups_scale_lr_and_eps_per_component():
    """The hook labels every matrix token / concept / other; AdamW's first step (|update| = lr_group for a
    gradient far above eps) is train.lr / s_token for token matrices and train.lr / s_concept for concept
    matrices; vectors and embeddings keep train.lr. Without muP there are no groups."""
    cfg = DLCMConfig(**{k: v for k, v in DLCM.items() if k != "arch"})
    model = nnx.eval_shape(lambda: DLCMLM(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    labels, mults = optimizer_groups(model, params)
    assert labels["bb_blocks"][0]["mixer"]["qkv_proj"]["kernel"] == "concept"
    assert labels["w_up"]["kernel"] == labels["cross"]["k"]["kernel"] == labels["cross"]["v"]["kernel"] == "concept"
    assert labels["enc_blocks"][0]["mlp"]["down"]["kernel"] == labels["w_q"]["kernel"] == "token"
    assert labels["cross"]["q"]["kernel"] == labels["cross"]["o"]["kernel"] == "token"
    assert labels["embed"]["embedding"] == labels["null_concept"] == labels["enc_norm"]["scale"] == "other"
    assert mults == {"token": (0.5, 0.5), "concept": (0.25, 0.25), "other": (1.0, 1.0)}  # s = 2 and 4
    tcfg = from_dict({"model": DLCM, "train": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.0,
                                               "grad_clip": 1e9}}, "t").train
    tx = make_optimizer(tcfg, model.decay_mask(params), (labels, mults))
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3, x.dtype), params)
    upd, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    lr0 = float(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 1, 1000)(0))  # the schedule at step 0

    def size(tree):
        return float(jnp.abs(tree).max())

    for lab, lr in (("token", 0.5), ("concept", 0.25), ("other", 1.0)):
        got = [size(u) for u, lb in zip(jax.tree.leaves(upd), jax.tree.leaves(labels)) if lb == lab]
        np.testing.assert_allclose(got, lr * lr0, rtol=1e-4, err_msg=lab)
    nomup = nnx.eval_shape(lambda: DLCMLM(DLCMConfig(**{**cfg.__dict__, "mup": False}), rngs=nnx.Rngs(0)))
    assert optimizer_groups(nomup, params) is None


def test_document_separator_follows_the_tokenizer():
    """model.doc_start_id, when the config leaves it out, is the tokenizer's end-of-document id (byte: 257;
    a trained bpe:N: N - 2, the layout test_tokenizers pins; a Hugging Face tokenizer: its EOS); a given id
    that is not it is one UserError naming the valid ones; -1 (no forced document starts) is accepted."""
    hf = "hf:" + str(Path(__file__).parent / "fixtures" / "hf" / "llama")

    def sep(tokenizer, **kw):
        raw = {"model": {**DLCM, "vocab_size": 400, **kw}, "data": {"tokenizer": tokenizer}}
        return from_dict(raw, "t").model.doc_start_id

    assert sep("byte") == 257
    assert sep("bpe:300") == 298
    assert sep(hf) == get_tokenizer(hf).eos_id == 1 != get_tokenizer(hf).bos_id
    assert sep(hf, doc_start_id=-1) == -1 and sep("byte", doc_start_id=257) == 257
    with pytest.raises(UserError, match=r"doc_start_id 257 is not the document separator .* valid: 1, -1"):
        sep(hf, doc_start_id=257)


def _raw(tmp_path, **train_kw):
    return {"model": DLCM,
            "data": {"sources": [str(_corpus(tmp_path) / "*.py")], "seq_len": 32, "batch_size": 4,
                     "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 4,
                      "eval_batches": 1, "checkpoint_every": 2, "keep_checkpoints": 2, **train_kw},
            "mesh": {"data": 1}}


def test_dlcm_trains_logs_parser_statistics_and_resumes_bit_identically(tmp_path):
    """One 4-step run (checkpoints at 2 and 4); a copy without the step-4 checkpoint resumes from step 2 and
    must end with the same parameters bit for bit (two train() calls instead of three)."""
    cfg = from_dict(_raw(tmp_path), "t")
    train(cfg, tmp_path / "a", log=lambda *_: None)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    (tmp_path / "b" / "metrics.jsonl").unlink()
    summary = train(cfg, tmp_path / "b", log=lambda *_: None)
    assert summary["start_step"] == 2
    _, ma, sa = load_model(tmp_path / "a")
    _, mb, sb = load_model(tmp_path / "b")
    assert sa == sb == 4
    for x, y in zip(jax.tree.leaves(nnx.state(ma, nnx.Param)), jax.tree.leaves(nnx.state(mb, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rec = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for r in rec:  # F, G, the realised ratio, the aux loss (added to the loss) and the cap's share
        assert {"boundary_rate", "boundary_prob", "tokens_per_concept", "parser_aux", "loss_parser",
                "concept_capped"} <= set(r)
        assert abs(r["tokens_per_concept"] * r["boundary_rate"] - 1) < 1e-6
    assert np.isfinite(rec[-1]["val_bpb"])
    resumed = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["boundary_rate"] for r in resumed] == [r["boundary_rate"] for r in rec if r["step"] > 2]
