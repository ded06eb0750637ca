"""Model-free drafters for speculative decoding, one instance per batch row.

Protocol (the engine calls, per row):
- `reset(prompt_tokens)` at the start of a request;
- `draft(k)` -> int32 array of 0..k tokens proposed to follow everything accepted so far;
- `accept(tokens)` with the tokens that became final this step (accepted draft tokens AND the bonus
  token), so after it the drafter's state covers all final output; rejected tokens never arrive;
- `observe(inputs, topk)` with the verified positions' input ids [n] and the model's top-k next-token
  ids there [n, k] (best first), called only when the drafter declares `observes` (Token Recycling): the
  engine computes the top-k ids only when some row's drafter observes.

Draft length is the drafter's call. Two rules (`DraftPolicy.rule`):
- "cost" (the default for sam and sam+recycle): every candidate source (the dynamic automaton, the static
  one, the auxiliary drafter) is scored by expected tokens per unit of verify cost, and the best draft
  length of the best source wins, or no draft when a plain step pays more. Verify cost per size comes from
  a `VerifyCost` table (measured once by `Engine.verify_cost()`); the acceptance of a source at a match
  length is estimated online from what the request has accepted so far (`Acceptance`). So a dynamic match
  of 1-3 tokens drafts when its measured acceptance pays for the verify, which the paper's threshold never
  lets it do; the dynamic draft copies the continuation of the MOST RECENT earlier occurrence of the
  match, as prompt lookup does (the automaton gives the match length, which is at least pld's n-gram).
- "paper": SAM-Decoding's selection as published: static lowered by l_bias, the longer of the two must
  reach l_threshold (ties to dynamic), else the auxiliary drafter; length clip(alpha * L, min_len, max_len).
Prompt lookup (pld) keeps its own published rule (the alpha sizing) in both cases. The alpha defaults suit
CPU; accelerators can raise `alpha` and `max_len` (SAM-Decoding used chains of up to 40).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numba
import numpy as np

from decode.sam import LINKED, MAX_ID, MIN_END, Cursor, DynamicMatcher, SuffixAutomaton, _append_and_advance, _int_array

_EMPTY = np.zeros(0, np.int32)


RULES = ("cost", "paper")
SOURCES = ("dynamic", "static", "aux")
_AUX = SOURCES.index("aux")
_LEN_BUCKETS = 8  # match lengths 1..7 each, then 8+


@dataclass(frozen=True)
class VerifyCost:
    """Cost of one verify step per verify size (any unit; seconds when measured). `of(n)` is the cost of
    verifying an n-token draft: the smallest compiled size that holds it."""

    sizes: tuple
    cost: tuple

    def __post_init__(self):
        if len(self.sizes) != len(self.cost) or not self.sizes or list(self.sizes) != sorted(self.sizes):
            raise ValueError(f"VerifyCost needs sorted sizes and one cost each; got {self.sizes}, {self.cost}")
        if self.sizes[0] != 0 or min(self.cost) <= 0:
            raise ValueError(f"VerifyCost needs size 0 (a plain step) and positive costs; got {self.sizes}, "
                             f"{self.cost}")

    @classmethod
    def default(cls, sizes=(0, 1, 2, 4, 8, 16)) -> "VerifyCost":
        """Before any measurement: a 2-core CPU's shape for the tiny models (1 + k/8 plain steps)."""
        sizes = tuple(sorted({0} | set(int(k) for k in sizes)))
        return cls(sizes, tuple(1.0 + k / 8 for k in sizes))

    @property
    def max_size(self) -> int:
        return int(self.sizes[-1])

    def of(self, n: int) -> float:
        for k, c in zip(self.sizes, self.cost):
            if k >= n:
                return float(c)
        return float(self.cost[-1])

    def relative(self) -> dict:
        """{size: cost / cost of a plain step}."""
        return {int(k): float(c) / float(self.cost[0]) for k, c in zip(self.sizes, self.cost)}


