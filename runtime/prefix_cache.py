"""PrefixCache: the states of prompt prefixes, so a prompt seen before is not prefilled again.

An SSM's state after a prefix is S float32 numbers whatever the prefix's length, so keeping
it is cheap. A prompt u[0:T] is cut into pieces at the prefill chunk boundaries
(Q = manifest graphs.prefill.chunk) plus its tail:

    pieces   u[0:Q], u[Q:2Q], …, u[(k-1)Q:kQ], u[kQ:T]          (k = ⌊T/Q⌋, tail may be empty)
    keys     h_0 = sha256(model sha ‖ scope),  h_j = sha256(h_{j-1} ‖ piece_j)
    entry    h_j → (the prefix u[0:end_j], the state after it [S], the output of u[end_j − 1] [D])

A lookup hashes the prompt's pieces and takes the longest prefix that has an entry whose
stored prefix equals the prompt's (so a match is exact: a hash is never trusted alone; the
prefix costs 8 bytes a token, an eighth of a 64 KiB state at 1,024 tokens). When the entries'
bytes exceed `max_bytes`, the scope holding the most bytes gives up its least recently used
entries first (found through a heap of the scopes' sizes: O(log scopes) an eviction, so many
tenants do not slow each insert down).

`scope` separates tenants: by default each principal has its own entries (a cache shared
across principals would tell one tenant, by timing, which prompts another sent); the
server's `--prefix-cache-scope global` shares them. Evicting from the largest scope keeps one
tenant's prompts from pushing out another's smaller share, so a tenant's hits do not tell how
much others sent (unless it holds the largest share itself). Used from the event loop only
(no lock).

Dimension letters: T prompt length, Q chunk, S state size, D output width.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class _Entry:
    prefix: bytes  # the prefix's tokens, int64 little-endian
    state: np.ndarray  # float32 [S]
    output: np.ndarray  # [D]

    @property
    def nbytes(self) -> int:
        return entry_bytes(len(self.prefix) // 8, self.state.size, self.output.size)


def entry_bytes(tokens: int, state_size: int, d_output: int) -> int:
    """What an entry counts against the budget: its prefix, state and output (float32), and
    32 + 64 bytes for its key and bookkeeping."""
    return 8 * tokens + 4 * state_size + 4 * d_output + 32 + 64


@dataclass
class CacheHit:
    """The longest cached prefix of a prompt: `tokens` of it (0: none), the state after
    them [S] and the output of the last one [D] (both copies); with `chain`, also the
    states after each of its pieces, {end: state [S]} (the cache's own arrays: read only)."""

    tokens: int
    state: np.ndarray | None = None
    output: np.ndarray | None = None
    states: dict[int, np.ndarray] | None = None


class PrefixCache:
    """Exact-prefix state cache (see the module docstring).

    Args:
        max_bytes: LRU budget (0: the cache is off: lookups miss, inserts do nothing).
        chunk: Q, the prefill chunk the prompt is cut at.
        model_sha: the model the states belong to (part of every key).
    """

    def __init__(self, max_bytes: int, chunk: int, model_sha: str):
        self.max_bytes, self.chunk, self.model_sha = int(max_bytes), int(chunk), model_sha
        self._entries: dict[str, OrderedDict[bytes, _Entry]] = {}  # scope -> its LRU entries
        self._scope_bytes: dict[str, int] = {}
        self._largest: list[tuple[int, str]] = []  # heap of (-bytes, scope); stale ones too
        self.bytes = 0
        self.counts = {"hits": 0, "misses": 0, "cached_tokens": 0, "evictions": 0}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _pieces(self, scope: str, data: bytes) -> list[tuple[int, bytes]]:
        """(end, key) for each piece of a prompt given as int64 little-endian bytes, in order."""
        key = hashlib.sha256(f"{self.model_sha}\0{scope}".encode()).digest()
        T, Q = len(data) // 8, self.chunk
        ends = [*range(Q, T + 1, Q)]
        if not ends or ends[-1] != T:
            ends.append(T)
        pieces, start = [], 0
        for end in ends:
            key = hashlib.sha256(key + data[8 * start : 8 * end]).digest()
            pieces.append((end, key))
            start = end
        return pieces

    def lookup(
        self,
        scope: str,
        prompt: np.ndarray,
        limit: int | None = None,
        chain: bool = False,
        gap: int | None = None,
        count: bool = True,
    ) -> CacheHit:
        """The longest cached prefix of `prompt` (int64 [T]) of at most `limit` tokens.

        chain: also the states after the cached pieces up to it, in `states` (a session
        that may rewind into the prompt takes them as checkpoints); with `gap`, the longest
        prefix reached through cached pieces at most `gap` inputs apart, from 0.
        count=False leaves the hit or miss to be counted (`count`) once the prompt was used.
        """
        if not self.enabled or not len(prompt):
            return CacheHit(0)
        data = _tokens_bytes(prompt)
        pieces = [
            (end, key) for end, key in self._pieces(scope, data) if limit is None or end <= limit
        ]
        entries = self._entries.get(scope, {})
        found = []  # (end, key, entry) of the hit (chain: of the cached pieces up to it)
        for end, key in pieces if chain else reversed(pieces):  # plain: the longest first
            if chain and gap is not None and end - (found[-1][0] if found else 0) > gap:
                break
            e = entries.get(key)
            if e is not None and e.prefix == data[: 8 * end]:
                found.append((end, key, e))
                if not chain:
                    break
        if not found:
            if count:
                self.count(0)
            return CacheHit(0)
        for _, key, _ in reversed(found):  # a prompt's first pieces are evicted last
            entries.move_to_end(key)
        end, _, e = found[-1]
        if count:
            self.count(end)
        states = {end: e.state for end, _, e in found} if chain else None
        return CacheHit(end, e.state.copy(), e.output.copy(), states)

    def count(self, tokens: int) -> None:
        """Count a lookup made with count=False: a hit that served `tokens` inputs (0: a
        miss). Nothing while the cache is off (its lookups count nothing either)."""
        if not self.enabled:
            return
        if tokens:
            self.counts["hits"] += 1
            self.counts["cached_tokens"] += tokens
        else:
            self.counts["misses"] += 1

    def insert(
        self, scope: str, prompt: np.ndarray, states: dict[int, tuple[np.ndarray, np.ndarray]]
    ) -> int:
        """Cache the states after the prompt's pieces that `states` has: {end: (state [S],
        output of input end-1 [D])}. Returns how many entries were added."""
        if not self.enabled:
            return 0
        added, data = 0, _tokens_bytes(prompt)
        entries = self._entries.setdefault(scope, OrderedDict())
        for end, key in reversed(self._pieces(scope, data)):  # the first pieces evicted last
            if key in entries:  # (a hit's pieces too: behind the ones added after them)
                entries.move_to_end(key)
                continue
            if end not in states:
                continue
            state, output = states[end]
            e = _Entry(data[: 8 * end], np.array(state, np.float32), np.array(output, np.float32))
            if e.nbytes > self.max_bytes:
                continue
            entries[key] = e
            self._scope_bytes[scope] = self._scope_bytes.get(scope, 0) + e.nbytes
            self.bytes += e.nbytes
            added += 1
        if added:
            self._sized(scope)
        while self.bytes > self.max_bytes:
            largest = self._largest_scope()
            _, old = self._entries[largest].popitem(last=False)
            self._scope_bytes[largest] -= old.nbytes
            self.bytes -= old.nbytes
            self.counts["evictions"] += 1
            if not self._entries[largest]:
                del self._entries[largest], self._scope_bytes[largest]
            else:
                self._sized(largest)
        if not entries and scope in self._entries:  # nothing of it was kept (or ever added)
            del self._entries[scope]
            self._scope_bytes.pop(scope, None)
        return added

    def _sized(self, scope: str) -> None:
        """Note a scope's new size in the heap (its older sizes there go stale)."""
        if len(self._largest) > 4 * len(self._scope_bytes) + 64:  # mostly stale: rebuild
            self._largest = [(-b, s) for s, b in self._scope_bytes.items()]
            heapq.heapify(self._largest)
        else:
            heapq.heappush(self._largest, (-self._scope_bytes[scope], scope))

    def _largest_scope(self) -> str:
        """The scope holding the most bytes (of equal ones, the least by name)."""
        while True:
            neg, scope = self._largest[0]
            if self._scope_bytes.get(scope) == -neg:
                return scope
            heapq.heappop(self._largest)

    def stats(self) -> dict:
        entries = sum(len(e) for e in self._entries.values())
        return {**self.counts, "bytes": self.bytes, "entries": entries}


def _tokens_bytes(prompt: np.ndarray) -> bytes:
    """A prompt's tokens as int64 little-endian bytes (what keys hash and entries store)."""
    return np.asarray(prompt, dtype="<i8").tobytes()
