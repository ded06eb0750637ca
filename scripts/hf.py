"""Hugging Face checkpoints in and out: a model directory <-> a run directory.

    python scripts/hf.py import HF_DIR RUN_DIR [--dtype float32|bfloat16] [--compute-dtype D] [--max-len N]
    python scripts/hf.py export RUN_DIR HF_DIR [--step S] [--max-shard-mb M]

Import reads `config.json`, the safetensors (one file, or shards listed by `model.safetensors.index.json`) and
`tokenizer.json` of a Hugging Face directory and writes a run directory that every tool here accepts
(`python -m decode`, `decode.eval`, `decode.build_sam`, `python -m train` fine-tuning): `config.toml`, the
tokenizer under `tokenizer/` (data.tokenizer = "hf:RUN_DIR/tokenizer"), and a checkpoint at step 0 that holds
only the `params` and `config` items (the trainer builds a fresh optimizer state when it resumes from it).
Tensors are read one at a time, converted to our layout and handed to jax on the host CPU device, from where
orbax writes them: the conversion is a one-shot file-to-file job. A round trip through the accelerator would
cost a second copy, and placing them on a mesh one compiled transfer per tensor (8 s of the 9 s an import
took on 8 host devices); plain numpy arrays made orbax hold one more copy (peak RSS 3.7 GB instead of 2.5 GB
for a 1.3 GB model). `load_model` then restores the parameters into their shardings from `core.mesh`. Weights keep
their stored dtype (bf16 stays bf16) unless --dtype says otherwise.

Families (`architectures[0]` of config.json -> our model.arch):
    LlamaForCausalLM  -> decoder (GQA, Llama-3 rope_scaling, tied or untied embeddings)
    Qwen2ForCausalLM  -> decoder with q/k/v biases
    MambaForCausalLM  -> mamba (a pure Mamba stack, no MLP)
Export is the inverse: a decoder becomes LlamaForCausalLM (Qwen2ForCausalLM when it has q/k/v biases), the
pure Mamba stack MambaForCausalLM; `transformers`' from_pretrained loads the result. SAMBA and DLCM have no
transformers class.

User mistakes (an unsupported architecture, a missing or truncated shard, a tensor whose shape does not match
config.json, a tokenizer larger than the model's vocabulary, an export transformers cannot load): one line,
exit 2, and nothing written: the output is built under a temporary name next to it and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from core.errors import ArgumentParser, UserError, cli  # noqa: E402

SUPPORTED = {"LlamaForCausalLM": "decoder", "Qwen2ForCausalLM": "decoder", "MambaForCausalLM": "mamba"}
DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
               "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# ---- reading safetensors ---------------------------------------------------------------------------------
class Shards:
    """The tensors of a Hugging Face directory: name -> shard file, read one tensor at a time.

    Metadata (names, shapes, dtypes) and numpy-native tensors come from the `safetensors` package; numpy has
    no bfloat16, so a bf16 tensor is read at the offsets safetensors' header gives, as `ml_dtypes.bfloat16`
    (what jax uses).
    """

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.dir = hf_dir
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            if not files:
                raise UserError(f"no *.safetensors in {hf_dir} (pytorch_model.bin is not read: convert it to "
                                f"safetensors first)")
            weight_map = None
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise UserError(f"missing safetensors shard{'s' * (len(missing) > 1)} in {hf_dir}: "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                            f"(listed by model.safetensors.index.json)")
        self.files, self.where, self.meta = {}, {}, {}
        for f in files:
            path = hf_dir / f
            try:
                handle = safe_open(str(path), framework="numpy")
                names = list(handle.keys())
                for n in names:
                    sl = handle.get_slice(n)
                    self.meta[n] = (tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:  # SafetensorError for a truncated or damaged file
                raise UserError(f"cannot read safetensors shard {path} (truncated or damaged?): "
                                f"{str(e).splitlines()[0][:160]}") from None
            self.files[f] = handle
            for n in names:
                self.where[n] = f
        if weight_map is not None:
            absent = [n for n, f in weight_map.items() if n not in self.where]
            if absent:
                raise UserError(f"safetensors shard {weight_map[absent[0]]} lacks tensor {absent[0]} that "
                                f"model.safetensors.index.json lists (a partial shard?)")
        self._maps = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def dtype(self, name: str) -> str:
        return self.meta[name][1]

    def get(self, name: str, shape: tuple) -> np.ndarray:
        """The tensor `name`, checked against the shape config.json implies."""
        if name not in self.where:
            raise UserError(f"tensor {name} is missing from the safetensors in {self.dir}")
        got, dtype = self.meta[name]
        if tuple(got) != tuple(shape):
            raise UserError(f"tensor {name} has shape {list(got)} but config.json implies {list(shape)}")
        f = self.where[name]
        if dtype != "BF16":
            return self.files[f].get_tensor(name)
        return self._bf16(f, name, shape)

    def _bf16(self, f: str, name: str, shape: tuple) -> np.ndarray:
        """Read with one pread into memory the caller frees (a memory map's touched pages would stay in the
        process until the end: measured 3.8 GB peak RSS for a 1.3 GB model with a map)."""
        import ml_dtypes

        path = self.dir / f
        if f not in self._maps:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            self._maps[f] = (8 + n, header)
        base, header = self._maps[f]
        start, end = header[name]["data_offsets"]
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = os.pread(fd, end - start, base + start)
        finally:
            os.close(fd)
        if len(buf) != end - start:
            raise UserError(f"safetensors shard {path} is truncated (tensor {name})")
        return np.frombuffer(buf, dtype=ml_dtypes.bfloat16).reshape(shape)


# ---- family configs ---------------------------------------------------------------------------------------
def read_hf_config(hf_dir: Path) -> tuple[dict, str]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(f"no such Hugging Face model directory: {hf_dir}")
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"cannot parse {path}: {e}") from None
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "mamba": "MambaForCausalLM"}.get(hf.get("model_type"), repr(hf.get("model_type")))
    if arch not in SUPPORTED:
        raise UserError(f"unsupported architecture {arch} in {path}; supported: {', '.join(SUPPORTED)}")
    return hf, arch


def _need(hf: dict, key: str, where="config.json"):
    if key not in hf or hf[key] is None:
        raise UserError(f"{where} lacks {key}")
    return hf[key]


def _rope(hf: dict) -> dict:
    """Our rope fields from either transformers' `rope_parameters` (v5) or `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    src = params if params.get("rope_type", "default") != "default" else scaling
    kind = src.get("rope_type", src.get("type", "default")) if src else "default"
    out = {"rope_base": float(theta)}
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        raise UserError(f"unsupported rope scaling {kind!r} in config.json; supported: default, llama3")
    return {**out, "rope_scaling": "llama3", "rope_factor": float(src["factor"]),
            "rope_low_freq_factor": float(src["low_freq_factor"]),
            "rope_high_freq_factor": float(src["high_freq_factor"]),
            "rope_original_max_len": int(src["original_max_position_embeddings"])}


