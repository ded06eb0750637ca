"""Flax NNX models. Parameters carry logical axis names; core/mesh.py maps them to a device mesh."""

from flax import nnx

# Logical names ("embed", "heads", ...) are not mesh axes, so never shard at creation; the trainer
# places parameters explicitly through its rules table.
nnx.use_eager_sharding(False)