class ObservedCost:
    """A measured VerifyCost corrected by the step times the engine observes while it serves requests
    (`observe(size, seconds)`, fed by the speculative loop's host: the CPU time between consecutive host
    calls of a verify step at that size, or of a one-step undrafted iteration for size 0). Each size's cost
    is its base cost scaled by the load factor seen so far (the geometric mean of observed / base over the
    observed sizes, so sizes that are rarely seen follow the machine's current speed), blended with its own
    running mean at `weight` pseudo-observations for the base. Never decreasing in size. Duck-types
    VerifyCost (`sizes`, `cost`, `of`, `max_size`, `relative`)."""

    def __init__(self, base: VerifyCost, weight: float = 16.0, memory: int = 64):
        self.base, self.w, self.memory = base, float(weight), int(memory)
        self.sizes = base.sizes
        # plain Python floats: this runs once per verify step, where numpy's per-call overhead on six numbers
        # cost more than the arithmetic
        self._mean = [0.0] * len(self.sizes)
        self._n = [0] * len(self.sizes)
        self._index = {int(k): i for i, k in enumerate(self.sizes)}
        self._base = [float(b) for b in base.cost]
        self._term = [0.0] * len(self.sizes)  # n * log(mean / base) per size, for the load factor
        self._cost: tuple | None = None
        self._pending: list = []  # (size, seconds) observed, not yet applied

    n = property(lambda self: np.asarray(self._flush()._n), doc="observations per size (capped at `memory`)")
    mean = property(lambda self: np.asarray(self._flush()._mean), doc="running mean of the observed cost per size")

    def observe(self, size: int, seconds: float) -> None:
        # Queued, applied in order before anything reads the table (`_flush`): the speculative loop's host
        # calls this every step, cold, while only sam's cost rule reads it; a batch of updates runs warm.
        self._pending.append((size, seconds))
        if len(self._pending) >= 64:
            self._flush()

    def _flush(self) -> "ObservedCost":
        pending, self._pending = self._pending, []
        for size, seconds in pending:
            i = self._index.get(size)
            if i is None or not seconds > 0:
                continue
            n = self._n[i] = min(self._n[i] + 1, self.memory)  # a running mean that forgets beyond `memory` steps
            m = self._mean[i] = self._mean[i] + (seconds - self._mean[i]) / n
            self._term[i] = n * math.log(m / self._base[i])
            self._cost = None
        return self

    @property
    def cost(self) -> tuple:
        if self._pending:
            self._flush()
        if self._cost is None:
            base, ns, means = self._base, self._n, self._mean
            seen = sum(ns)
            load = math.exp(sum(t for t, n in zip(self._term, ns) if n > 0) / seen) if seen else 1.0
            c = [(self.w * b * load + n * m) / (self.w + n) for b, n, m in zip(base, ns, means)]
            for i in range(len(c) - 2, -1, -1):  # never decreasing in size
                c[i] = min(c[i], c[i + 1])
            self._cost = tuple(c)
        return self._cost

    @property
    def max_size(self) -> int:
        return int(self.sizes[-1])

    def of(self, n: int) -> float:
        cost = self.cost
        for k, c in zip(self.sizes, cost):
            if k >= n:
                return c
        return cost[-1]

    def relative(self) -> dict:
        cost = self.cost
        return {int(k): c / cost[0] for k, c in zip(self.sizes, cost)}


