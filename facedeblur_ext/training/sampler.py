"""A distributed sampler that can start in the middle of an epoch (for exact resume)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(Sampler[int]):
    """Per-epoch seeded shuffling, split across ranks, with a start offset.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the
    same order; ``set_start(n)`` skips the first ``n`` indices of this rank's share (the
    batches already trained on). Like ``DistributedSampler``, the index list is padded by
    wrapping (or truncated with ``drop_last``) so that every rank gets the same count.

    Args:
        length: dataset length.
        num_replicas, rank: data-parallel world size and this process's rank.
        shuffle: shuffle each epoch.
        seed: base seed of the shuffling.
        drop_last: drop the tail that does not divide evenly across ranks.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if length <= 0:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.length = length
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        if drop_last and length % num_replicas:
            self.num_samples = length // num_replicas
        else:
            self.num_samples = math.ceil(length / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share of the current epoch."""
        self.start = max(0, int(start))

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch (ignoring the start offset)."""
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        if self.total_size > len(order):
            pad = self.total_size - len(order)
            order += (order * math.ceil(pad / len(order)))[:pad]
        else:
            order = order[: self.total_size]
        return order[self.rank: self.total_size: self.num_replicas]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
