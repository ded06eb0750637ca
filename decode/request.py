"""Requests and results: checking what a user asks the engine for, and what the engine hands back.

`Limits` holds what one Engine can serve (vocabulary, cache length, verify slack, BOS/pad/stop ids, prompt
buckets). `prepare` turns prompts and per-row sampling knobs into a `Request` of fixed-shape arrays (the
prompts right-padded into a power-of-two bucket, the batch padded to `batch_size` with rows that start done)
or raises `core.errors.UserError` with one line naming the problem. `Result` is what generation returns.
See docs/ARCHITECTURE.md, "A speculative decoding step".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import UserError


@dataclass
class Result:
    """Generated ids per row (a stop id, when hit, is kept as the last token) and timing."""

    tokens: list[np.ndarray]
    prompt_lengths: list[int]
    steps: list[int]  # model steps after prefill that emitted tokens for the row (decode or verify steps)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    verify_calls: int = 0  # jitted verify steps (speculative only); 0 for plain decoding
    draft_s: float = 0.0  # host time spent in the drafters (draft, accept, observe)
    row_s: list = field(default_factory=list)  # seconds charged to each row (its batch's, shared by tokens)
    host_s: float = 0.0  # time inside the speculative loop's host callback (drafting included)

    @classmethod
    def concat(cls, results: Sequence["Result"]) -> "Result":
        """One result for several batches: rows appended, times and counts summed."""
        return cls([t for r in results for t in r.tokens], [n for r in results for n in r.prompt_lengths],
                   [s for r in results for s in r.steps], sum(r.prefill_s for r in results),
                   sum(r.decode_s for r in results), sum(r.verify_calls for r in results),
                   sum(r.draft_s for r in results), [x for r in results for x in r.rows_seconds()],
                   sum(r.host_s for r in results))

    def rows_seconds(self) -> list:
        """Seconds per row: `row_s` when set, else the batch's time shared in proportion to tokens."""
        if self.row_s:
            return list(self.row_s)
        n = max(self.n_tokens, 1)
        return [self.seconds * len(t) / n for t in self.tokens]

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mat(self) -> float:
        """Mean tokens emitted per model step per row (the first token comes from prefill and is excluded)."""
        steps = sum(self.steps)
        after_prefill = sum(max(len(t) - 1, 0) for t in self.tokens)
        return after_prefill / steps if steps else 1.0

    def row_mat(self, i: int) -> float:
        return (len(self.tokens[i]) - 1) / self.steps[i] if self.steps[i] else 1.0

    @property
    def draft_us_per_step(self) -> float:
        return 1e6 * self.draft_s / self.verify_calls if self.verify_calls else 0.0


class Knobs(NamedTuple):
    """Per-row sampling values [B] (traced, so changing them never recompiles; see decode.sampling)."""

    temperature: np.ndarray  # float32, 0 = greedy
    top_k: np.ndarray  # int32, 0 = off
    top_p: np.ndarray  # float32 in (0, 1]


@dataclass(frozen=True)
class Request:
    """One checked request, as the jitted functions take it. Rows >= n_real pad the batch and start done."""

    prompts: list[np.ndarray]  # one per row, padded rows included (int32, BOS for an empty prompt)
    n_real: int
    tokens_BxS: np.ndarray  # prompts right-padded with pad_id to the bucket S
    plen_B: np.ndarray  # prompt lengths
    max_new_B: np.ndarray  # token budgets (0 for padded rows)
    keys_Bx2: np.ndarray  # per-row PRNG keys (row_keys)
    knobs: Knobs
    stop_S: np.ndarray  # stop ids, padded with -1 to Limits.max_stop_ids


@dataclass(frozen=True)
class Limits:
    """What one engine can serve. `slack` = max verify size + 1 cache slots a verify step may write past a
    row's length (out-of-range cache writes would be clamped or dropped silently)."""

    vocab_size: int
    max_len: int
    slack: int
    bos_id: int | None
    pad_id: int
    stop_ids: tuple
    min_bucket: int
    max_stop_ids: int

    def __post_init__(self):
        if self.max_len < self.slack + 2:
            raise UserError(f"max_len {self.max_len} is too small; it needs at least {self.slack + 2} "
                            f"(1 prompt token, 1 new token and {self.slack} verify slack)")


def check_prompt(limits: Limits, prompt, max_new_tokens: int) -> np.ndarray:
    """The prompt as int32 ids (BOS for an empty one); UserError if it or its budget does not fit."""
    p = np.asarray(prompt)
    if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
        raise UserError("expected a 1-D sequence of integer token ids")
    if p.size == 0:
        if limits.bos_id is None:
            raise UserError("empty prompt and the engine has no bos_id to start from")
        p = np.array([limits.bos_id])
    bad = (p < 0) | (p >= limits.vocab_size)
    if bad.any():
        raise UserError(f"token id {int(p[bad][0])} out of range [0, {limits.vocab_size})")
    room = limits.max_len - limits.slack
    if len(p) + 1 > room:
        raise UserError(f"{len(p)} prompt tokens do not fit: max_len {limits.max_len} allows at most "
                        f"{room - 1} (it keeps {limits.slack} slots of verify slack)")
    if len(p) + max_new_tokens > room:
        raise UserError(f"{len(p)} prompt tokens + max_new_tokens {max_new_tokens} exceed max_len "
                        f"{limits.max_len} - {limits.slack} verify slack; use max_new_tokens <= {room - len(p)}")
    return p.astype(np.int32)


