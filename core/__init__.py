"""The run layer that train/ and decode/ share (and that imports neither of them).

    errors.py      UserError, the one user-error type, and `cli`, the wrapper every CLI's main runs through
    config.py      TOML run configs -> frozen dataclasses, `section.key=value` overrides, validation
    tokenizer.py   tokenizers (byte, hf:tokenizer.json, a trained bpe:N) with a byte-count table for bits per byte
    data.py        corpus discovery, the hash-based train/validation split, the token cache, batches
    checkpoint.py  orbax checkpoints (items "params", "train_state", "config") and `load_model`
    mesh.py        the device mesh and the logical-axis -> mesh-axis sharding rules
"""
