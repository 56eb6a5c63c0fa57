"""Deterministic training data order that survives resume, workers and torch.distributed.

The training data is one stream of global batches. Global batch ``b`` holds ``batch_size x
world`` samples; rank ``r`` takes its ``batch_size`` consecutive ones. Sample position ``p`` of the
stream is case ``perm_e[p mod n]`` of pass ``e = p // n`` over the cases, with ``perm_e`` a
permutation drawn from ``(seed, e)``, and its random augmentation is seeded from ``(seed, p)``.

So the data a step sees is a pure function of (seed, step, rank, world): a resumed run starts
the stream at its step and sees exactly what an uninterrupted run would have seen, whatever the
number of loader workers, and one process with batch ``B x N`` sees the same samples as ``N``
ranks with batch ``B``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from monai.data import CacheDataset
from monai.transforms import Randomizable

__all__ = ["StreamSampler", "SeededCacheDataset", "sample_seed"]

_MAX_SEED = 2**31 - 1


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of stream position ``position`` (a cheap integer hash)."""
    x = (int(seed) * 0x9E3779B1 + int(position) * 0x85EBCA77 + 0x27D4EB2F) & 0xFFFFFFFFFFFF
    x ^= x >> 17
    x = (x * 0xC2B2AE3D) & 0xFFFFFFFFFFFF
    x ^= x >> 13
    return int(x % _MAX_SEED)


class StreamSampler(torch.utils.data.Sampler):
    """Yields ``(case index, augmentation seed)`` for this rank, from ``start_step`` on.

    Args:
        n_cases: number of training cases.
        batch_size: samples per step on this rank.
        total_steps: number of steps of the whole training.
        start_step: first step to produce (resume).
        seed: data-order seed.
        rank: this process's rank.
        world: number of processes.
    """

    def __init__(
        self,
        n_cases: int,
        batch_size: int,
        total_steps: int,
        start_step: int = 0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if n_cases < 1:
            raise ValueError("StreamSampler: no training cases")
        self.n_cases = int(n_cases)
        self.batch_size = int(batch_size)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world = int(world)
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(sample_seed(self.seed, -1 - epoch))
            self._perms = {epoch: torch.randperm(self.n_cases, generator=g).tolist()}
        return self._perms[epoch]

    def position(self, step: int, slot: int) -> int:
        """Stream position of slot ``slot`` of this rank's batch at ``step``."""
        return (step * self.world + self.rank) * self.batch_size + slot

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start_step, self.total_steps):
            for slot in range(self.batch_size):
                p = self.position(step, slot)
                yield self._perm(p // self.n_cases)[p % self.n_cases], sample_seed(self.seed, p)

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0) * self.batch_size


class SeededCacheDataset(CacheDataset):
    """MONAI ``CacheDataset`` whose random transforms are reseeded per sample.

    Indexed by ``(index, seed)`` pairs from :class:`StreamSampler` (a plain integer index works
    too and keeps the current random state). The deterministic head of the transform chain is
    cached; the random tail is seeded from the sample's stream position, so augmentation does
    not depend on what was drawn before (resume-exact, worker-count independent).
    """

    def __getitem__(self, key: int | Sequence[int]):  # type: ignore[override]
        if isinstance(key, (tuple, list)) and len(key) == 2:
            index, seed = int(key[0]), int(key[1])
            if isinstance(self.transform, Randomizable):
                self.transform.set_random_state(seed=seed)
            return super().__getitem__(index)
        return super().__getitem__(key)
