"""One table from `model.arch` to its module class (and that class's config dataclass).

Adding an architecture is one file (a config dataclass with `arch`, and an `nnx.Module` that satisfies
`models.contract.DecodableLM`, usually a `models.base.StackLM` of `Block`s) plus one line in ARCHITECTURES.
"""

from __future__ import annotations

import importlib

from flax import nnx

ARCHITECTURES = {  # arch -> "module:class"
    "decoder": "models.decoder:DecoderLM",
    "samba": "models.samba:SambaLM",
    "dlcm": "models.dlcm:DLCMLM",
    "mamba": "models.mamba_lm:MambaLM",
}


def _load(arch: str, where: str):
    module, name = where.split(":")
    cls = getattr(importlib.import_module(module), name)
    if cls.config_class.arch != arch:
        raise TypeError(f"{where}: config_class.arch is {cls.config_class.arch!r}, registered as {arch!r}")
    return cls


MODELS = {arch: _load(arch, where) for arch, where in ARCHITECTURES.items()}
MODEL_CONFIGS = {name: cls.config_class for name, cls in MODELS.items()}


def build_model(cfg, *, seed: int = 0) -> nnx.Module:
    return MODELS[cfg.arch](cfg, rngs=nnx.Rngs(seed))
