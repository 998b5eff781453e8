"""Triton launch helpers: where the kernels run, and the tables of their multi-tensor launches.

:func:`kernels_for` is the one place that decides between the Triton kernels of
:mod:`.kernels` and the torch ops of the reference paths: the fused steps
(:func:`.fused.supports`) and the batched re-clustering (:mod:`.functional`,
whose functions take that choice as their ``kernels`` argument) both ask it.
The kernels run on a CUDA device with a Triton that builds there, and on any
device under Triton's interpreter (``TRITON_INTERPRET=1``), which runs them on
the host: that is how the CPU test suite runs the kernels.

Imports :mod:`.kernels` (and with it Triton) only when a kernel may run, so a
CPU-only process never imports Triton.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from itertools import accumulate

import torch
from torch import Tensor

__all__ = ["BLOCK", "TensorTable", "aligned", "kernels_for", "tensor_table", "triton_cdiv", "triton_ok"]

BLOCK = 2048


@cache
def triton_ok() -> bool:
    """Whether Triton imports and the kernels build here."""
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception:  # no Triton, or a Triton that cannot build here
        return False
    return True


def _interpreting() -> bool:
    # Triton reads the same variable when it compiles (or, here, interprets) the kernels.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernels_for(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` take the Triton kernels (else the torch ops of the reference paths)."""
    if torch.device(device).type != "cuda" and not _interpreting():
        return False
    return triton_ok()


def triton_cdiv(n: int, block: int) -> int:
    return (n + block - 1) // block


def aligned(addresses) -> bool:
    """Whether every address is a multiple of 16 bytes, so the kernels may load 16 bytes at a time."""
    return all(a % 16 == 0 for a in addresses)


@dataclass(frozen=True)
class TensorTable:
    """What a multi-tensor kernel needs to find its tensor: addresses, sizes, and each program's tensor."""

    addresses: Tensor  # [T, columns] int64: each tensor's data addresses
    numels: Tensor  # [T] int64
    block_tensor: Tensor  # [programs] int32: the tensor each program works on
    first_block: Tensor  # [T] int64: the first program of each tensor
    programs: int


# Device copies by their contents. The sizes of a set of tensors never change, so their program
# tables (large for a big model) are built once; addresses are a few numbers per tensor, and those of
# gradients may move between steps (set_to_none), so a changed set costs one small upload.
_BLOCKS: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor, int]] = OrderedDict()
_ADDRESSES: OrderedDict[tuple, Tensor] = OrderedDict()
_KEPT = 16
_LOCK = threading.Lock()  # SGG's precompilation threads (precompile.py) launch beside the training loop


def _cached(cache: OrderedDict, key: tuple, make):
    with _LOCK:
        value = cache.get(key)
        if value is None:
            value = cache[key] = make()
            while len(cache) > _KEPT:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return value


def _to_device(t: Tensor, device) -> Tensor:
    if torch.device(device).type == "cuda":
        t = t.pin_memory()  # so the copy is asynchronous: no wait for the work queued before it
    return t.to(device, non_blocking=True)


def _blocks(numels: tuple[int, ...], per_program: int, device) -> tuple[Tensor, Tensor, Tensor, int]:
    blocks = [triton_cdiv(n, per_program) for n in numels]
    first = [0, *accumulate(blocks)][:-1]
    # The first-block column starts 16 bytes into the buffer whatever the number of tensors: Triton compiles
    # a variant per pointer alignment, and SGG's precompilation (precompile.py) has fewer tensors.
    start = -(-len(numels) // 2) * 2
    sizes = _to_device(torch.tensor(list(numels) + [0] * (start - len(numels)) + first, dtype=torch.int64), device)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(blocks))
    return sizes[: len(numels)], _to_device(block_tensor, device), sizes[start:], sum(blocks)


def tensor_table(rows: list[tuple[int, ...]], numels: list[int], per_program: int, device) -> TensorTable:
    """The device table of a multi-tensor launch: ``per_program`` elements of one tensor per program."""
    numels = tuple(numels)
    sizes, block_tensor, first_block, programs = _cached(_BLOCKS, (numels, per_program, device),
                                                         lambda: _blocks(numels, per_program, device))
    flat = tuple(x for row in rows for x in row)
    addresses = _cached(_ADDRESSES, (flat, device),
                        lambda: _to_device(torch.tensor(flat, dtype=torch.int64), device).view(len(rows), -1))
    return TensorTable(addresses, sizes, block_tensor, first_block, programs)
