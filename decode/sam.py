"""Suffix automaton over token ids, compiled with numba (SAM-Decoding, arXiv 2411.10666).

Each state is one int32 row of `states` with columns LEN (longest string), LINK (suffix link, -1 at the
root), MIN_END (exclusive end of the earliest occurrence in the indexed tokens; a clone copies it from
the state it splits, whose endpos set has the same minimum) and EDGES. Building is bound by cache misses
on suffix-link hops, so everything a hop needs sits in one row.

Edges come in two layouts, picked by `mode` in the kernels:
- LINKED (mutable; the build and the per-request automaton, which grows by doubling): rows have two more
  columns, TOK0/DST0, holding one edge inline (most states have exactly one, and the inline slot always
  holds the most recently used edge); the others are a list in `links[E, 3]` = (token, target, next)
  whose head is EDGES.
- CSR (frozen; what a static build compacts to, saves and memory-maps): rows are [S + 1, 4] and EDGES is
  an offset: a state's edges are `edge_tok[off[s]:off[s+1]]` (token dtype, sorted) and `edge_dst`
  (int32), found by bisection.
State ids are the same in both layouts, so cursors survive freeze/extend.

Token ids are stored as uint16 while every id fits (byte and BPE vocabularies up to 65,536), as uint32
beyond (Hugging Face vocabularies of 150k ids): `build` picks the width from the largest id, and a mutable
automaton widens itself the first time an id > 65535 arrives. The kernels are the same for both widths
(numba specialises them per dtype); a saved automaton keeps its width (tokens.npy / edge_tok.npy dtype).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numba
import numpy as np

FORMAT_VERSION = 1
LINKED, CSR = 0, 1
LEN, LINK, MIN_END, EDGES, TOK0, DST0 = 0, 1, 2, 3, 4, 5
LINKED_COLS = 6
TOK, DST, NEXT = 0, 1, 2
# Everything is int32: at most 2n states and 3n edges must stay below 2**31.
MAX_TOKENS = 700_000_000
_FILES = ("tokens", "states", "edge_tok", "edge_dst")
_NO_LINKS = np.empty((0, 3), np.int32)
_NO_TOK = np.empty(0, np.uint16)
_NO_DST = np.empty(0, np.int32)
MAX_ID = {np.dtype(np.uint16): 0xFFFF, np.dtype(np.uint32): 0x7FFFFFFF}  # uint32 ids must fit the int32 rows
TOKEN_DTYPES = tuple(MAX_ID)


def token_dtype(max_id: int) -> np.dtype:
    """The narrowest token dtype that holds ids up to max_id (ValueError beyond 2**31 - 1)."""
    for dt in TOKEN_DTYPES:
        if max_id <= MAX_ID[dt]:
            return dt
    raise ValueError(f"token ids must be in [0, {MAX_ID[TOKEN_DTYPES[-1]]}]; got {max_id}")


# ----------------------------------------------------------------------------------------------- kernels

@numba.njit(cache=True)
def _find(mode, st, links, etok, edst, s, c):
    """Target of state s on token c, or -1 (read-only)."""
    if mode == CSR:
        lo = np.int64(st[s, EDGES])
        end = np.int64(st[s + 1, EDGES])
        hi = end
        while lo < hi:
            mid = (lo + hi) >> 1
            if etok[mid] < c:
                lo = mid + 1
            else:
                hi = mid
        if lo < end and etok[lo] == c:
            return np.int64(edst[lo])
        return np.int64(-1)
    if st[s, TOK0] == c:
        return np.int64(st[s, DST0])  # an empty slot holds (-1, -1)
    e = np.int64(st[s, EDGES])
    while e >= 0:
        if links[e, TOK] == c:
            return np.int64(links[e, DST])
        e = np.int64(links[e, NEXT])
    return np.int64(-1)


@numba.njit(cache=True)
def _take_inline(st, links, s, c):
    """Whether state s has an edge on c (LINKED); if so it is swapped into the inline slot. Lookups are
    skewed, so the slot answers most of them without touching the lists."""
    if st[s, TOK0] == c:
        return True
    e = np.int64(st[s, EDGES])
    while e >= 0:
        if links[e, TOK] == c:
            links[e, TOK] = st[s, TOK0]
            d = links[e, DST]
            links[e, DST] = st[s, DST0]
            st[s, TOK0] = c
            st[s, DST0] = d
            return True
        e = np.int64(links[e, NEXT])
    return False


@numba.njit(cache=True)
def _extend_one(toks, i, st, links, meta):
    """Online construction (Blumer et al.) for toks[i]. meta: see SuffixAutomaton._meta."""
    c = toks[i]
    ns = meta[0]
    ne = meta[1]
    last = meta[2]
    te = meta[4]
    cur = ns
    ns += 1
    st[cur, LEN] = st[last, LEN] + 1
    st[cur, LINK] = 0
    st[cur, MIN_END] = i + 1
    st[cur, EDGES] = -1
    st[cur, TOK0] = -1
    st[cur, DST0] = -1
    p = np.int64(last)
    while p != -1:
        if _take_inline(st, links, p, c):
            break
        # New edge p -c-> cur goes inline (it is the likeliest next lookup); the old one joins the list.
        if st[p, TOK0] >= 0:
            links[ne, TOK] = st[p, TOK0]
            links[ne, DST] = st[p, DST0]
            links[ne, NEXT] = st[p, EDGES]
            st[p, EDGES] = ne
            ne += 1
        st[p, TOK0] = c
        st[p, DST0] = cur
        te += 1
        p = np.int64(st[p, LINK])
    if p != -1:
        q = np.int64(st[p, DST0])
        # (q's row is needed either way: it is the next token's first suffix-link stop or it is split.)
        if st[p, LEN] + 1 == st[q, LEN]:
            st[cur, LINK] = q
        else:
            cl = ns
            ns += 1
            st[cl, LEN] = st[p, LEN] + 1
            st[cl, LINK] = st[q, LINK]
            st[cl, MIN_END] = st[q, MIN_END]
            st[cl, EDGES] = -1
            st[cl, TOK0] = st[q, TOK0]
            st[cl, DST0] = st[q, DST0]
            if st[q, TOK0] >= 0:
                te += 1
            f = np.int64(st[q, EDGES])
            while f >= 0:
                links[ne, TOK] = links[f, TOK]
                links[ne, DST] = links[f, DST]
                links[ne, NEXT] = st[cl, EDGES]
                st[cl, EDGES] = ne
                ne += 1
                te += 1
                f = np.int64(links[f, NEXT])
            st[p, DST0] = cl
            p = np.int64(st[p, LINK])
            while p != -1:
                _take_inline(st, links, p, c)  # always present: suffixes of p also extend by c
                if st[p, DST0] != q:
                    break
                st[p, DST0] = cl
                p = np.int64(st[p, LINK])
            st[q, LINK] = cl
            st[cur, LINK] = cl
    meta[0] = ns
    meta[1] = ne
    meta[2] = cur
    meta[3] = i + 1
    meta[4] = te


@numba.njit(cache=True)
def _extend(toks, start, stop, st, links, meta):
    for i in range(start, stop):
        _extend_one(toks, i, st, links, meta)


@numba.njit(cache=True)
def _append(new, buf, st, links, meta, cur, track, max_id):
    """Append `new` (any integer dtype) to the LINKED automaton in one call. With `track`, cursor cur is
    advanced by each token BEFORE the token is inserted, so it tracks the longest suffix that occurred
    earlier rather than the trivial match with itself. Returns 0, or 1 when a capacity must grow first,
    or 2 when a token is outside [0, max_id] (buf's dtype); nothing is changed unless it returns 0."""
    m = new.shape[0]
    n = meta[3]
    if n + m > buf.shape[0] or 2 * (n + m) + 2 > st.shape[0] or 3 * (n + m) + 8 > links.shape[0]:
        return 1
    for j in range(m):
        if new[j] < 0 or new[j] > max_id:
            return 2
    for j in range(m):
        buf[n + j] = new[j]
    if track:
        no_tok = np.empty(0, np.uint16)
        no_dst = np.empty(0, np.int32)
        state = cur[0]
        length = cur[1]
        for i in range(n, n + m):
            state = _canonical(st, state, length)  # the previous insertion may have split it
            state, length = _step(LINKED, st, links, no_tok, no_dst, state, length, buf[i])
            _extend_one(buf, i, st, links, meta)
        cur[0] = state
        cur[1] = length
    else:
        for i in range(n, n + m):
            _extend_one(buf, i, st, links, meta)
    return 0


@numba.njit(cache=True)
def _append_and_advance(new, buf, st, links, meta, cur, max_id, s_mode, s_st, s_links, s_etok, s_edst, s_cur):
    """A drafter's `accept` in one call: `_append(new)` to the mutable (LINKED) automaton tracking cursor
    cur, then, if that succeeded (0), advance the cursor s_cur of another (static) automaton over new.
    Returns _append's status; nothing is changed unless it is 0."""
    status = _append(new, buf, st, links, meta, cur, True, max_id)
    if status == 0:
        _advance(s_mode, s_st, s_links, s_etok, s_edst, s_cur, new)
    return status


@numba.njit(cache=True)
def _canonical(st, state, length):
    """An extension after the cursor last moved may have split its state; the match of that length then
    belongs to the clone (an ancestor), whose transitions are the ones that count."""
    while state > 0 and length <= st[st[state, LINK], LEN]:
        state = np.int64(st[state, LINK])
    return state


@numba.njit(cache=True)
def _step(mode, st, links, etok, edst, state, length, c):
    """One cursor step from a canonical (state, length): follow suffix links until a transition on c
    exists, then take it. The result is canonical again."""
    while True:
        nxt = _find(mode, st, links, etok, edst, state, c)
        if nxt >= 0:
            return nxt, length + 1
        if state == 0:
            return np.int64(0), np.int64(0)
        state = np.int64(st[state, LINK])
        length = np.int64(st[state, LEN])


@numba.njit(cache=True)
def _advance(mode, st, links, etok, edst, cur, toks):
    """Advance cur = [state, length] over toks, in place."""
    length = cur[1]
    state = _canonical(st, cur[0], length)
    for i in range(toks.shape[0]):
        state, length = _step(mode, st, links, etok, edst, state, length, toks[i])
    cur[0] = state
    cur[1] = length


@numba.njit(cache=True)
def _peek(mode, st, links, etok, edst, cur, c):
    """(length, end) after advancing cur by c, without committing."""
    state, length = _step(mode, st, links, etok, edst, _canonical(st, cur[0], cur[1]), cur[1], c)
    return length, st[state, MIN_END] if length > 0 else 0


@numba.njit(cache=True)
def _insert_sorted(etok, edst, start, pos, t, d):
    j = pos
    while j > start and etok[j - 1] > t:  # insertion sort: most states have one or two edges
        etok[j] = etok[j - 1]
        edst[j] = edst[j - 1]
        j -= 1
    etok[j] = t
    edst[j] = d


@numba.njit(cache=True)
def _linked_to_csr(n_states, flat, links, etok, edst):
    """LINKED -> CSR in place: `flat` holds LINKED rows (6 columns) and receives CSR rows (4 columns, plus
    the sentinel row n_states). Row s is read before it is overwritten, and CSR row s only overlaps
    LINKED rows <= s, so no second state table is needed at peak memory."""
    pos = np.int64(0)
    for s in range(n_states):
        b = LINKED_COLS * s
        ln = flat[b + LEN]
        lk = flat[b + LINK]
        mn = flat[b + MIN_END]
        e = np.int64(flat[b + EDGES])
        start = pos
        if flat[b + TOK0] >= 0:
            _insert_sorted(etok, edst, start, pos, flat[b + TOK0], flat[b + DST0])
            pos += 1
        while e >= 0:
            _insert_sorted(etok, edst, start, pos, links[e, TOK], links[e, DST])
            pos += 1
            e = np.int64(links[e, NEXT])
        b = 4 * s
        flat[b + LEN] = ln
        flat[b + LINK] = lk
        flat[b + MIN_END] = mn
        flat[b + EDGES] = start
    b = 4 * n_states
    flat[b + LEN] = 0
    flat[b + LINK] = 0
    flat[b + MIN_END] = 0
    flat[b + EDGES] = pos


@numba.njit(cache=True)
def _csr_to_linked(n_states, csr, etok, edst, st, links):
    """CSR rows -> LINKED rows in `st` (a separate array); returns the number of list edges used."""
    ne = 0
    for s in range(n_states):
        st[s, LEN] = csr[s, LEN]
        st[s, LINK] = csr[s, LINK]
        st[s, MIN_END] = csr[s, MIN_END]
        st[s, EDGES] = -1
        st[s, TOK0] = -1
        st[s, DST0] = -1
        lo = csr[s, EDGES]
        hi = csr[s + 1, EDGES]
        if hi > lo:
            st[s, TOK0] = etok[lo]
            st[s, DST0] = edst[lo]
        for e in range(hi - 1, lo, -1):
            links[ne, TOK] = etok[e]
            links[ne, DST] = edst[e]
            links[ne, NEXT] = st[s, EDGES]
            st[s, EDGES] = ne
            ne += 1
    return ne


# ----------------------------------------------------------------------------------------------- classes

_NO_CUR = np.zeros(2, np.int64)


def _int_array(tokens) -> np.ndarray:
    """A 1-D integer array (no copy when it already is); kernels check the range."""
    arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind not in "iu":
        if arr.size and not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"token ids must be integers; got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    return arr


def _as_tokens(tokens) -> np.ndarray:
    """Token ids as a contiguous 1-D uint16 array, or uint32 when an id exceeds 65535 (no copy when they
    already are one of those)."""
    arr = np.asarray(tokens)
    if arr.dtype not in TOKEN_DTYPES:
        arr = arr.reshape(-1)
        if arr.size and arr.min() < 0:
            raise ValueError(f"token ids must be >= 0; got range [{arr.min()}, {arr.max()}]")
        return arr.astype(token_dtype(int(arr.max()) if arr.size else 0))
    if arr.dtype == np.uint32 and arr.size and int(arr.max()) > MAX_ID[arr.dtype]:
        raise ValueError(f"token ids must be in [0, {MAX_ID[arr.dtype]}]; got {int(arr.max())}")
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return np.ascontiguousarray(arr)


class SuffixAutomaton:
    """Suffix automaton of a token sequence.

    `SuffixAutomaton()` is empty and grows with extend(); `SuffixAutomaton.build(tokens)` indexes a corpus
    and compacts to CSR; `load()` memory-maps a saved one. Extending a frozen automaton thaws it (a copy).
    """

    def __init__(self, capacity: int = 1024, dtype=np.uint16):
        self.header: dict = {}
        self._alloc(max(int(capacity), 16), np.dtype(dtype))

    def _alloc(self, capacity: int, dtype=np.dtype(np.uint16)) -> None:
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be uint16 or uint32; got {dtype}")
        self._mode = LINKED
        self._toks = np.empty(capacity, dtype)
        self._st = np.empty((2 * capacity + 2, LINKED_COLS), np.int32)
        self._links = np.empty((3 * capacity + 8, 3), np.int32)
        self._etok, self._edst = _NO_TOK, _NO_DST
        # n_states, n_list_edges (LINKED), last state, n_tokens, n_edges
        self._meta = np.zeros(5, np.int64)
        self._one = np.zeros(1, np.int64)
        self.clear()

    def clear(self) -> None:
        """Forget all tokens, keep the capacity (back to the mutable layout if frozen)."""
        if self._mode == CSR:
            self._alloc(max(self._toks.shape[0], 16), self._toks.dtype)
            return
        self._st[0] = (0, -1, 0, -1, -1, -1)
        self._meta[:] = (1, 0, 0, 0, 0)

    # -- construction

    @classmethod
    def build(cls, tokens) -> "SuffixAutomaton":
        """Index tokens and compact to CSR. Peak memory is about 60 bytes per token."""
        toks = _as_tokens(tokens)
        n = toks.shape[0]
        if n > MAX_TOKENS:
            raise ValueError(f"cannot index {n} tokens; at most {MAX_TOKENS}")
        sam = cls.__new__(cls)
        sam.header = {}
        # Upper bounds (2n states, 3n edges): np.empty leaves untouched pages unmapped, so only what the
        # construction writes becomes resident.
        sam._alloc(n, toks.dtype)
        sam._toks[:] = toks
        _extend(sam._toks, 0, n, sam._st, sam._links, sam._meta)
        return sam.freeze(_private=True)

    def freeze(self, *, _private: bool = False) -> "SuffixAutomaton":
        """Compact to CSR: sorted edges, exact-size arrays."""
        if self._mode == CSR:
            return self
        ns, ne, n = self.n_states, self.n_edges, self.n_tokens
        etok = np.empty(ne, self._toks.dtype)
        edst = np.empty(ne, np.int32)
        # The CSR table is written over the LINKED one; a copy when views of it may be out there.
        st = self._st if _private else self._st[: ns + 1].copy()
        _linked_to_csr(ns, st.reshape(-1), self._links, etok, edst)
        self._links = _NO_LINKS  # release the lists before trimming the rest
        if st.base is None and st.flags.owndata:
            st.resize((ns + 1, 4), refcheck=False)  # realloc: keeps the first 4(ns+1) entries in place
        else:
            st = st.reshape(-1)[: 4 * (ns + 1)].reshape(ns + 1, 4).copy()
        self._st = st
        self._toks = _resized(self._toks, n, in_place=_private)
        self._etok, self._edst = etok, edst
        self._meta[1] = ne
        self._mode = CSR
        return self

    def _thaw(self, extra: int) -> None:
        ns, n = self.n_states, self.n_tokens
        cap = max(2 * (n + extra), 1024)
        st = np.empty((2 * cap + 2, LINKED_COLS), np.int32)
        links = np.empty((3 * cap + 8, 3), np.int32)
        self._meta[1] = _csr_to_linked(ns, self._st, self._etok, self._edst, st, links)
        toks = np.empty(cap, self._toks.dtype)
        toks[:n] = self._toks[:n]
        self._st, self._links, self._toks = st, links, toks
        self._etok, self._edst = _NO_TOK, _NO_DST
        self._mode = LINKED

    def _reserve(self, extra: int) -> None:
        """Room for `extra` more tokens (capacities double; bounds 2n states, 3n edges)."""
        if self._mode == CSR:
            self._thaw(extra)
        n = int(self._meta[3]) + extra
        if n > MAX_TOKENS:
            raise ValueError(f"cannot index {n} tokens; at most {MAX_TOKENS}")
        if self._toks.shape[0] < n:
            self._toks = _resized(self._toks, max(n, 2 * self._toks.shape[0]))
        if self._st.shape[0] < 2 * n + 2:
            self._st = _resized(self._st, max(2 * n + 2, 2 * self._st.shape[0]))
        if self._links.shape[0] < 3 * n + 8:
            self._links = _resized(self._links, max(3 * n + 8, 2 * self._links.shape[0]))

    def extend(self, token: int) -> None:
        self._one[0] = token
        self._append(self._one, None)

    def extend_many(self, tokens) -> None:
        self._append(_int_array(tokens), None)

    def _append(self, new: np.ndarray, cur: np.ndarray | None) -> None:
        if self._mode == CSR:
            self._thaw(new.shape[0])
        track = cur is not None
        cur = cur if track else _NO_CUR
        status = _append(new, self._toks, self._st, self._links, self._meta, cur, track, self.max_id)
        if status == 1:
            self._reserve(new.shape[0])
            status = _append(new, self._toks, self._st, self._links, self._meta, cur, track, self.max_id)
        if status == 2 and new.min() >= 0 and self._toks.dtype == np.uint16:
            self._widen(token_dtype(int(new.max())))  # raises beyond uint32's range
            status = _append(new, self._toks, self._st, self._links, self._meta, cur, track, self.max_id)
        if status == 2:
            raise ValueError(f"token ids must be in [0, {self.max_id}]; got range [{new.min()}, {new.max()}]")

    def _widen(self, dtype) -> None:
        """Store ids as `dtype` from now on (a mutable automaton meeting its first id > 65535)."""
        self._toks = self._toks.astype(dtype)

    @property
    def token_dtype(self) -> np.dtype:
        return self._toks.dtype

    @property
    def max_id(self) -> int:
        """The largest id this automaton's token dtype holds (a mutable one widens past it)."""
        return MAX_ID[self._toks.dtype]

    # -- queries

    @property
    def n_tokens(self) -> int:
        return int(self._meta[3])

    @property
    def n_states(self) -> int:
        return int(self._meta[0])

    @property
    def n_edges(self) -> int:
        return int(self._meta[4])

    @property
    def frozen(self) -> bool:
        return self._mode == CSR

    @property
    def tokens(self) -> np.ndarray:
        """The indexed tokens (a view, uint16 or uint32)."""
        return self._toks[: self.n_tokens]

    @property
    def states(self) -> np.ndarray:
        """[n_states, 4] int32 view: len, link, min_endpos, edges (CSR offset or LINKED list head)."""
        return self._st[: self.n_states, :4]

    def end_of(self, state: int, length: int) -> int:
        return int(self._st[state, MIN_END]) if length > 0 else 0

    def transitions(self, state: int) -> dict[int, int]:
        """{token: target} of one state (for tests and inspection)."""
        if self._mode == CSR:
            lo, hi = int(self._st[state, EDGES]), int(self._st[state + 1, EDGES])
            return dict(zip(self._etok[lo:hi].tolist(), self._edst[lo:hi].tolist()))
        out, e = {}, int(self._st[state, EDGES])
        if self._st[state, TOK0] >= 0:
            out[int(self._st[state, TOK0])] = int(self._st[state, DST0])
        while e >= 0:
            out[int(self._links[e, TOK])] = int(self._links[e, DST])
            e = int(self._links[e, NEXT])
        return out

    def _kernel_args(self):
        return self._mode, self._st, self._links, self._etok, self._edst

    def longest_suffix_match(self, query) -> tuple[int, int]:
        """(length of the longest suffix of query that occurs in the indexed tokens, exclusive end of its
        EARLIEST occurrence; 0 when the length is 0). Ids that cannot be indexed simply never match."""
        cur = np.zeros(2, np.int64)
        _advance(*self._kernel_args(), cur, _int_array(query))
        return int(cur[1]), self.end_of(int(cur[0]), int(cur[1]))

    def cursor(self) -> "Cursor":
        return Cursor(self)

    def continuation(self, end: int, k: int) -> np.ndarray:
        """The up-to-k indexed tokens starting at end, as int32."""
        end = max(0, int(end))
        return self._toks[end: min(end + max(int(k), 0), self.n_tokens)].astype(np.int32)

    def arrays(self) -> dict[str, np.ndarray]:
        """The frozen arrays by file name (freezes first)."""
        self.freeze()
        return {"tokens": self._toks, "states": self._st, "edge_tok": self._etok, "edge_dst": self._edst}

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (capacity included for a mutable automaton)."""
        return int(sum(a.nbytes for a in (self._toks, self._st, self._links, self._etok, self._edst)))

    # -- persistence

    def save(self, directory, *, tokenizer: str, corpus_hash: str) -> Path:
        """One .npy per array plus header.json, written to a temp dir and renamed into place."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            for name, arr in self.arrays().items():
                np.save(tmp / f"{name}.npy", arr)
            header = {"format_version": FORMAT_VERSION, "tokenizer": str(tokenizer),
                      "corpus_hash": str(corpus_hash), "n_tokens": self.n_tokens, "n_states": self.n_states,
                      "n_edges": self.n_edges, "last": int(self._meta[2]),
                      "token_dtype": str(self._toks.dtype),
                      "states_columns": ["len", "link", "min_endpos", "edge_off"]}
            (tmp / "header.json").write_text(json.dumps(header, indent=1) + "\n")
            if directory.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
                os.rename(directory, trash / "old")
                os.rename(tmp, directory)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.header = header
        return directory

    @classmethod
    def load(cls, directory, *, tokenizer: str | None = None, corpus_hash: str | None = None,
             mmap: bool = True) -> "SuffixAutomaton":
        """Open a saved automaton (memory-mapped by default). Raises ValueError naming the mismatch when
        the tokenizer or corpus hash differ from what the caller expects."""
        directory = Path(directory)
        hpath = directory / "header.json"
        if not hpath.is_file():
            raise ValueError(f"no suffix automaton at {directory} (missing header.json)")
        try:
            header = json.loads(hpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt {hpath}: {e}") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"suffix automaton at {directory} has format_version "
                             f"{header.get('format_version')!r}; this code reads {FORMAT_VERSION}")
        if tokenizer is not None and header.get("tokenizer") != tokenizer:
            raise ValueError(f"suffix automaton at {directory} was built with tokenizer "
                             f"{header.get('tokenizer')!r}, but the model uses {tokenizer!r}")
        if corpus_hash is not None and header.get("corpus_hash") != corpus_hash:
            raise ValueError(f"suffix automaton at {directory} was built from corpus "
                             f"{header.get('corpus_hash')!r}, expected corpus {corpus_hash!r}")
        arrs = {}
        for name in _FILES:
            path = directory / f"{name}.npy"
            if not path.is_file():
                raise ValueError(f"suffix automaton at {directory} is missing {name}.npy")
            # Copy-on-write keeps the arrays writable (one numba specialisation for built and loaded
            # automata) without ever writing to the file.
            arrs[name] = np.asarray(np.load(path, mmap_mode="c" if mmap else None))
        try:
            ns, n, ne = int(header["n_states"]), int(header["n_tokens"]), int(header["n_edges"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt {hpath}: bad or missing field {e}") from None
        if (arrs["states"].shape != (ns + 1, 4) or arrs["tokens"].shape != (n,)
                or arrs["edge_tok"].shape != (ne,) or arrs["edge_dst"].shape != (ne,)
                or arrs["tokens"].dtype not in TOKEN_DTYPES or arrs["edge_tok"].dtype != arrs["tokens"].dtype):
            raise ValueError(f"suffix automaton at {directory} has arrays inconsistent with header.json")
        sam = cls.__new__(cls)
        sam.header = header
        sam._mode = CSR
        sam._toks, sam._st = arrs["tokens"], arrs["states"]
        sam._etok, sam._edst = arrs["edge_tok"], arrs["edge_dst"]
        sam._links = _NO_LINKS
        sam._meta = np.array([ns, ne, int(header.get("last", 0)), n, ne], np.int64)
        sam._one = np.zeros(1, np.int64)
        return sam


def _resized(arr: np.ndarray, rows: int, in_place: bool = False) -> np.ndarray:
    """arr with `rows` rows. in_place reallocs (no copy, no second buffer at peak) and is only for arrays
    that no view can reference; otherwise a copy, so views handed out earlier stay valid."""
    if arr.shape[0] == rows:
        return arr
    shape = (rows,) + arr.shape[1:]
    if in_place and arr.base is None and arr.flags.owndata and arr.flags.c_contiguous:
        try:
            arr.resize(shape, refcheck=False)
            return arr
        except (ValueError, SystemError):
            pass
    out = np.empty(shape, arr.dtype)
    k = min(rows, arr.shape[0])
    out[:k] = arr[:k]
    return out


class Cursor:
    """A match position (state, length) in an automaton; advancing is amortised O(1) per token."""

    __slots__ = ("sam", "_cur", "_one")

    def __init__(self, sam: SuffixAutomaton):
        self.sam = sam
        self._cur = np.zeros(2, np.int64)
        self._one = np.zeros(1, np.int64)

    def reset(self) -> None:
        self._cur[:] = 0

    @property
    def state(self) -> int:
        return int(self._cur[0])

    @property
    def length(self) -> int:
        return int(self._cur[1])

    @property
    def match(self) -> tuple[int, int]:
        """Current (length, exclusive end of the earliest occurrence)."""
        state, length = self._cur.tolist()
        return length, (int(self.sam._st[state, MIN_END]) if length > 0 else 0)

    def advance(self, token: int) -> tuple[int, int]:
        """Commit one token: follow suffix links until a transition exists, then take it."""
        self._one[0] = token
        return self.advance_many(self._one)

    def advance_many(self, tokens) -> tuple[int, int]:
        s = self.sam
        _advance(s._mode, s._st, s._links, s._etok, s._edst, self._cur, _int_array(tokens))
        return self.match

    def peek(self, token: int) -> tuple[int, int]:
        """(length, end) that advance(token) would give, without committing."""
        s = self.sam
        length, end = _peek(s._mode, s._st, s._links, s._etok, s._edst, self._cur, int(token))
        return int(length), int(end)

    def anchor(self, want: int) -> int:
        """End of an occurrence to copy a draft from: the match's earliest occurrence, or, when fewer than
        `want` tokens follow it, that of a shorter suffix (SAM-Decoding's `to_anc`), down to length 1."""
        st, n = self.sam._st, self.sam.n_tokens
        state = int(self._cur[0])
        if self._cur[1] <= 0:
            return 0
        end = int(st[state, MIN_END])
        while n - end < want:
            link = int(st[state, LINK])
            if link <= 0:
                break
            state, end = link, int(st[link, MIN_END])
        return end


class DynamicMatcher:
    """Per-request automaton over prompt + committed tokens with a cursor that tracks the longest suffix
    of the text that occurred EARLIER (each token is matched before it is inserted)."""

    def __init__(self, capacity: int = 4096):
        self.sam = SuffixAutomaton(capacity)
        self.cursor = Cursor(self.sam)

    def reset(self, prompt=()) -> None:
        self.sam.clear()
        self.cursor.reset()
        self.commit(prompt)

    def commit(self, tokens) -> None:
        """Insert the final tokens (matching each before inserting it)."""
        new = _int_array(tokens)
        sam, cur = self.sam, self.cursor._cur
        # Fast path first: this runs once per decoding step and row, so Python overhead matters.
        if sam._mode != LINKED or _append(new, sam._toks, sam._st, sam._links, sam._meta, cur, True,
                                          MAX_ID[sam._toks.dtype]):
            sam._append(new, cur)  # grows, thaws or raises on bad ids

    def peek(self, token: int) -> tuple[int, int]:
        return self.cursor.peek(token)

    def match(self) -> tuple[int, int]:
        return self.cursor.match

    def continuation(self, end: int, k: int) -> np.ndarray:
        return self.sam.continuation(end, k)

    @property
    def tokens(self) -> np.ndarray:
        return self.sam.tokens
