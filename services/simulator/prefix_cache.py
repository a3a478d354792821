"""The SGLang **simulator**'s prefix cache: a radix tree of token ids, like RadixAttention.

Each simulated server (replica) owns one :class:`RadixCache`. It remembers the
token sequences of requests it has served; a new prompt's ``cached_tokens`` is
the length of its longest prefix already in the tree. The tree holds at most
``capacity`` tokens: when an insert overflows it, least-recently-used leaves are
evicted (down to 90 % of the capacity, so eviction runs in batches).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["RadixCache"]

_EVICT_TO_FRACTION = 0.9
#: Tokens compared at a time when looking for where an edge and a prompt part ways.
_BLOCK = 64


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...] = ()
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)
    last_access: int = 0


class RadixCache:
    """A bounded radix tree over token ids with LRU leaf eviction; ``capacity=0`` disables it."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._root = _Node()
        self._size = 0
        self._clock = itertools.count(1)
        self.evicted_tokens = 0

    @property
    def size(self) -> int:
        """Tokens currently held."""
        return self._size

    def reset(self) -> None:
        """Drop everything (``/flush_cache``)."""
        self._root = _Node()
        self._size = 0

    def match_prefix(self, tokens: Sequence[int]) -> int:
        """Length of the longest prefix of ``tokens`` in the tree; touches the matched path."""
        tokens = tuple(tokens)  # edges are tuples: slices of both compare in C
        node, matched, now = self._root, 0, next(self._clock)
        while matched < len(tokens):
            child = node.children.get(tokens[matched])
            if child is None:
                break
            common = _common_length(child.key, tokens, matched)
            child.last_access = now
            matched += common
            if common < len(child.key):
                break
            node = child
        return matched

    def insert(self, tokens: Sequence[int]) -> None:
        """Add ``tokens`` (splitting edges as needed), then evict if over capacity."""
        if self.capacity == 0 or not tokens:
            return
        tokens = tuple(tokens)
        node, pos, now = self._root, 0, next(self._clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                self._add_leaf(node, tuple(tokens[pos:]), now)
                break
            common = _common_length(child.key, tokens, pos)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            node, pos = child, pos + common
        if self._size > self.capacity:
            self._evict(self._size - int(self.capacity * _EVICT_TO_FRACTION))

    def _add_leaf(self, parent: _Node, key: tuple[int, ...], now: int) -> None:
        parent.children[key[0]] = _Node(key=key, parent=parent, last_access=now)
        self._size += len(key)

    @staticmethod
    def _split(child: _Node, at: int) -> _Node:
        """Cut ``child``'s edge after ``at`` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = _Node(key=child.key[:at], parent=parent, last_access=child.last_access)
        parent.children[upper.key[0]] = upper
        child.key = child.key[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def _evict(self, tokens_to_free: int) -> None:
        tie = itertools.count()
        heap = [(leaf.last_access, next(tie), leaf) for leaf in self._leaves()]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < tokens_to_free:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            freed += len(leaf.key)
            if parent is not self._root and not parent.children:
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        self._size -= freed
        self.evicted_tokens += freed

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self._root:
                leaves.append(node)
        return leaves


def _common_length(key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    """How many leading tokens of ``key`` equal ``tokens[start:]``'s (compared as slices, in C)."""
    limit = min(len(key), len(tokens) - start)
    if key[:limit] == tokens[start : start + limit]:  # the usual case: the whole edge (or prompt) matches
        return limit
    i = 0
    while key[i : i + _BLOCK] == tokens[start + i : start + i + _BLOCK]:
        i += _BLOCK
    while key[i] == tokens[start + i]:  # a mismatch lies within this block
        i += 1
    return i
