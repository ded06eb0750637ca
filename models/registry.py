"""One table from `model.arch` to its config dataclass and module class."""

from __future__ import annotations

from flax import nnx

from models.decoder import DecoderLM
from models.dlcm import DLCMLM
from models.samba import SambaLM

MODELS = {"decoder": DecoderLM, "samba": SambaLM, "dlcm": DLCMLM}
MODEL_CONFIGS = {name: cls.config_class for name, cls in MODELS.items()}


def build_model(cfg, *, seed: int = 0) -> nnx.Module:
    return MODELS[cfg.arch](cfg, rngs=nnx.Rngs(seed))
