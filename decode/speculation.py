"""The host side of speculative decoding: drafters, emitted tokens, and the callback from the jitted loop.

The speculative loop (decode/loops.py) calls the host once per verify step with one int32 array
[emitted tokens (K+1) | count | top-k ids] per row, and gets one int32 array [next inputs (K+1) | draft length
| live] back (docs/ARCHITECTURE.md, "A speculative decoding step"). On CPU the call is a `buffer_callback`
(~3 us in isolation, but +0.07-0.16 ms per step inside the loop, measured by scripts/profile_spec.py); a
separate jitted call per step cost ~0.3 ms of dispatch and sync, as much as a tiny model's whole step. `Host`
is that callback for one engine; `SpeculativeRun` is the state of the one request it serves.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Sequence

import jax
import numpy as np
from jax.experimental import io_callback

try:  # a host callback that writes its result in place: ~3 us a call on CPU (isolated), ~40 us for io_callback
    from jax.experimental.buffer_callback import buffer_callback
except ImportError:  # older or newer JAX without it
    buffer_callback = None

from decode.request import Request


def host_callback(fn, shape: jax.ShapeDtypeStruct, x, device=None):
    """`fn(x as numpy) -> numpy array of shape`, run on the host from inside a jitted function (fn may return the
    same buffer every call: its result is copied before fn runs again). `device`: the
    one device that calls the host when the jitted function is partitioned over a mesh (a side effect must
    not be replicated)."""
    if device is not None:
        return io_callback(lambda a: np.array(fn(a)), shape, x, ordered=False,
                           sharding=jax.sharding.SingleDeviceSharding(device))
    if buffer_callback is not None and jax.default_backend() == "cpu":
        def write(ctx, out, x):  # CPU buffers are host memory: numpy views, no copies
            np.asarray(out)[...] = fn(np.asarray(x))
        # No declared side effect: an executable with a JAX effect loses jit's C++ dispatch path (~2.5 ms more
        # per speculative request). The result is the loop's next carry, so XLA keeps exactly one call per
        # iteration (tests/test_verify_step.py).
        return buffer_callback(write, shape, has_side_effect=False)(x)
    return io_callback(lambda a: np.array(fn(a)), shape, x, ordered=False)  # fn may reuse its output buffer


def step_clock() -> tuple:
    """A stamp for timing loop steps from inside the host callback: (CPU time of this thread, thread id, wall
    time). See `step_elapsed`."""
    return time.thread_time(), threading.get_ident(), time.perf_counter()


def step_elapsed(a: tuple, b: tuple) -> float:
    """Seconds between two `step_clock` stamps: the thread's CPU time when both come from the thread that runs
    the loop (as ~99% of consecutive host calls do; it covered 92% of a step's wall time on decoder_s0), else
    the wall time (the loop moved to another thread in between)."""
    return b[0] - a[0] if a[1] == b[1] else b[2] - a[2]


def observing(drafters: Sequence) -> bool:
    """Whether any drafter wants the verifier's top-k ids (`observes`, declared by every drafter)."""
    return any(d.observes for d in drafters)


class Host:
    """The speculative loop's host callback for one engine; it serves one `SpeculativeRun` at a time."""

    def __init__(self, max_verify: int, device=None, max_stretch: int = 1):
        self.km = int(max_verify) + 1
        self.w = max(self.km, int(max_stretch))  # emitted tokens per row (a verify or a plain stretch)
        self.device = device  # set when the engine runs on a mesh (see host_callback)
        self.run: SpeculativeRun | None = None

    @property
    def busy(self) -> bool:
        return self.run is not None

    def call(self, shape: jax.ShapeDtypeStruct, emitted):
        """Traced side (inside the jitted loop): `step` on the host."""
        return host_callback(self.step, shape, emitted, self.device)

    def step(self, emitted):
        """[out (w) | count | steps | top-k ids (w x k)] per row in, [inputs (K+1) | length | live | room] out.
        steps is 1 for a verify step and the number of tokens for a plain stretch (0 for a row not live).
        Returns the run's own output buffer (written in place every step; the callback copies it out)."""
        t0 = time.perf_counter()
        run = self.run
        out = run.step(np.asarray(emitted), self.w)
        run.host_s += time.perf_counter() - t0
        return out

    @contextlib.contextmanager
    def serving(self, run: "SpeculativeRun"):
        if self.busy:
            raise RuntimeError("this Engine is already running a speculative request")
        self.run = run
        try:
            yield run
        finally:
            self.run = None


class SpeculativeRun:
    """Host side of one speculative request: drafters, emitted tokens and per-row state.

    `step` runs inside the jitted loop's host callback. An exception there (a drafter bug) is kept in
    `error`, ends the loop (no live rows) and is raised by the caller afterwards.

    The per-step path is plain Python over small lists (numpy's per-call overhead on 1-5 tokens was most of
    the host's time per step, e.g. np.isin's ~40 us, and inside the callback the code runs cold after every
    device step, so its cost follows the number of bytecodes and numpy calls): per-row state is kept in lists,
    `room` incrementally, and the result is written into one preallocated buffer `out` = [inputs (K+1) |
    draft length | live | room] per row.
    """

    def __init__(self, req: Request, drafters, *, max_verify: int, pad_id: int, vocab_size: int, observe_k: int,
                 first, n0, done0, prompt_topk, on_tokens=None, observed_cost=None, sizes=(), stretch: int = 1):
        self.req, self.drafters, self.observe_k = req, drafters, observe_k
        # an ObservedCost (decode.drafters) fed with the CPU time of each verify step at its size, and with a
        # token's cost at the longest plain stretch of this request (`stretch` steps per host call) for size 0
        self.observed_cost, self.sizes = observed_cost, tuple(sizes)
        self.stretch = max(int(stretch), 1)
        self._t = None
        self.on_tokens = on_tokens  # on_tokens(row, new ids) as rows emit (streaming); its errors end the run
        # Only drafters that declare `observes` get the top-k ids (observe_k is 0 when none does).
        self.observes = [bool(observe_k) and d.observes for d in drafters]
        self._any_observes = any(self.observes)
        self.kmax, self.pad_id, self.vocab_size = int(max_verify), int(pad_id), int(vocab_size)
        b = len(req.prompts)
        self.stops = set(int(s) for s in req.stop_S if s >= 0)
        self.emitted = [[int(first[i])] if n0[i] else [] for i in range(b)]
        live = ~np.asarray(done0, bool)
        live[req.n_real:] = False
        self.live = live.tolist()  # [B] bool
        self.pending = [int(t) for t in np.asarray(first).tolist()]
        self.max_new = [int(m) for m in np.asarray(req.max_new_B).tolist()]
        self._room = [m - len(e) for m, e in zip(self.max_new, self.emitted)]  # tokens each row may still emit
        self.steps = [0] * b
        self.calls = 0
        self.host_s = 0.0  # wall time inside the host callback (drafting included)
        self.error: BaseException | None = None
        km = self.kmax + 1
        self.out = np.full((b, km + 3), self.pad_id, np.int32)  # [inputs | draft length | live | room]
        self.inputs = self.out[:, :km]  # views of `out`
        self.draft_len = [0] * b
        # the verify size that holds a draft of n tokens, n = 0..kmax (the loop's choice, for ObservedCost)
        self._size_for = [next((k for k in self.sizes if k >= n), self.sizes[-1]) if self.sizes else 0
                          for n in range(km)]
        td = time.perf_counter()
        for i in range(req.n_real):
            d, p = drafters[i], req.prompts[i]
            d.reset(p)
            if self.observes[i]:
                d.observe(p, prompt_topk[i, :len(p)])
            d.accept(np.asarray(self.emitted[i], np.int32))
        self.draft_s = time.perf_counter() - td
        if on_tokens is not None:
            for i in range(req.n_real):
                on_tokens(i, np.asarray(self.emitted[i], np.int32))

    def drafts(self):
        """(inputs [B, kmax+1] = pending then draft, draft lengths [B], live [B]) for the next verify step
        (copies: the first step's inputs; later steps go through `step`)."""
        td = time.perf_counter()
        self._draft()
        self.draft_s += time.perf_counter() - td
        km = self.kmax + 1
        return self.out[:, :km].copy(), self.out[:, km].copy(), self.out[:, km + 1] > 0

    def room(self) -> np.ndarray:
        """[B] tokens each row may still emit (its budget less what it emitted)."""
        return np.asarray(self._room, np.int32)

    def step(self, emitted, w: int):
        """One host call: `emitted` [B, w + 2 + w * k] = [tokens (w) | count | steps | top-k ids] per row (see
        Host.step). Returns `out`, written in place."""
        if self.error is None:
            try:
                t = step_clock()  # first: the step being timed ends here
                rows = emitted[:, :w + 2].tolist()  # [tokens (w) | count | steps] per row: one numpy call
                self._observe_cost(t, rows, w)
                td = time.perf_counter()
                self._emit(emitted, rows, w)
                self._draft()
                self.draft_s += time.perf_counter() - td
                return self.out
            except BaseException as e:  # noqa: BLE001 - re-raised by generate_speculative after the loop
                self.error = e
        # the loop is ending (no live row); state stays as it was at the error
        km = self.kmax + 1
        self.out[:, km + 1] = 0
        self.out[:, km + 2] = self._room
        return self.out

    def _observe_cost(self, t, rows, w: int):
        """The CPU time since the last host call is the cost of the iteration that just ran: a verify at the
        smallest size holding the longest draft, or, for size 0 (no draft), a stretch of the longest length
        (`stretch`) per token; shorter stretches (the ramp after a draft) are not timed. The CPU time of the
        thread that runs the loop and calls the host (92% of the wall time of a step on decoder_s0): the
        process's CPU clock (`time.process_time`) must gather every thread's and took 7 us at the median but
        0.35 ms on average inside the callback (decoder_s0, 2-core VM), more than a plain step. `t`: the
        `step_clock()` stamp of this call."""
        if self._t is not None and self.observed_cost is not None and self.sizes:
            longest = max(self.draft_len)  # rows not live drafted nothing
            if longest:
                self.observed_cost.observe(self._size_for[longest], step_elapsed(self._t, t))
            elif max(r[w + 1] for r in rows) == self.stretch:
                self.observed_cost.observe(0, step_elapsed(self._t, t) / self.stretch)
        self._t = t

    def _emit(self, emitted, rows, w: int):
        self.calls += 1
        stops, live, room = self.stops, self.live, self._room
        topk = emitted[:, w + 2:].reshape(len(emitted), w, -1) if self._any_observes else None
        for i, alive in enumerate(live):
            if not alive:
                continue
            row = rows[i]
            steps = row[w + 1]
            stretch = self.draft_len[i] == 0  # a plain stretch: the inputs were pending, then new[:-1]
            new = row[:min(row[w], room[i])]
            hit = next((j for j, t in enumerate(new) if t in stops), -1) if stops else -1
            if hit >= 0:
                new = new[:hit + 1]
            if self.observes[i]:
                if stretch:
                    self.drafters[i].observe(np.asarray([self.pending[i], *new[:-1]], np.int32), topk[i, :len(new)])
                else:
                    n = self.draft_len[i] + 1
                    self.drafters[i].observe(self.inputs[i, :n], topk[i, :n])
            self.emitted[i].extend(new)
            room[i] -= len(new)
            self.steps[i] += steps if stretch else 1
            self.pending[i] = new[-1]
            if hit >= 0 or room[i] <= 0:
                live[i] = False
            new_arr = np.asarray(new, np.int32)
            self.drafters[i].accept(new_arr)
            if self.on_tokens is not None:
                self.on_tokens(i, new_arr)

    def _draft(self):
        """Every live row's draft into `out`: [pending, draft..., pad...] | draft length | live | room."""
        kmax, pad, vocab, room, live = self.kmax, self.pad_id, self.vocab_size, self._room, self.live
        rows = []
        for i, alive in enumerate(live):
            n, d = 0, ()
            k = min(kmax, room[i] - 1)
            if alive and k > 0:
                d = np.asarray(self.drafters[i].draft(k)).reshape(-1)[:k].tolist()
                n = len(d)
                if n and (min(d) < 0 or max(d) >= vocab):  # a drafter bug, not user input
                    raise ValueError(f"drafter {i} proposed token ids outside [0, {vocab}): {np.asarray(d)}")
            self.draft_len[i] = n
            rows.append([self.pending[i], *d, *[pad] * (kmax - n), n, int(alive), room[i]])
        self.out[...] = rows