class Acceptance:
    """Per-token acceptance rate of each (source, match length) seen in this request, with a prior.

    A draft of n tokens from a source whose rate is a yields a + a^2 + ... + a^n accepted tokens in
    expectation (each token is accepted only after all before it). `record(source, length, n, accepted)`
    updates the counts: `accepted` successes and one failure unless the whole draft was accepted. The prior
    (`prior_weight` pseudo-observations at `prior(source, length)`) decides until the request has spoken.
    `history`, an Acceptance shared by the drafters of one maker (`make_drafter(history=)`), carries what
    earlier requests learnt: every record goes to it too, and its counts as they were when this request
    began (`reset`), scaled down to at most `history_weight` observations per bucket, stand in front of this
    request's own.
    """

    def __init__(self, prior_weight: float = 2.0, history: "Acceptance | None" = None, history_weight: float = 8.0):
        self.w = float(prior_weight)
        self.history, self.hw = history, float(history_weight)
        # plain Python lists [source][bucket]: `rate` and `record` run once per verify step and row, where
        # numpy's per-element overhead cost more than the arithmetic
        self._hit = [[0.0] * (_LEN_BUCKETS + 1) for _ in SOURCES]
        self._miss = [[0.0] * (_LEN_BUCKETS + 1) for _ in SOURCES]
        # what the history held when this request began (its own records excluded), scaled down to at most
        # history_weight observations per bucket: (scaled hits, scaled count) per [source][bucket], or None
        self._earlier: list | None = None
        self.reset()

    hit = property(lambda self: np.asarray(self._hit), doc="[source, bucket] accepted tokens in this request")
    miss = property(lambda self: np.asarray(self._miss), doc="[source, bucket] rejections in this request")

    @staticmethod
    def bucket(length: int) -> int:
        return int(min(max(length, 0), _LEN_BUCKETS))

    @staticmethod
    def prior(source: int, length: int) -> float:
        # Longer matches are likelier to continue; an auxiliary chain (no match) starts at one half.
        if source == _AUX:
            return 0.5
        return length / (length + 2.0)

    def rate(self, source: int, length: int) -> float:
        b = length if 0 <= length < _LEN_BUCKETS else (0 if length < 0 else _LEN_BUCKETS)
        p = 0.5 if source == _AUX else length / (length + 2.0)  # prior(source, length), inlined (hot)
        hit = self._hit[source][b]
        n = hit + self._miss[source][b]
        if self._earlier is not None:
            e = self._earlier[source][b]
            if e is not None:
                hit, n = hit + e[0], n + e[1]
        return (hit + self.w * p) / (n + self.w)

    def record(self, source: int, length: int, n: int, accepted: int) -> None:
        b = length if 0 <= length < _LEN_BUCKETS else (0 if length < 0 else _LEN_BUCKETS)
        self._hit[source][b] += accepted
        self._miss[source][b] += accepted < n
        if self.history is not None:
            self.history.record(source, length, n, accepted)

    def reset(self) -> None:
        for row in self._hit + self._miss:
            row[:] = [0.0] * len(row)
        if self.history is not None:
            self._earlier = []
            for h_hits, h_misses in zip(self.history._hit, self.history._miss):
                row = []
                for h_hit, h_miss in zip(h_hits, h_misses):
                    h_n = h_hit + h_miss
                    scale = min(1.0, self.hw / h_n) if h_n > 0 else 0.0
                    row.append((scale * h_hit, scale * h_n) if h_n > 0 else None)
                self._earlier.append(row)


def best_length(rate: float, available: int, k: int, cost: VerifyCost) -> tuple[int, float]:
    """(n, value): the draft length n <= min(available, k) that maximises expected tokens emitted per unit
    of verify cost, (1 + a + ... + a^n) / cost.of(n), and that value; n = 0 is a plain step."""
    sizes, costs = cost.sizes, cost.cost  # read once: `of(n)` is the first size >= n
    best_n, best_v = 0, 1.0 / costs[0]
    expected, term, j = 1.0, 1.0, 0
    for n in range(1, min(available, k, sizes[-1]) + 1):
        term *= rate
        expected += term
        while sizes[j] < n:
            j += 1
        v = expected / costs[j]
        if v > best_v * (1 + 1e-9):
            best_n, best_v = n, v
    return best_n, best_v


