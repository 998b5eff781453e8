"""Official LLaVA's modality- and length-grouped sampling (``LengthGroupedSampler(group_by_modality=True)``).

A *megabatch* is what one optimizer step consumes over all devices:
``batch_size`` (per device) x ``world_size`` (processes x gradient-accumulation
steps, as official ``LLaVATrainer`` passes it). Image and text-only samples are
shuffled separately and cut into megabatches; each megabatch is sorted by length
(longest first) and dealt into ``world_size`` per-device batches of balanced
total length; the megabatches are then shuffled together. So a step sees one
modality only (LLaVA-1.5 trains with ``group_by_modality_length``), with little
padding. The last, possibly partial, megabatch of each modality is set aside:
together they fill the first megabatch of the epoch (the one place where
modalities mix) and what remains of them comes last.

Differences from the official code, none of which changes the algorithm:
every random draw comes from one ``torch.Generator`` seeded with
``seed + epoch`` (official code draws from torch's global RNG, so the order
depends on whatever ran before; with ``torch.manual_seed(s)`` before it, its
order equals this one's for ``seed=s, epoch=0``), lengths are validated with a
``ValueError`` instead of ``assert``, and an all-text-only dataset is grouped by
length (official code sorts the negative lengths, i.e. shortest first).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["ModalityLengthGroupedSampler", "length_grouped_indices", "modality_length_grouped_indices",
           "split_to_even_chunks"]


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal ``indices`` into ``num_chunks`` equal-size chunks, each index to the chunk with least total length.

    If they cannot be split evenly, deal them round-robin (as officially).
    """
    if len(indices) % num_chunks:
        return [list(indices[c::num_chunks]) for c in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for i in indices:
        c = totals.index(min(totals))
        chunks[c].append(i)
        totals[c] += lengths[i]
        if len(chunks[c]) == per_chunk:
            totals[c] = float("inf")  # full
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: torch.Generator | None) -> list[int]:
    """A random order of ``range(len(lengths))``, sorted by length within each megabatch and balanced across devices."""
    megabatch = batch_size * world_size
    order = torch.randperm(len(lengths), generator=generator).tolist()
    out = []
    for start in range(0, len(order), megabatch):
        group = sorted(order[start:start + megabatch], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(group, lengths, world_size):
            out += chunk
    return out


def modality_length_grouped_indices(modality_lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: torch.Generator | None) -> list[int]:
    """Official ``get_modality_length_grouped_indices``: a permutation of all indices, see the module docstring.

    ``modality_lengths`` are positive for samples with an image, negative for text-only ones.
    """
    if all(n > 0 for n in modality_lengths) or all(n < 0 for n in modality_lengths):
        return length_grouped_indices([abs(n) for n in modality_lengths], batch_size, world_size, generator)
    image_ids = [i for i, n in enumerate(modality_lengths) if n > 0]
    text_ids = [i for i, n in enumerate(modality_lengths) if n < 0]
    # Draw order (images, text, megabatch shuffle) as officially, so equal seeds give equal orders.
    image_order = [image_ids[j] for j in length_grouped_indices(
        [modality_lengths[i] for i in image_ids], batch_size, world_size, generator)]
    text_order = [text_ids[j] for j in length_grouped_indices(
        [-modality_lengths[i] for i in text_ids], batch_size, world_size, generator)]

    size = batch_size * world_size
    image_megabatches = [image_order[i:i + size] for i in range(0, len(image_order), size)]
    text_megabatches = [text_order[i:i + size] for i in range(0, len(text_order), size)]
    leftover = image_megabatches.pop() + text_megabatches.pop()
    megabatches = image_megabatches + text_megabatches
    megabatches = [megabatches[j] for j in torch.randperm(len(megabatches), generator=generator).tolist()]
    if len(leftover) >= size:
        megabatches.insert(0, leftover[:size])
        leftover = leftover[size:]
    if leftover:
        megabatches.append(leftover)
    return [i for megabatch in megabatches for i in megabatch]


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yield every dataset index once, in modality-pure, length-sorted megabatches (see the module docstring).

    ``modality_lengths`` is ``LlavaSFTDataset.modality_lengths``; ``batch_size``
    is per device and ``world_size`` is processes x gradient-accumulation steps,
    as official ``LLaVATrainer`` passes them. The order is a function of
    ``seed`` and the epoch set by :meth:`set_epoch` (the trainer calls it).
    """

    def __init__(self, modality_lengths: Sequence[int], batch_size: int, world_size: int = 1, *, seed: int = 0):
        lengths = [int(n) for n in modality_lengths]
        if not lengths:
            raise ValueError("modality_lengths is empty")
        zero = [i for i, n in enumerate(lengths) if n == 0]
        if zero:
            raise ValueError(f"modality_lengths must be non-zero (positive: with image, negative: text-only); "
                             f"{len(zero)} are 0, first at index {zero[0]}")
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        self.modality_lengths, self.batch_size, self.world_size = lengths, batch_size, world_size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.modality_lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.modality_lengths, self.batch_size, self.world_size,
                                                    generator))
