"""Exact-proportion choices: the mixture of tasks, and the kinds of masks, overlays and control maps.

Independent random draws only match their weights on average (over 2,000 draws a 40% kind lands
anywhere in 38-42% a third of the time). A `StratifiedChooser` deals names in shuffled blocks whose
contents match the weights exactly, carrying the rounding remainder from block to block, so the count of
every name stays within one of weight x draws at each block boundary, yet the order is random.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def normalized(weights: Mapping[str, float], what: str = "weights") -> dict[str, float]:
    """Weights divided by their sum; a one-line error for negative, non-finite or all-zero weights."""
    bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"{what}: weights must be finite and >= 0, got {bad}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"{what}: at least one weight must be positive, got {dict(weights)}")
    return {k: float(v) / total for k, v in weights.items()}


def deal_counts(probs: Sequence[float], carry: Sequence[float], block: int) -> tuple[list[int], list[float]]:
    """How many of each name the next block holds (quota = weight x block + the carried remainder, largest
    remainders rounded up), and the remainders carried to the block after."""
    quota = [w * block + c for w, c in zip(probs, carry)]
    counts = [math.floor(q) for q in quota]
    spare = block - sum(counts)
    for i in sorted(range(len(quota)), key=lambda i: quota[i] - counts[i], reverse=True)[:max(spare, 0)]:
        counts[i] += 1
    return counts, [q - c for q, c in zip(quota, counts)]


class StratifiedChooser:
    """Draws names in exact proportion to `weights` (see module docstring)."""

    def __init__(self, weights: Mapping[str, float], block: int = 100, stratified: bool = True):
        p = normalized(weights)
        self.names = [k for k, v in p.items() if v > 0]
        self.probs = [p[k] for k in self.names]
        self.block = block
        self.stratified = stratified
        self._carry = [0.0] * len(self.names)
        self._queue: list[str] = []

    def _refill(self, rng: np.random.Generator) -> None:
        counts, self._carry = deal_counts(self.probs, self._carry, self.block)
        queue = [name for name, c in zip(self.names, counts) for _ in range(c)]
        rng.shuffle(queue)
        self._queue = queue

    def draw(self, rng: np.random.Generator) -> str:
        if not self.stratified:  # independent draws: used where no state may carry between samples
            return self.names[int(rng.choice(len(self.names), p=self.probs))]
        if not self._queue:
            self._refill(rng)
        return self._queue.pop()


class IndexedDealer:
    """The deal of `StratifiedChooser` as a function of the draw's index: draw `i` depends only on (weights,
    seed, i), never on which draws were made before, so a stream can jump ahead without replaying anything.
    Block k's contents follow from the carried remainders of blocks 0..k-1 (arithmetic only) and its order
    from a generator seeded by (seed, k)."""

    def __init__(self, weights: Mapping[str, float], seed: int, block: int = 100):
        p = normalized(weights)
        self.names = [k for k, v in p.items() if v > 0]
        self.probs = [p[k] for k in self.names]
        self.seed, self.block = int(seed), block
        self._k, self._carry, self._queue = -1, [0.0] * len(self.names), list[str]()

    def at(self, index: int) -> str:
        k = index // self.block
        if k != self._k:
            if k < self._k:  # going back: recompute the remainders from the start
                self._k, self._carry = -1, [0.0] * len(self.names)
            while self._k < k:
                counts, self._carry = deal_counts(self.probs, self._carry, self.block)
                self._k += 1
            queue = [name for name, c in zip(self.names, counts) for _ in range(c)]
            order = np.random.default_rng([self.seed, k]).permutation(len(queue))
            self._queue = [queue[i] for i in order]
        return self._queue[index % self.block]