@dataclass(frozen=True)
class DraftPolicy:
    # Draft length for a match of length L: clip(floor(alpha * L), min_len, max_len), and at most k.
    alpha: float = 0.5
    min_len: int = 1
    max_len: int = 8
    # SAM-Decoding's selection rule: the static match is lowered by l_bias; the longer of the two must
    # reach l_threshold, ties go to the dynamic automaton; otherwise the auxiliary drafter runs.
    l_threshold: int = 5
    l_bias: int = 5
    # Prompt lookup: longest n-gram tried; matches are then extended backwards up to max_match to size
    # the draft.
    max_ngram: int = 3
    max_match: int = 64
    # Token Recycling: successors kept per token and the length of its greedy chain.
    recycle_k: int = 8
    aux_len: int = 3
    # sam's selection rule: "cost" (expected tokens per verify cost) or "paper" (l_threshold / l_bias).
    rule: str = "cost"

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown draft rule {self.rule!r}; valid: {', '.join(RULES)}")
        if self.alpha <= 0 or self.min_len < 1 or self.max_len < self.min_len:
            raise ValueError(f"draft policy needs alpha > 0 and 1 <= min_len <= max_len; got alpha={self.alpha}, "
                             f"min_len={self.min_len}, max_len={self.max_len}")
        if self.max_ngram < 1 or self.recycle_k < 1 or self.aux_len < 0 or self.l_threshold < 1:
            raise ValueError("draft policy needs max_ngram >= 1, recycle_k >= 1, aux_len >= 0, l_threshold >= 1")

    def size(self, match_len: int, k: int) -> int:
        if match_len <= 0 or k <= 0:
            return 0
        return int(min(k, self.max_len, max(self.min_len, int(self.alpha * match_len))))


class Drafter:
    """Proposes nothing; the base of the others. `Drafter(observes=True)` also asks for (and ignores) the
    verifier's top-k ids: Engine.warmup compiles the observing variant of the loop with it."""

    name = "none"

    def __init__(self, policy: DraftPolicy | None = None, *, observes: bool = False):
        self.policy = policy or DraftPolicy()
        self._observes = bool(observes)
        self.last_match_len = 0
        self.last_source = "none"

    @property
    def observes(self) -> bool:
        """Whether `observe` wants the verifier's top-k ids (the engine computes them only if some row does)."""
        return self._observes

    def reset(self, prompt_tokens: np.ndarray) -> None:
        self.last_match_len = 0
        self.last_source = "none"

    def draft(self, k: int) -> np.ndarray:
        self.last_match_len = 0
        self.last_source = "none"
        return _EMPTY

    def accept(self, tokens: np.ndarray) -> None:
        pass

    def observe(self, inputs: np.ndarray, topk: np.ndarray) -> None:
        pass


class _Context:
    """Prompt + accepted tokens in a growing int32 buffer."""

    def __init__(self, capacity: int = 4096):
        self.buf = np.zeros(capacity, np.int32)
        self.n = 0

    def reset(self, tokens) -> None:
        self.n = 0
        self.append(tokens)

    def append(self, tokens) -> None:
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        m = tokens.shape[0]
        if self.n + m > self.buf.shape[0]:
            buf = np.zeros(max(2 * self.buf.shape[0], self.n + m), np.int32)
            buf[: self.n] = self.buf[: self.n]
            self.buf = buf
        self.buf[self.n: self.n + m] = tokens
        self.n += m

    @property
    def tokens(self) -> np.ndarray:
        return self.buf[: self.n]

    @property
    def last(self) -> int:
        return int(self.buf[self.n - 1]) if self.n else -1


@numba.njit(cache=True)
def _recent_occurrence(ctx, n, g):
    """Start of what followed the most recent earlier occurrence of ctx[n-g:n] (-1 if none): the
    position right after an occurrence ending before n."""
    for i in range(n - g - 1, -1, -1):  # i + g <= n - 1: at least one token follows
        ok = True
        for j in range(g):
            if ctx[i + j] != ctx[n - g + j]:
                ok = False
                break
        if ok:
            return i + g
    return -1


@numba.njit(cache=True)
def _prompt_lookup(ctx, n, max_ngram, max_match):
    """(match length, start of the continuation) for the most recent earlier occurrence of the last
    g tokens, g = max_ngram..1; the match is then extended backwards (up to max_match) to size the draft."""
    for g in range(min(max_ngram, n - 1), 0, -1):
        start = _recent_occurrence(ctx, n, g)
        if start >= 0:
            length = g
            while length < max_match and start - length - 1 >= 0 and ctx[start - length - 1] == ctx[n - length - 1]:
                length += 1
            return length, start
    return 0, 0


