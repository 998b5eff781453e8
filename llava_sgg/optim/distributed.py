"""SGG on sharded parameters: DTensor helpers, the collectives of the re-clustering, sharded checkpoints.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter, gradient
and optimizer state is a DTensor whose local shard is a slice of the full
tensor. SGG's statistics must be those of the full tensors (the spec's
"Distributed" section), so the re-clustering does three things differently
(docs/sgg.md, "Distributed training"):

- each layer's work row (all its values, or the sample of a large layer) is the
  *full* statistic, all-gathered one batch of layers at a time; k-means, the
  layer mean, group medians and group sizes are then computed from exactly the
  values a single process would see;
- the model-wide median sums its histogram counts across ranks
  (:func:`histogram_reduce`), each element counted once;
- every rank assigns ids to its own shard only, with the common thresholds.

With DDP, or any replicated training, parameters are plain tensors holding the
same values on every rank and nothing here runs: each rank computes what a
single process computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_dtensor", "local", "full", "like", "histogram_piece", "histogram_reduce", "refuse_zero",
           "prepare_state_for_load", "sgg_checkpoint_state", "load_sgg_checkpoint_state"]


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


def refuse_zero(optimizer) -> None:
    """SGG under DeepSpeed ZeRO is refused: its flat partitions cut across layers (docs/sgg.md)."""
    from .sgg import SGG

    if isinstance(optimizer, SGG):
        raise ValueError(
            "SGG cannot run under DeepSpeed ZeRO: ZeRO-2/3 flatten all parameters into one buffer and "
            "partition it across ranks without regard to layer boundaries, so no rank holds a layer's "
            "statistic and SGG's per-layer clusters and medians cannot be formed. Train with FSDP2 instead "
            "(configs/accelerate/fsdp2_*.yaml or train.fsdp), where SGG is exact; plain optimizers "
            "(adamw, adafactor, lamb) work under ZeRO.")


def prepare_state_for_load(optimizer) -> None:
    """Give ``optimizer`` the state entries a sharded checkpoint will fill, so ``state_dict()`` is a template.

    ``torch.distributed.checkpoint.load`` writes into an existing state dict, resharding every
    DTensor to the layout it finds there; a freshly built optimizer has no state yet. This creates
    the base optimizer's state tensors (zeros, laid out like each parameter) and SGG's per-layer
    entries, then::

        prepare_state_for_load(opt)
        sd = {"optim": opt.state_dict()}
        dcp.load(sd, checkpoint_id=path)
        opt.load_state_dict(sd["optim"])

    restores the run on any number of ranks. Layers that the checkpoint had not clustered yet
    come back unclustered (the checkpoint's ``clustered`` mask).
    """
    from .sgg import SGG, _eligible

    sgg = optimizer if isinstance(optimizer, SGG) else None
    base = sgg.optimizer if sgg is not None else optimizer
    steps = sgg._steps if sgg is not None else None
    if steps is None:
        from .sgg import _steps_for

        steps = _steps_for(base)
    for group in base.param_groups:
        for p in group["params"]:
            if base.state.get(p):
                continue
            if steps is None or not hasattr(steps, "init_state"):
                raise NotImplementedError(f"cannot create the state of {type(base).__name__} before its first step")
            if p.grad is None and steps.__name__ == "AdafactorSteps":
                p.grad = torch.zeros_like(p)
                steps.init_state(group, p, base.state[p])
                p.grad = None
            else:
                steps.init_state(group, p, base.state[p])
    if sgg is not None:
        _add_placeholders(sgg)


def _add_placeholders(sgg) -> list[Tensor]:
    """Entries for every eligible layer not clustered yet (scales 1: they step as unclustered)."""
    from .sgg import _eligible

    added = []
    for p in sgg._all_params():
        if _eligible(p) and p not in sgg._layers:
            device = local(p).device
            layer = {"cluster_scales": torch.ones(sgg.n_clusters, device=device)}
            if sgg.assignment == "frozen":
                layer["cluster_ids"] = torch.zeros(local(p).shape, dtype=torch.uint8, device=device)
            else:
                layer["thresholds"] = torch.zeros(sgg.n_clusters - 1, device=device)
            sgg._layers[p] = layer
            sgg._placeholders.add(p)
            added.append(p)
    if added:
        sgg._adam_plan = None  # its scale sources predate these layers
    return added


def sgg_checkpoint_state(sgg) -> dict:
    """SGG's own ``"sgg"`` entry, with an entry for every eligible layer, for ``torch.distributed.checkpoint``.

    DCP loads into a template of fixed keys, so a checkpoint written before a layer's first
    clustering still lists it (its ``clustered`` flag is off). torch's ``get_optimizer_state_dict``,
    which accelerate uses to save FSDP optimizers, keeps only ``state`` and ``param_groups``,
    so the trainer saves this entry next to it.
    """
    added = _add_placeholders(sgg)
    try:
        return sgg.state_dict()["sgg"]
    finally:
        for p in added:
            del sgg._layers[p]
            sgg._placeholders.discard(p)
        sgg._adam_plan = None


def load_sgg_checkpoint_state(sgg, checkpoint_id) -> None:
    """Restore the entry :func:`sgg_checkpoint_state` saved, resharded onto this run's ranks."""
    import torch.distributed.checkpoint as dcp

    prepare_state_for_load(sgg)
    state = sgg.state_dict()
    template = {"sgg": state["sgg"]}
    dcp.load(template, checkpoint_id=str(checkpoint_id))
    state["sgg"] = template["sgg"]
    sgg.load_state_dict(state)
