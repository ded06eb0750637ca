import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from core.config import MeshConfig, from_dict
from core.errors import UserError
from core.mesh import make_mesh, mesh_shape, param_shardings
from models.decoder import DecoderConfig, DecoderLM
from tests.test_train import _raw
from train.loop import train


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


def test_two_processes_on_localhost_match_one_process(tmp_path):
    """Multi-host path: jax.distributed over two local processes x 4 devices, each reading its batch shard."""
    import os
    import socket
    import subprocess
    import sys

    from core.config import dumps

    raw = _raw(tmp_path, steps=4, eval_every=4, checkpoint_every=4, log_every=1)
    (tmp_path / "c.toml").write_text(dumps(from_dict(raw, "mh")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": root}
    procs = [subprocess.Popen([sys.executable, "-m", "train", "c.toml", "--run-dir", "multi",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    train(from_dict(raw, "mh"), tmp_path / "single", log=lambda *_: None)  # 8 devices, one process
    a = [json.loads(x)["loss"] for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(a, b, rtol=2e-5)