class PromptLookupDrafter(Drafter):
    """PLD: copy what followed the most recent earlier occurrence of the last max_ngram..1 tokens."""

    name = "pld"

    def __init__(self, policy: DraftPolicy | None = None):
        super().__init__(policy)
        self.ctx = _Context()

    def reset(self, prompt_tokens: np.ndarray) -> None:
        super().reset(prompt_tokens)
        self.ctx.reset(prompt_tokens)

    def accept(self, tokens: np.ndarray) -> None:
        self.ctx.append(tokens)

    def draft(self, k: int) -> np.ndarray:
        p = self.policy
        length, start = _prompt_lookup(self.ctx.buf, self.ctx.n, p.max_ngram, p.max_match)
        self.last_match_len = int(length)
        n = p.size(length, k)
        self.last_source = "context" if n else "none"
        if n == 0:
            return _EMPTY
        return self.ctx.buf[start: min(start + n, self.ctx.n)].copy()


@numba.njit(cache=True)
def _recycle_update(succ, inputs, topk, kk):
    """succ[inputs[r], :kk] = topk[r, :kk] for each row r in order (the last occurrence of a token wins),
    skipping ids outside [0, len(succ))."""
    for r in range(inputs.shape[0]):
        t = inputs[r]
        if 0 <= t < succ.shape[0]:
            for j in range(kk):
                succ[t, j] = topk[r, j]


class RecycleTable:
    """Token Recycling's adjacency table: each token's top-k successors from the latest verification
    logits that saw it. Reset per request: a table carried over from another request drafts stale
    continuations (the original implementation never resets it)."""

    def __init__(self, vocab_size: int, k: int = 8):
        self.succ = np.full((int(vocab_size), int(k)), -1, np.int32)

    def reset(self) -> None:
        self.succ.fill(-1)

    def update(self, inputs: np.ndarray, topk: np.ndarray) -> None:
        inputs = _int_array(inputs)
        topk = np.asarray(topk).reshape(inputs.shape[0], -1)
        if inputs.shape[0] == 0:
            return
        # In order, so a token that recurs keeps its most recent successors; ids outside the table are skipped.
        _recycle_update(self.succ, inputs, topk, min(topk.shape[1], self.succ.shape[1]))

    def chain(self, start: int, n: int) -> np.ndarray:
        """Greedy point-mass chain succ[start][0], succ[that][0], ... stopping at an unknown token."""
        out = np.empty(max(n, 0), np.int32)
        t, m = int(start), 0
        succ = self.succ
        while m < n and 0 <= t < succ.shape[0]:
            t = int(succ[t, 0])
            if t < 0:
                break
            out[m] = t
            m += 1
        return out[:m]


