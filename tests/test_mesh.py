import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from models.decoder import DecoderConfig, DecoderLM
from flax import nnx
from train.config import ConfigError, MeshConfig, from_dict
from train.loop import train
from train.mesh import make_mesh, mesh_shape, param_shardings
from tests.test_train import _raw


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
    with pytest.raises(ConfigError):
        mesh_shape(MeshConfig(data=-1, fsdp=-1, tensor=1), 8)
    with pytest.raises(ConfigError):
        mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
    with pytest.raises(ConfigError):
        mesh_shape(MeshConfig(data=16, fsdp=1, tensor=1), 8)
    assert make_mesh(MeshConfig(data=2, fsdp=1, tensor=1)).size == 2  # explicit smaller mesh


def test_param_shardings_follow_logical_rules():
    assert len(jax.devices()) == 8
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    m = DecoderLM(DecoderConfig(d_model=64, n_layers=1, n_heads=4, attn_block=16), rngs=nnx.Rngs(0))
    sh = param_shardings(m, mesh)
    assert sh["blocks"][0]["attn"]["q"]["kernel"].spec == P("fsdp", "tensor")
    assert sh["blocks"][0]["mlp"]["down"]["kernel"].spec == P("tensor", "fsdp")
    assert sh["embed"]["embedding"].spec == P(None, "fsdp")  # vocab 259 is replicated


def test_sharded_training_matches_single_device(tmp_path):
    """Data, FSDP and tensor parallelism on 8 host devices give the single-device losses."""
    runs = {}
    for name, mesh in {"single": {"data": 1, "fsdp": 1, "tensor": 1},
                       "dp_fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2}}.items():
        raw = _raw(tmp_path, steps=6, eval_every=6, checkpoint_every=6, log_every=1)
        raw["mesh"] = mesh
        cfg = from_dict(raw, name)
        runs[name] = train(cfg, tmp_path / name, log=lambda *_: None)
        runs[name]["lines"] = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    a = [json.loads(x)["loss"] for x in runs["single"]["lines"]]
    b = [json.loads(x)["loss"] for x in runs["dp_fsdp_tp"]["lines"]]
    np.testing.assert_allclose(a, b, rtol=2e-5)
    assert abs(runs["single"]["val_bpb"] - runs["dp_fsdp_tp"]["val_bpb"]) < 1e-4
