"""Run configuration: TOML files with sections, loaded into frozen dataclasses, plus `section.key=value` overrides.

A user's mistake raises core.errors.UserError with one line that names the bad key or value and what is
valid; the CLIs (core.errors.cli) turn it into exit status 2 without a traceback. Everything that can be
checked without devices or data is checked here, when the config is built, so a CLI fails before it writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.tokenizer import check_tokenizer_spec, document_separator_id, tokenizer_vocab_size
from models.registry import MODEL_CONFIGS


@dataclass(frozen=True)
class DataConfig:
    # Empty means the default corpus: the running Python's standard-library *.py files.
    sources: tuple[str, ...] = ()
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 16
    val_fraction: float = 0.05
    cache_dir: str = ".cache/data"

    def validate(self) -> None:
        check_tokenizer_spec(self.tokenizer)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    objective: str = "causal"  # "causal" or "prefix"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    # Stop after this many steps even if `steps` is larger (the LR schedule still follows `steps`).
    # 0 means run to `steps`; used to stop-and-resume without changing the schedule.
    stop_after: int = 0

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        for key in ("warmup_steps", "stop_after"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0; got {getattr(self, key)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1); got {getattr(self, key)}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0; got {self.grad_clip}")


@dataclass(frozen=True)
class DecodeConfig:
    max_len: int = 2048
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    sam_max_tokens: int = 0  # 0: index the whole training split

    def validate(self) -> None:
        for key in ("max_len", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1; got {getattr(self, key)}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy); got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off); got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.sam_max_tokens < 0:
            raise ValueError(f"sam_max_tokens must be >= 0 (0: the whole training split); got {self.sam_max_tokens}")


@dataclass(frozen=True)
class MeshConfig:
    # One axis may be -1 to absorb the remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Multi-host (python -m train, train/loop.py `distributed_settings`): jax.distributed is initialised when a
    # coordinator "host:port" is given here, by JAX_COORDINATOR_ADDRESS or by --coordinator (command line over
    # environment over config). process_id -1: from JAX_PROCESS_ID or --process-id (or auto-detected on a
    # TPU VM / SLURM); num_processes 0: likewise from JAX_NUM_PROCESSES / --num-processes.
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1

    def validate(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
            raise ValueError(f"mesh sizes must be >= 1, with at most one -1 (the remaining devices); got {sizes}")


@dataclass(frozen=True)
class Config:
    name: str
    model: typing.Any
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "decode": DecodeConfig, "mesh": MeshConfig}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(where: str, tp, value):
    """Check a TOML value against a dataclass field type (with int -> float widening)."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list of {_type_name(inner)}, got {value!r}")
        return tuple(_coerce(where, inner, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, section: str, raw: dict):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"unknown key {section}.{key}; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UserError(f"[{section}]: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise UserError(f"[{section}]: {e}") from None
    return obj


def _parse_override_value(text: str):
    """Values are TOML literals (1, 2.5, true, "s", [1, 2]); a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or "." not in key or not key.split(".", 1)[1]:
            raise UserError(f"bad override {item!r}; expected section.key=value")
        section, name = key.split(".", 1)
        if section not in ("model", *SECTIONS):
            raise UserError(f"unknown section {section!r} in {item!r}; valid: model, {', '.join(SECTIONS)}")
        raw.setdefault(section, {})[name] = _parse_override_value(text)
    return raw


def from_dict(raw: dict, name: str) -> Config:
    raw = dict(raw)
    raw.pop("name", None)
    unknown = set(raw) - {"model", *SECTIONS}
    if unknown:
        raise UserError(f"unknown section [{sorted(unknown)[0]}]; valid: model, {', '.join(SECTIONS)}")
    for section in ("model", *SECTIONS):
        if not isinstance(raw.get(section, {}), dict):
            raise UserError(f"got {section} = {raw[section]!r}; {section} must be a table [{section}] of "
                            f"key = value lines")
    model_raw = dict(raw.get("model", {}))
    arch = model_raw.get("arch")
    if arch not in MODEL_CONFIGS:
        raise UserError(f"model.arch must be one of {', '.join(sorted(MODEL_CONFIGS))}; got {arch!r}")
    sep_given = "doc_start_id" in model_raw
    if not sep_given and "doc_start_id" in {f.name for f in dataclasses.fields(MODEL_CONFIGS[arch])}:
        model_raw["doc_start_id"] = -1  # until the tokenizer's id is set below (the default may not exist)
    model = _build(MODEL_CONFIGS[arch], "model", model_raw)
    sections = {s: _build(cls, s, raw.get(s, {})) for s, cls in SECTIONS.items()}
    cfg = Config(name=name, model=model, **sections)
    if cfg.train.objective not in ("causal", "prefix"):
        raise UserError(f"train.objective must be 'causal' or 'prefix'; got {cfg.train.objective!r}")
    if cfg.data.seq_len < 2 or cfg.data.batch_size < 1:
        raise UserError("data.seq_len must be >= 2 and data.batch_size >= 1")
    if cfg.train.steps < 1:
        raise UserError(f"train.steps must be >= 1; got {cfg.train.steps}")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
        if getattr(cfg.train, key) < 1:
            raise UserError(f"train.{key} must be >= 1; got {getattr(cfg.train, key)}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1); got {cfg.data.val_fraction}")
    window = getattr(cfg.model, "window", None)
    if isinstance(window, int) and window > cfg.decode.max_len:
        raise UserError(f"model.window {window} is larger than the decode cache (decode.max_len "
                        f"{cfg.decode.max_len}); valid: window <= max_len")
    vocab = tokenizer_vocab_size(cfg.data.tokenizer)
    if vocab > cfg.model.vocab_size:
        raise UserError(f"model.vocab_size {cfg.model.vocab_size} < vocabulary {vocab} of tokenizer "
                        f"{cfg.data.tokenizer!r}")
    if hasattr(cfg.model, "doc_start_id"):  # DLCM: document starts are forced concept boundaries
        cfg = _document_starts(cfg, sep_given)
    return cfg


def _document_starts(cfg: Config, given: bool) -> Config:
    """model.doc_start_id follows the tokenizer: its end-of-document id (written after every document, so
    it opens the next one's context) when the config leaves it out; a given id must be that one or < 0
    (no forced document starts)."""
    sep = document_separator_id(cfg.data.tokenizer)
    if not given:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, doc_start_id=sep))
    if 0 <= cfg.model.doc_start_id != sep:
        raise UserError(f"model.doc_start_id {cfg.model.doc_start_id} is not the document separator of tokenizer "
                        f"{cfg.data.tokenizer!r} (its end-of-document id is {sep}); valid: {sep}, -1 (none), or "
                        f"leave it out to follow the tokenizer")
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None
    name = raw.get("name", path.stem)
    if path.name == "config.toml" and "name" in raw:
        name = raw["name"]
    return from_dict(apply_overrides(raw, list(overrides)), str(name))


def to_dict(cfg: Config) -> dict:
    out = {"name": cfg.name}
    for section in ("model", *SECTIONS):
        out[section] = dataclasses.asdict(getattr(cfg, section))
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v)} to TOML")


def dumps(cfg: Config) -> str:
    d = to_dict(cfg)
    lines = [f"name = {_toml_value(d.pop('name'))}"]
    for section, values in d.items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dumps(cfg), encoding="utf-8")
    os.replace(tmp, path)


__all__ = [
    "Config", "DataConfig", "TrainConfig", "DecodeConfig", "MeshConfig",
    "load_config", "from_dict", "apply_overrides", "dumps", "save_config", "to_dict",
]
