"""Sharded and ZeRO training entry points that take an optimizer of any kind, SGG or not.

How SGG itself stays exact on sharded parameters is in :mod:`.dtensor` (the
helpers and collectives of a sharded re-clustering) and in SGG's public
checkpoint methods (:meth:`.SGG.prepare_state_for_load`,
:meth:`.SGG.checkpoint_state`, :meth:`.SGG.load_checkpoint_state`). This module
adds what the trainer and a resuming script call without knowing whether the
optimizer is an SGG: the refusal of DeepSpeed ZeRO, and the load template of a
sharded checkpoint. It imports :mod:`.sgg`; nothing of this package imports it.
"""

from __future__ import annotations

from torch.optim import Optimizer

from .sgg import SGG, steps_for
from .steps import create_state

__all__ = ["prepare_state_for_load", "refuse_zero"]


def refuse_zero(optimizer: Optimizer) -> None:
    """SGG under DeepSpeed ZeRO is refused: its flat partitions cut across layers (docs/sgg.md)."""
    if isinstance(optimizer, SGG):
        raise ValueError(
            "SGG cannot run under DeepSpeed ZeRO: ZeRO-2/3 flatten all parameters into one buffer and "
            "partition it across ranks without regard to layer boundaries, so no rank holds a layer's "
            "statistic and SGG's per-layer clusters and medians cannot be formed. Train with FSDP2 instead "
            "(configs/accelerate/fsdp2_*.yaml or train.fsdp), where SGG is exact; plain optimizers "
            "(adamw, adafactor, lamb) work under ZeRO.")


def prepare_state_for_load(optimizer: Optimizer) -> None:
    """Give ``optimizer`` the state entries a sharded checkpoint will fill, so ``state_dict()`` is a template.

    ``torch.distributed.checkpoint.load`` writes into an existing state dict, resharding every
    DTensor to the layout it finds there; a freshly built optimizer has no state yet. This creates
    the base optimizer's state tensors (zeros, laid out like each parameter) and, for an SGG, its
    per-layer entries (:meth:`.SGG.prepare_state_for_load`), then::

        prepare_state_for_load(opt)
        sd = {"optim": opt.state_dict()}
        dcp.load(sd, checkpoint_id=path)
        opt.load_state_dict(sd["optim"])

    restores the run on any number of ranks. Layers that the checkpoint had not clustered yet
    come back unclustered (the checkpoint's ``clustered`` mask).
    """
    if isinstance(optimizer, SGG):
        optimizer.prepare_state_for_load()
    else:
        create_state(optimizer, steps_for(optimizer))