def model_fields(hf: dict, arch: str) -> dict:
    """Our [model] section for a Hugging Face config (dtypes are set by the caller)."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"unsupported hidden_act {act!r} in config.json; supported: silu")
    tie = bool(hf.get("tie_word_embeddings", arch == "MambaForCausalLM"))
    if arch == "MambaForCausalLM":
        d = int(_need(hf, "hidden_size"))
        expand = int(hf.get("expand", 2))
        inter = int(hf.get("intermediate_size", expand * d))
        if inter != expand * d:
            raise UserError(f"intermediate_size {inter} != expand * hidden_size ({expand} * {d}); unsupported")
        if hf.get("use_bias", False):
            raise UserError("use_bias = true (in/out projection biases) is unsupported for Mamba")
        rank = hf.get("time_step_rank", "auto")
        rank = math.ceil(d / 16) if rank == "auto" else int(rank)
        return {"arch": "mamba", "vocab_size": int(_need(hf, "vocab_size")), "d_model": d,
                "n_layers": int(_need(hf, "num_hidden_layers")), "d_state": int(hf.get("state_size", 16)),
                "d_conv": int(hf.get("conv_kernel", 4)), "expand": expand, "dt_rank": rank, "mlp": False,
                "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "tie_embeddings": tie}
    if hf.get("mlp_bias"):
        raise UserError("mlp_bias = true is unsupported; supported: bias-free MLPs")
    if arch == "LlamaForCausalLM" and hf.get("attention_bias"):
        raise UserError("attention_bias = true (Llama with q/k/v/o biases) is unsupported; q/k/v biases alone "
                        "are the Qwen2ForCausalLM family")
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        raise UserError("use_sliding_window = true is unsupported for Qwen2; supported: full attention")
    d, heads = int(_need(hf, "hidden_size")), int(_need(hf, "num_attention_heads"))
    return {"arch": "decoder", "vocab_size": int(_need(hf, "vocab_size")), "d_model": d,
            "n_layers": int(_need(hf, "num_hidden_layers")), "n_heads": heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or d // heads), "mlp_hidden": int(_need(hf, "intermediate_size")),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "tie_embeddings": tie,
            "qkv_bias": arch == "Qwen2ForCausalLM", **_rope(hf)}


# ---- the parameter maps (our pure-dict path -> tensors), one function per family -----------------------------
def _t(a):
    return np.ascontiguousarray(np.asarray(a).T)


def decoder_map(m, prefix="model."):
    """[(our path, [(hf name, hf shape)], to_ours(list of hf arrays) -> array, to_hf(array) -> list of arrays)]."""
    d, v, G, hd, R, f = m.d_model, m.vocab_size, m.kv_heads, m.hd, m.n_heads // m.kv_heads, m.hidden
    H = m.n_heads
    out = [(("embed", "embedding"), [(f"{prefix}embed_tokens.weight", (v, d))], lambda a: a[0], lambda x: [x]),
           (("final_norm", "scale"), [(f"{prefix}norm.weight", (d,))], lambda a: a[0], lambda x: [x])]
    if not m.tie_embeddings:
        out.append((("head", "kernel"), [("lm_head.weight", (v, d))], lambda a: _t(a[0]), lambda x: [_t(x)]))
    for i in range(m.n_layers):
        p = f"{prefix}layers.{i}."
        att = f"{p}self_attn."

        def qkv_in(a):
            q = a[0].T.reshape(d, G, R, hd)
            k = a[1].T.reshape(d, G, 1, hd)
            vv = a[2].T.reshape(d, G, 1, hd)
            return np.ascontiguousarray(np.concatenate([q, k, vv], axis=2))

        def qkv_out(x):
            return [_t(x[:, :, :R].reshape(d, H * hd)), _t(x[:, :, R].reshape(d, G * hd)),
                    _t(x[:, :, R + 1].reshape(d, G * hd))]

        out += [
            (("blocks", i, "mixer_norm", "scale"), [(f"{p}input_layernorm.weight", (d,))], lambda a: a[0],
             lambda x: [x]),
            (("blocks", i, "mlp_norm", "scale"), [(f"{p}post_attention_layernorm.weight", (d,))], lambda a: a[0],
             lambda x: [x]),
            (("blocks", i, "mixer", "qkv_proj", "kernel"),
             [(f"{att}q_proj.weight", (H * hd, d)), (f"{att}k_proj.weight", (G * hd, d)),
              (f"{att}v_proj.weight", (G * hd, d))], qkv_in, qkv_out),
            (("blocks", i, "mixer", "o", "kernel"), [(f"{att}o_proj.weight", (d, H * hd))], lambda a: _t(a[0]),
             lambda x: [_t(x)]),
            (("blocks", i, "mlp", "gate_up", "kernel"),
             [(f"{p}mlp.gate_proj.weight", (f, d)), (f"{p}mlp.up_proj.weight", (f, d))],
             lambda a: np.ascontiguousarray(np.stack([a[0].T, a[1].T], axis=1)),
             lambda x: [_t(x[:, 0]), _t(x[:, 1])]),
            (("blocks", i, "mlp", "down", "kernel"), [(f"{p}mlp.down_proj.weight", (d, f))], lambda a: _t(a[0]),
             lambda x: [_t(x)]),
        ]
        if m.qkv_bias:
            out.append((("blocks", i, "mixer", "qkv_bias"),
                        [(f"{att}q_proj.bias", (H * hd,)), (f"{att}k_proj.bias", (G * hd,)),
                         (f"{att}v_proj.bias", (G * hd,))],
                        lambda a: np.concatenate([a[0].reshape(G, R, hd), a[1].reshape(G, 1, hd),
                                                  a[2].reshape(G, 1, hd)], axis=1).reshape(-1),
                        lambda x: [np.ascontiguousarray(x.reshape(G, R + 2, hd)[:, :R].reshape(-1)),
                                   np.ascontiguousarray(x.reshape(G, R + 2, hd)[:, R].reshape(-1)),
                                   np.ascontiguousarray(x.reshape(G, R + 2, hd)[:, R + 1].reshape(-1))]))
    return out


def mamba_map(m, prefix="backbone."):
    d, v, e, n, c = m.d_model, m.vocab_size, m.expand * m.d_model, m.d_state, m.d_conv
    r = m.dt_rank or math.ceil(d / 16)
    same = (lambda a: a[0], lambda x: [x])
    trans = (lambda a: _t(a[0]), lambda x: [_t(x)])
    out = [(("embed", "embedding"), [(f"{prefix}embeddings.weight", (v, d))], *same),
           (("final_norm", "scale"), [(f"{prefix}norm_f.weight", (d,))], *same)]
    if not m.tie_embeddings:
        out.append((("head", "kernel"), [("lm_head.weight", (v, d))], *trans))
    for i in range(m.n_layers):
        p = f"{prefix}layers.{i}."
        mx = f"{p}mixer."
        out += [
            (("blocks", i, "mixer_norm", "scale"), [(f"{p}norm.weight", (d,))], *same),
            (("blocks", i, "mixer", "in_proj", "kernel"), [(f"{mx}in_proj.weight", (2 * e, d))], *trans),
            (("blocks", i, "mixer", "conv_kernel"), [(f"{mx}conv1d.weight", (e, 1, c))],
             lambda a: _t(a[0][:, 0, :]), lambda x: [np.ascontiguousarray(x.T[:, None, :])]),
            (("blocks", i, "mixer", "conv_bias"), [(f"{mx}conv1d.bias", (e,))], *same),
            (("blocks", i, "mixer", "x_proj", "kernel"), [(f"{mx}x_proj.weight", (r + 2 * n, e))], *trans),
            (("blocks", i, "mixer", "dt_proj", "kernel"), [(f"{mx}dt_proj.weight", (e, r))], *trans),
            (("blocks", i, "mixer", "dt_proj", "bias"), [(f"{mx}dt_proj.bias", (e,))], *same),
            (("blocks", i, "mixer", "A_log"), [(f"{mx}A_log", (e, n))], *same),
            (("blocks", i, "mixer", "D"), [(f"{mx}D", (e,))], *same),
            (("blocks", i, "mixer", "out_proj", "kernel"), [(f"{mx}out_proj.weight", (d, e))], *trans),
        ]
    return out


def param_map(mcfg):
    return decoder_map(mcfg) if mcfg.arch == "decoder" else mamba_map(mcfg)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


# ---- import ------------------------------------------------------------------------------------------------
def _tmp_dir_for(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _finish(tmp: Path, out: Path) -> None:
    if out.is_dir():
        out.rmdir()  # empty (checked before)
    os.rename(tmp, out)


def import_hf(hf_dir, run_dir, *, dtype: str | None = None, compute_dtype: str | None = None,
              max_len: int | None = None, log=print) -> dict:
    """Convert a Hugging Face directory into a run directory; returns a summary (time, peak RSS, params)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from core import checkpoint
    from core.config import from_dict, save_config, to_dict
    from core.tokenizer import HFTokenizer
    from models.layers import DTYPES
    from models.registry import build_model

    t0 = time.perf_counter()
    hf_dir, run_dir = Path(hf_dir), Path(run_dir).resolve()
    hf, arch = read_hf_config(hf_dir)
    fields = model_fields(hf, arch)
    shards = Shards(hf_dir)
    stored = DTYPE_NAMES.get(hf.get("torch_dtype") or hf.get("dtype") or "", None)
    if stored is None:  # no dtype in config.json: the first tensor's
        stored = DTYPE_NAMES.get(shards.dtype(next(iter(sorted(shards.where)))), "float32")
    pdt = dtype or stored
    fields.update(param_dtype=pdt, dtype=compute_dtype or pdt)
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json (a fast tokenizer file is needed to encode prompts)")
    tok = HFTokenizer(hf_dir)
    if tok.vocab_size > fields["vocab_size"]:
        raise UserError(f"tokenizer.json has {tok.vocab_size} ids but the model's vocabulary is "
                        f"{fields['vocab_size']}: they do not belong together")
    limit = int(hf.get("max_position_embeddings") or 0) or None
    decode = {"max_len": max_len or min(2048, limit or 2048)}
    tmp = _tmp_dir_for(run_dir)
    try:
        # The tokenizer lives in the run directory (under its final name), with the special ids spelled out.
        (tmp / "tokenizer").mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / "tokenizer" / name)
        (tmp / "tokenizer" / "specials.json").write_text(json.dumps(
            {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}))
        raw = {"model": fields, "data": {"tokenizer": f"hf:{tmp / 'tokenizer'}"}, "decode": decode}
        cfg = from_dict(raw, run_dir.name)  # checked with the tokenizer where it is now, saved with its final path
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=f"hf:{run_dir / 'tokenizer'}"))
        mcfg = cfg.model

        abstract = nnx.eval_shape(lambda: build_model(mcfg, seed=0))
        target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
        params = jax.tree.map(lambda x: None, target)
        want_dt = DTYPES[pdt]
        host = jax.devices("cpu")[0]
        n_params = 0
        for path, names, to_ours, _ in param_map(mcfg):
            arrays = [shards.get(n, s) for n, s in names]  # memory-mapped views: read as they are converted
            value = np.asarray(to_ours(arrays)).astype(want_dt, copy=False)
            del arrays
            ref = _get(target, path)
            if value.shape != ref.shape:  # a bug of ours, not the user's
                raise AssertionError(f"{path}: converted {value.shape}, model expects {ref.shape}")
            _set(params, path, jax.device_put(value, host))  # orbax writes it from there (module docstring)
            n_params += value.size
            del value
        unset = [p for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
                 if x is None]
        if unset:
            raise AssertionError(f"parameters the map does not fill: {unset[:3]}")
        mngr = checkpoint.manager(tmp, keep=1)
        try:
            mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 config=ocp.args.JsonSave(to_dict(cfg))), force=True)
            mngr.wait_until_finished()
        finally:
            mngr.close()
        del params
        save_config(cfg, tmp / "config.toml")
        (tmp / "imported_from.json").write_text(json.dumps(
            {"hf_dir": str(Path(hf_dir).resolve()), "architecture": arch, "stored_dtype": stored}, indent=1))
        _finish(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    import resource

    summary = {"architecture": arch, "arch": mcfg.arch, "params": int(n_params), "param_dtype": pdt,
               "seconds": round(time.perf_counter() - t0, 2),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "run_dir": str(run_dir), "tokenizer_vocab": tok.vocab_size}
    log(f"imported {arch} ({n_params / 1e6:.2f}M params, {pdt}) -> {run_dir} in {summary['seconds']}s, "
        f"peak RSS {summary['peak_rss_mb']} MB")
    return summary


# ---- export ------------------------------------------------------------------------------------------------
def hf_config_for(cfg) -> dict:
    """config.json for our model config (the legacy rope_theta / rope_scaling keys: transformers 4 and 5
    both read them)."""
    m = cfg.model
    common = {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
              "tie_word_embeddings": bool(m.tie_embeddings), "torch_dtype": m.param_dtype,
              "hidden_act": "silu"}
    if m.arch == "mamba":
        if m.mlp:
            raise UserError("this Mamba stack has an MLP after each mixer (model.mlp = true): transformers' "
                            "MambaForCausalLM has none, so it cannot be exported")
        return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **common,
                "state_size": m.d_state, "expand": m.expand, "intermediate_size": m.expand * m.d_model,
                "conv_kernel": m.d_conv, "time_step_rank": m.dt_rank or math.ceil(m.d_model / 16),
                "layer_norm_epsilon": m.norm_eps, "use_bias": False, "use_conv_bias": True,
                "residual_in_fp32": True, "rescale_prenorm_residual": False}
    if m.arch != "decoder":
        raise UserError(f"model.arch {m.arch!r} has no transformers class (SAMBA hybrids and DLCM cannot be "
                        f"exported); exportable: decoder (as Llama or Qwen2), mamba (pure Mamba stack, no MLP)")
    qwen = bool(m.qkv_bias)
    out = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
           "model_type": "qwen2" if qwen else "llama", **common,
           "intermediate_size": m.hidden, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
           "head_dim": m.hd, "rms_norm_eps": m.norm_eps, "max_position_embeddings": cfg.decode.max_len,
           "rope_theta": m.rope_base, "attention_dropout": 0.0}
    if qwen:
        if m.hd != m.d_model // m.n_heads:
            raise UserError(f"Qwen2 needs head_dim = hidden_size / heads; this model has {m.hd}")
        out.update(use_sliding_window=False, max_window_layers=m.n_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    if m.rope_scaling:
        out["rope_scaling"] = {"rope_type": m.rope_scaling, "factor": m.rope_factor,
                               "low_freq_factor": m.rope_low_freq_factor,
                               "high_freq_factor": m.rope_high_freq_factor,
                               "original_max_position_embeddings": m.rope_original_max_len}
    return out


def _export_tokenizer(cfg, tmp: Path, hf_cfg: dict, log) -> None:
    from core.tokenizer import HFTokenizer, get_tokenizer

    tok = get_tokenizer(cfg.data)
    if not isinstance(tok, HFTokenizer):
        log(f"note: tokenizer {cfg.data.tokenizer!r} has no tokenizer.json; the export holds the model only")
        hf_cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        return
    src = tok.file.parent
    shutil.copy2(tok.file, tmp / "tokenizer.json")
    if (src / "tokenizer_config.json").is_file() and src != tmp:
        shutil.copy2(src / "tokenizer_config.json", tmp / "tokenizer_config.json")
    else:
        vocab = tok.tk.get_vocab(with_added_tokens=True)
        inv = {i: t for t, i in vocab.items()}
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": inv.get(tok.bos_id),
             "eos_token": inv.get(tok.eos_id), "pad_token": inv.get(tok.pad_id)}, indent=1))
    hf_cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def reference_logits(model, path: Path, *, seed: int = 0, shape=(2, 16)) -> None:
    """Fixed random tokens and our fp32 logits for them, to compare with transformers on the exported directory
    (`python scripts/make_hf_fixtures.py check HF_DIR FILE.npz`)."""
    import jax.numpy as jnp

    tokens = np.random.default_rng(seed).integers(0, model.vocab_size, size=shape).astype(np.int64)
    logits, _ = model(jnp.asarray(tokens, jnp.int32))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, tokens=tokens, logits=np.asarray(logits, np.float32))