def per_row(name: str, value, n: int) -> np.ndarray:
    """A scalar or one value per prompt, as an array of n values."""
    try:
        return np.broadcast_to(np.asarray(value), (n,))
    except ValueError:
        raise UserError(f"{name} must be one value or one per prompt ({n}); got {value!r}") from None


def check_knobs(n: int, temperature, top_k, top_p) -> Knobs:
    t = per_row("temperature", temperature, n)
    k = per_row("top_k", top_k, n)
    p = per_row("top_p", top_p, n)
    if not (np.issubdtype(t.dtype, np.number) and np.issubdtype(p.dtype, np.number)):
        raise UserError(f"temperature and top_p must be numbers; got {temperature!r}, {top_p!r}")
    t, p = t.astype(np.float32), p.astype(np.float32)
    if not np.all(np.isfinite(t)) or (t < 0).any():
        raise UserError(f"temperature must be finite and >= 0; got {temperature!r}")
    if not np.issubdtype(k.dtype, np.integer) or (k < 0).any():
        raise UserError(f"top_k must be an integer >= 0 (0: off); got {top_k!r}")
    if not np.all((p > 0) & (p <= 1)):
        raise UserError(f"top_p must be in (0, 1]; got {top_p!r}")
    return Knobs(t, k.astype(np.int32), p)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=64)
def row_keys(seed, n: int) -> np.ndarray:
    """[n, 2] per-row PRNG keys (numpy): for one int seed, PRNGKey(seed) folded with each row's index; for a
    tuple of seeds, PRNGKey of each. Cached: made eagerly, they cost ~2 ms of op-by-op dispatch per request
    (most of a short request's preparation), and a request's keys depend only on these two arguments."""
    if isinstance(seed, tuple):
        keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(np.asarray(seed), jnp.uint32))
    else:  # one seed: rows differ by their index in the request
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.arange(n, dtype=jnp.uint32))
    keys = np.asarray(keys)
    keys.setflags(write=False)  # shared by every request with these arguments
    return keys


def prepare(limits: Limits, prompts, *, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
            batch_size) -> Request:
    """Check a whole request before anything runs; UserError (one line) for the first problem found."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        raise UserError("prompts must be a list of token-id sequences (got a single 1-D array)")
    prompts = [np.asarray(p) for p in prompts]
    if not prompts:
        raise UserError("no prompts given")
    n_real = len(prompts)
    if batch_size is not None and batch_size < n_real:
        raise UserError(f"{n_real} prompts do not fit batch_size {batch_size}")
    max_new = per_row("max_new_tokens", max_new_tokens, n_real)
    if not np.issubdtype(max_new.dtype, np.integer) or (max_new < 1).any():
        raise UserError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    out = []
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        try:
            out.append(check_prompt(limits, p, int(m)))
        except UserError as e:
            raise UserError(f"prompt {i}: {e}") from None
    knobs = check_knobs(n_real, temperature, top_k, top_p)
    stops = limits.stop_ids if stop_ids is None else tuple(int(s) for s in stop_ids)
    if len(stops) > limits.max_stop_ids:
        raise UserError(f"at most {limits.max_stop_ids} stop ids; got {len(stops)}")
    if any(not 0 <= s < limits.vocab_size for s in stops):
        raise UserError(f"stop ids must be in [0, {limits.vocab_size}); got {list(stops)}")
    stop_S = np.full((limits.max_stop_ids,), -1, np.int32)
    stop_S[:len(stops)] = stops
    seeds = np.asarray(seed)
    if not np.issubdtype(seeds.dtype, np.integer) or seeds.ndim > 1 or (seeds.ndim and len(seeds) != n_real):
        raise UserError(f"seed must be an integer or one integer per prompt; got {seed!r}")
    keys = row_keys(int(seed) if np.ndim(seed) == 0 else tuple(int(x) for x in seeds), n_real)

    # Padded rows (to reach batch_size) start done: max_new 0 means they emit nothing.
    b = batch_size or n_real
    pad_rows = b - n_real
    out += [out[-1]] * pad_rows
    max_new = np.concatenate([max_new, np.zeros(pad_rows, max_new.dtype)]).astype(np.int32)
    keys = np.concatenate([keys, np.zeros((pad_rows, 2), keys.dtype)]) if pad_rows else keys
    knobs = Knobs(*(np.concatenate([k, np.repeat(k[-1:], pad_rows)]) for k in knobs))
    plen = np.array([len(p) for p in out], np.int32)
    s = min(max(limits.min_bucket, next_pow2(int(plen.max()))), limits.max_len)
    tokens = np.full((b, s), limits.pad_id, np.int32)
    for i, p in enumerate(out):
        tokens[i, :len(p)] = p
    return Request(out, n_real, tokens, plen, max_new, keys, knobs, stop_S)
