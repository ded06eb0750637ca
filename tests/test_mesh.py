import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from core.config import MeshConfig
from core.errors import UserError
from core.mesh import cache_shardings, make_mesh, mesh_shape, param_shardings, parse_mesh_spec
from models.decoder import DecoderConfig, DecoderLM
from train.loop import distributed_settings


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
    with pytest.raises(UserError):
        mesh_shape(MeshConfig(data=-1, fsdp=-1, tensor=1), 8)
    with pytest.raises(UserError):
        mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
    with pytest.raises(UserError):
        mesh_shape(MeshConfig(data=16, fsdp=1, tensor=1), 8)
    assert make_mesh(MeshConfig(data=2, fsdp=1, tensor=1)).size == 2  # explicit smaller mesh


def test_parse_mesh_spec_names_the_config_axes():
    """`python -m decode --mesh`: axis=size pairs of the [mesh] axes; unnamed axes 1, one -1 allowed."""
    assert parse_mesh_spec("data=2,tensor=2") == MeshConfig(data=2, fsdp=1, tensor=2)
    assert parse_mesh_spec(" fsdp = 4 ") == MeshConfig(data=1, fsdp=4, tensor=1)
    assert parse_mesh_spec("data=-1,tensor=2") == MeshConfig(data=-1, fsdp=1, tensor=2)
    for bad, match in (("data=2,tensr=2", "'tensr=2' is not axis=size"), ("data", "'data' is not axis=size"),
                       ("", "is not axis=size"), ("data=2.5", "not an integer"), ("data=1,data=2", "given twice"),
                       ("data=-1,fsdp=-1", "at most one -1"), ("tensor=0", ">= 1")):
        with pytest.raises(UserError, match=match):
            parse_mesh_spec(bad)


def test_param_shardings_follow_logical_rules():
    assert len(jax.devices()) == 8
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    m = DecoderLM(DecoderConfig(d_model=64, n_layers=1, n_heads=4, attn_block=16), rngs=nnx.Rngs(0))
    sh = param_shardings(m, mesh)
    # fused q/k/v [d, G, R + 2, hd]: tensor parallelism splits the KV groups
    assert sh["blocks"][0]["mixer"]["qkv_proj"]["kernel"].spec == P("fsdp", "tensor", None, None)
    assert sh["blocks"][0]["mlp"]["gate_up"]["kernel"].spec == P("fsdp", None, "tensor")
    assert sh["blocks"][0]["mlp"]["down"]["kernel"].spec == P("tensor", "fsdp")
    assert sh["embed"]["embedding"].spec == P(None, "fsdp")  # vocab 259 is replicated


def test_cache_shardings_split_rows_and_heads():
    """Decoding caches: rows over data x fsdp; KV heads (global: axis 1, ring: axis 2) and Mamba channels over
    tensor; a dimension that does not divide evenly is replicated."""
    from models.contract import Cache, KVCache, MambaCache, RingCache

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    z = lambda *s: jax.ShapeDtypeStruct(s, np.float32)  # noqa: E731
    cache = Cache(z(4), (KVCache(z(4, 2, 16, 8), z(4, 2, 16, 8)), RingCache(z(4, 8, 2, 8), z(4, 8, 2, 8)),
                         MambaCache(z(4, 3, 64), z(4, 64, 4))), None)
    sh = cache_shardings(cache, mesh)
    rows = ("data", "fsdp")
    assert sh.lengths.spec == P(rows)
    assert sh.layers[0].k.spec == P(rows, "tensor", None, None)
    assert sh.layers[1].v.spec == P(rows, None, "tensor", None)
    assert sh.layers[2].conv.spec == P(rows, None, "tensor") and sh.layers[2].ssm.spec == P(rows, "tensor", None)
    odd = cache_shardings(Cache(z(3), (KVCache(z(3, 1, 16, 8), z(3, 1, 16, 8)),), None), mesh)
    assert odd.layers[0].k.spec == P(None, None, None, None)  # 3 rows, 1 KV head: replicated


def test_distributed_settings_from_flags_environment_or_config():
    mc = MeshConfig(coordinator="h:1", num_processes=4, process_id=2)
    assert distributed_settings(MeshConfig(), environ={}) is None
    assert distributed_settings(mc, environ={}) == ("h:1", 4, 2)
    env = {"JAX_COORDINATOR_ADDRESS": "e:2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed_settings(mc, environ=env) == ("e:2", 2, 1)  # environment over config
    assert distributed_settings(mc, coordinator="c:3", process_id=0, environ=env) == ("c:3", 2, 0)  # flags first
    assert distributed_settings(MeshConfig(), auto=True, environ={}) == (None, None, None)  # TPU / SLURM detect
    for bad in ({"JAX_PROCESS_ID": "x", "JAX_COORDINATOR_ADDRESS": "e:2"}, {"JAX_PROCESS_ID": "1"},
                {"JAX_COORDINATOR_ADDRESS": "e:2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}):
        with pytest.raises(UserError):
            distributed_settings(MeshConfig(), environ=bad)


# Sharded training, decoding and restore for every architecture, and two processes on localhost:
# tests/test_sharding.py.