def saved_params(run_dir: Path, cfg, step: int | None):
    """(pure-dict params on the host CPU, step) of a run's checkpoint, restored against the shapes its config
    implies, without building (randomly initialising) a model. UserError as load_model's."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from core import checkpoint
    from models.registry import build_model

    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"run directory has no checkpoints: {run_dir}")
    mngr = checkpoint.manager(run_dir, create=False)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise UserError(f"run directory has no checkpoints: {run_dir}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UserError(f"no checkpoint at step {step} in {run_dir}; available: {sorted(steps)}")
        checkpoint.check_layout(mngr, step, run_dir)
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg.model)), nnx.Param))
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), abstract)
        try:
            out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as e:  # orbax raises assorted types for structure/shape mismatches
            raise UserError(f"cannot restore checkpoint {step} from {run_dir} (foreign or damaged): "
                            f"{str(e).splitlines()[0][:200]}") from None
    finally:
        mngr.close()
    return out["params"], step


def export_hf(run_dir, hf_dir, *, step: int | None = None, max_shard_mb: int = 4096, log=print,
              reference: str | None = None) -> dict:
    import jax
    from safetensors.numpy import save_file

    from core.checkpoint import load_model
    from core.config import load_config

    run_dir, hf_dir = Path(run_dir), Path(hf_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"not a run directory (no config.toml): {run_dir}")
    cfg = load_config(run_dir / "config.toml")
    hf_cfg = hf_config_for(cfg)  # refuses SAMBA / DLCM before any load
    params, step = saved_params(run_dir, cfg, step)
    if reference:
        reference_logits(load_model(run_dir, step, dtype="float32")[1], Path(reference))
    tmp = _tmp_dir_for(hf_dir)
    try:
        _export_tokenizer(cfg, tmp, hf_cfg, log)
        tensors = {}
        for path, names, _, to_hf in param_map(cfg.model):
            value = np.asarray(jax.device_get(_get(params, path)))
            for (name, shape), arr in zip(names, to_hf(value)):
                assert arr.shape == tuple(shape), (name, arr.shape, shape)
                tensors[name] = np.ascontiguousarray(arr)
        # shards of at most max_shard_mb, in name order, with an index when there is more than one
        limit = max_shard_mb * 2 ** 20
        groups, cur, size = [], {}, 0
        for name in sorted(tensors):
            nb = tensors[name].nbytes
            if cur and size + nb > limit:
                groups.append(cur)
                cur, size = {}, 0
            cur[name], size = tensors[name], size + nb
        groups.append(cur)
        if len(groups) == 1:
            save_file(groups[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, g in enumerate(groups):
                fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                save_file(g, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in g})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
                indent=1))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=1))
        _finish(tmp, hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {run_dir} (step {step}) as {hf_cfg['architectures'][0]} -> {hf_dir}")
    return {"architecture": hf_cfg["architectures"][0], "step": step, "tensors": len(tensors)}


@cli
def main(argv=None) -> int:
    p = ArgumentParser(prog="python scripts/hf.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=ArgumentParser)
    im = sub.add_parser("import", help="HF_DIR -> RUN_DIR")
    im.add_argument("hf_dir")
    im.add_argument("run_dir")
    im.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="parameter dtype (default: as stored)")
    im.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="model.dtype (default: the parameter dtype)")
    im.add_argument("--max-len", type=int, default=None, help="decode.max_len (default: min(2048, the model's))")
    ex = sub.add_parser("export", help="RUN_DIR -> HF_DIR")
    ex.add_argument("run_dir")
    ex.add_argument("hf_dir")
    ex.add_argument("--step", type=int, default=None)
    ex.add_argument("--max-shard-mb", type=int, default=4096)
    ex.add_argument("--reference-logits", default=None, metavar="FILE.npz",
                    help="also write fixed tokens and our fp32 logits (for make_hf_fixtures.py check)")
    args = p.parse_args(argv)
    if args.cmd == "import":
        print(json.dumps(import_hf(args.hf_dir, args.run_dir, dtype=args.dtype, compute_dtype=args.compute_dtype,
                                   max_len=args.max_len, log=lambda m: print(m, file=sys.stderr))))
    else:
        if args.max_shard_mb < 1:
            raise UserError("--max-shard-mb must be >= 1")
        print(json.dumps(export_hf(args.run_dir, args.hf_dir, step=args.step, max_shard_mb=args.max_shard_mb,
                                   log=lambda m: print(m, file=sys.stderr), reference=args.reference_logits)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
