"""One table from `model.arch` to its config dataclass and module class."""

from __future__ import annotations

from flax import nnx

from models.decoder import DecoderConfig, DecoderLM

MODELS = {"decoder": DecoderLM}
try:  # architectures land one at a time; a missing one is simply not registered
    from models.samba import SambaConfig, SambaLM
    MODELS["samba"] = SambaLM
except ImportError:
    pass
try:
    from models.dlcm import DLCMConfig, DLCMLM
    MODELS["dlcm"] = DLCMLM
except ImportError:
    pass

MODEL_CONFIGS = {name: cls.config_class for name, cls in MODELS.items()}


def build_model(cfg, *, seed: int = 0) -> nnx.Module:
    return MODELS[cfg.arch](cfg, rngs=nnx.Rngs(seed))
