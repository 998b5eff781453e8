"""DTensor helpers: SGG's view of sharded parameters, and the collectives of a sharded re-clustering.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter, gradient
and optimizer state is a DTensor whose local shard is a slice of the full
tensor. SGG's statistics must be those of the full tensors (the spec's
"Distributed" section), so the re-clustering does three things differently
(docs/sgg.md, "Distributed training"):

- each layer's work row (all its values, or the sample of a large layer) is the
  *full* statistic, all-gathered one batch of layers at a time (:func:`full`);
  k-means, the layer mean, group medians and group sizes are then computed from
  exactly the values a single process would see;
- the model-wide median sums its histogram counts across ranks
  (:func:`histogram_piece`, :func:`histogram_reduce`), each element counted once;
- every rank assigns ids to its own shard only, with the common thresholds.

With DDP, or any replicated training, parameters are plain tensors holding the
same values on every rank and every helper here passes them through unchanged:
each rank computes what a single process computes.

A leaf: imports nothing of this package.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["is_dtensor", "local", "full", "like", "histogram_piece", "histogram_reduce"]


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view of its storage); a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (an all-gather for a sharded DTensor)."""
    return t.full_tensor() if is_dtensor(t) else t


def like(local_tensor: Tensor, ref: Tensor) -> Tensor:
    """``local_tensor`` (shaped like ``ref``'s shard) as a DTensor laid out like ``ref``; plain if ``ref`` is."""
    if not is_dtensor(ref):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
                              stride=ref.stride())


def _world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def histogram_piece(t: Tensor, flat: Tensor | None = None) -> Tensor:
    """The flat part of ``t`` this rank counts, so that across the world every element is counted once.

    A sharded DTensor's shard is counted by its owner; where the mesh also
    replicates it (HSDP's replicate dimension), the replicas split it further.
    A plain tensor (the same on every rank) is split evenly over the ranks.
    ``flat``: this rank's values of ``t`` already flattened (the local shard, or
    the whole plain tensor), e.g. as float32; the piece is then a view of it.
    """
    rank, world = _world()
    if not is_dtensor(t):
        return (t.reshape(-1) if flat is None else flat).tensor_split(world)[rank]
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if mesh.size() != world:
        raise NotImplementedError("SGG needs every sharded parameter's device mesh to span all ranks "
                                  f"(mesh of {mesh.size()} ranks, world of {world})")
    coords = mesh.get_coordinate()
    replicas, index = 1, 0
    for dim, placement in enumerate(t.placements):
        if not isinstance(placement, Shard):
            replicas, index = replicas * mesh.size(dim), index * mesh.size(dim) + coords[dim]
    return (t.to_local().reshape(-1) if flat is None else flat).tensor_split(replicas)[index]


def histogram_reduce(hist: Tensor) -> Tensor:
    """Sum a histogram of counts over every rank (exact: integer counts)."""
    dist.all_reduce(hist)
    return hist