class RecycleDrafter(Drafter):
    """Token Recycling alone: a greedy chain from the last final token."""

    name = "recycle"
    observes = True

    def __init__(self, vocab_size: int, policy: DraftPolicy | None = None):
        super().__init__(policy)
        self.table = RecycleTable(vocab_size, self.policy.recycle_k)
        self._last = -1

    def reset(self, prompt_tokens: np.ndarray) -> None:
        super().reset(prompt_tokens)
        self.table.reset()
        prompt_tokens = np.asarray(prompt_tokens).reshape(-1)
        self._last = int(prompt_tokens[-1]) if prompt_tokens.shape[0] else -1

    def accept(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.shape[0]:
            self._last = int(tokens[-1])

    def observe(self, inputs: np.ndarray, topk: np.ndarray) -> None:
        self.table.update(inputs, topk)

    def draft(self, k: int) -> np.ndarray:
        self.last_match_len = 0
        out = self.table.chain(self._last, min(k, self.policy.aux_len))
        self.last_source = "recycle" if out.shape[0] else "none"
        return out


class SAMDrafter(Drafter):
    """SAM-Decoding: a static automaton over the training corpus (optional) and a dynamic one over the
    request. With `policy.rule == "paper"` the better match (static lowered by l_bias, ties to dynamic)
    drafts its continuation when it reaches l_threshold, otherwise the auxiliary drafter (if any) does.
    With "cost" (the default) each source's best draft is scored by expected tokens per unit of verify cost
    (`cost`, a VerifyCost; acceptance learnt online in `acceptance`) and the best one drafts, if it beats
    a plain step."""

    name = "sam"
    MAX_RECENT = 32  # longest suffix searched for its most recent occurrence (the scan costs O(context * g))

    def __init__(self, static_sam: SuffixAutomaton | None = None, policy: DraftPolicy | None = None,
                 aux: Drafter | None = None, cost: VerifyCost | None = None, history: Acceptance | None = None):
        super().__init__(policy)
        self.static = static_sam
        self.static_cursor: Cursor | None = static_sam.cursor() if static_sam is not None else None
        self.dynamic = DynamicMatcher()
        self.aux = aux
        self.cost = cost or VerifyCost.default()
        self.acceptance = Acceptance(history=history)
        self._last = None  # (source index, match length, drafted tokens) of the last draft, for `accept`

    @property
    def observes(self) -> bool:
        return self.aux is not None and self.aux.observes

    def reset(self, prompt_tokens: np.ndarray) -> None:
        super().reset(prompt_tokens)
        self.acceptance.reset()
        self._last = None
        self.dynamic.reset(prompt_tokens)
        if self.static_cursor is not None:
            self.static_cursor.reset()
            self.static_cursor.advance_many(prompt_tokens)
        if self.aux is not None:
            self.aux.reset(prompt_tokens)

    def accept(self, tokens: np.ndarray) -> None:
        tokens = _int_array(tokens)
        if self._last is not None:
            source, length, drafted = self._last
            self._last = None
            tokens_ = tokens.tolist()
            acc = 0  # the common prefix (plain Python: a few tokens, once per verify step)
            for a, t in zip(drafted, tokens_):
                if a != t:
                    break
                acc += 1
            # a draft cut by a stop id or the budget is no evidence of a rejection
            self.acceptance.record(source, length, len(drafted) if acc < len(tokens_) else acc, acc)
        dyn, cur = self.dynamic.sam, self.static_cursor
        # One kernel call for both automata in the common case (a mutable dynamic automaton with room and a
        # static one); else the general path (it grows, thaws or raises on bad ids).
        if cur is None or dyn._mode != LINKED or _append_and_advance(
                tokens, dyn._toks, dyn._st, dyn._links, dyn._meta, self.dynamic.cursor._cur, MAX_ID[dyn._toks.dtype],
                cur.sam._mode, cur.sam._st, cur.sam._links, cur.sam._etok, cur.sam._edst, cur._cur):
            self.dynamic.commit(tokens)
            if cur is not None:
                cur.advance_many(tokens)
        if self.aux is not None:
            self.aux.accept(tokens)

    def observe(self, inputs: np.ndarray, topk: np.ndarray) -> None:
        if self.aux is not None:
            self.aux.observe(inputs, topk)

    def matches(self) -> tuple[int, int]:
        """(dynamic match length, static match length) for the text accepted so far."""
        l_static = self.static_cursor.length if self.static_cursor is not None else 0
        return self.dynamic.cursor.length, l_static

    def draft(self, k: int) -> np.ndarray:
        if self.policy.rule == "cost":
            return self._draft_cost(k)
        return self._draft_paper(k)

    def _draft_cost(self, k: int) -> np.ndarray:
        """The source and length with the most expected tokens per unit of verify cost (or nothing)."""
        k = min(k, self.policy.max_len)
        acc, cost = self.acceptance, self.cost
        best_n, best_v, source, length, start = 0, 1.0 / cost.cost[0], -1, 0, 0  # cost.of(0)
        dyn = self.dynamic.sam
        l_dyn = int(self.dynamic.cursor._cur[1])
        l_static, end = 0, 0
        if self.static_cursor is not None:
            state, l_static = self.static_cursor._cur.tolist()
            if l_static > 0:
                end = int(self.static._st[state, MIN_END])
        if l_dyn > 0 and k > 0:
            n_tok = int(dyn._meta[3])
            s = _recent_occurrence(dyn._toks, n_tok, min(l_dyn, self.MAX_RECENT))
            if s >= 0:
                n, v = best_length(acc.rate(0, l_dyn), n_tok - s, k, cost)
                if n and v > best_v:
                    best_n, best_v, source, length, start = n, v, 0, l_dyn, s
        if l_static > 0 and k > 0:
            n, v = best_length(acc.rate(1, l_static), self.static.n_tokens - end, k, cost)
            if n and v > best_v:
                best_n, best_v, source, length, start = n, v, 1, l_static, end
        chain = None
        if self.aux is not None and k > 0:
            chain = self.aux.draft(k)
            n, v = best_length(acc.rate(2, 0), len(chain), k, cost)
            if n and v > best_v:
                best_n, best_v, source, length = n, v, 2, 0
        self.last_match_len = max(l_dyn, l_static)
        if not best_n:
            self.last_source = "none"
            return _EMPTY
        if source == 2:
            out = np.asarray(chain[:best_n], np.int32)
        else:
            out = (dyn if source == 0 else self.static)._toks[start:start + best_n].astype(np.int32)
        self.last_source = "recycle" if source == 2 else SOURCES[source]
        self._last = (source, length, out.tolist())
        return out

    def _draft_paper(self, k: int) -> np.ndarray:
        p = self.policy
        l_dyn, l_static = self.matches()
        l_static_eff = l_static - p.l_bias
        if max(l_dyn, l_static_eff) >= p.l_threshold:
            if l_dyn >= l_static_eff:
                n = p.size(l_dyn, k)
                end = self.dynamic.cursor.anchor(n)
                out = self.dynamic.continuation(end, n)
                self.last_match_len, self.last_source = l_dyn, "dynamic"
            else:
                n = p.size(l_static_eff, k)
                _, end = self.static_cursor.match
                out = self.static.continuation(end, n)
                self.last_match_len, self.last_source = l_static, "static"
            return out
        self.last_match_len = max(l_dyn, l_static_eff, 0)
        if self.aux is not None:
            out = self.aux.draft(k)
            self.last_source = self.aux.last_source
            return out
        self.last_source = "none"
        return _EMPTY


class ReferenceDrafter(Drafter):
    """Drafts a given continuation of the prompt (`reference`): with the model's own plain greedy output, every
    draft is accepted, so MAT is the max draft + 1 and the speedup is the ceiling that the verify cost sets for
    this engine, model and machine (decode.eval's and the study's `oracle`). A yardstick, not a drafter."""

    name = "oracle"

    def __init__(self, reference, policy: DraftPolicy | None = None):
        super().__init__(policy)
        self.ref = np.asarray(reference, np.int32).reshape(-1)
        self.pos = 0

    def reset(self, prompt_tokens: np.ndarray) -> None:
        super().reset(prompt_tokens)
        self.pos = 0

    def draft(self, k: int) -> np.ndarray:
        out = self.ref[self.pos:self.pos + k]
        self.last_source = "reference" if out.size else "none"
        return out

    def accept(self, tokens: np.ndarray) -> None:
        self.pos += len(tokens)


DRAFTERS = ("none", "pld", "recycle", "sam", "sam+recycle")


def make_drafter(name: str, *, vocab_size: int, static_sam: SuffixAutomaton | None = None,
                 cost: VerifyCost | None = None, history: Acceptance | None = None, **policy) -> Drafter:
    """A fresh per-row drafter. `policy` overrides DraftPolicy fields (e.g. alpha=4, max_len=40 on an
    accelerator; rule="paper" for SAM-Decoding's published selection). `cost` is the engine's measured
    verify cost table (Engine.verify_cost()) that sam's "cost" rule sizes drafts by; `history`, one
    Acceptance shared by every drafter a maker makes, keeps sam's acceptance estimates across requests."""
    fields = {f.name for f in dataclasses.fields(DraftPolicy)}
    unknown = sorted(set(policy) - fields)
    if unknown:
        raise ValueError(f"unknown draft policy key {unknown[0]!r}; valid: {', '.join(sorted(fields))}")
    pol = DraftPolicy(**policy)
    if name == "none":
        return Drafter(pol)
    if name == "pld":
        return PromptLookupDrafter(pol)
    if name == "recycle":
        return RecycleDrafter(vocab_size, pol)
    if name == "sam":
        return SAMDrafter(static_sam, pol, cost=cost, history=history)
    if name == "sam+recycle":
        return SAMDrafter(static_sam, pol, aux=RecycleDrafter(vocab_size, pol), cost=cost, history=history)
    raise ValueError(f"unknown drafter {name!r}; valid: {', '.join(DRAFTERS)}")
