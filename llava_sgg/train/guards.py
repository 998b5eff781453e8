"""Divergence stops the run: a non-finite loss or gradient never reaches the weights.

Trainer on its own logs a NaN loss as 0.0 (``logging_nan_inf_filter``), steps the optimizer
with NaN gradients and saves the NaN weights as a checkpoint and as the final model, exit 0;
"loss 0" is the failure official LLaVA users report most. :class:`DivergenceGuard` checks each
optimizer step before the optimizer sees it:

- the loss of every micro-batch of the step (fed by ``LlavaTrainer.training_step``) and the norm of
  every gradient the optimizer would apply must be finite (after clipping, which turns a NaN or
  infinite total norm into NaN gradients); else the run stops with :class:`DivergenceError` naming
  the step, or, while fewer than ``max_bad_steps`` steps were skipped, the step is skipped;
- every weight must be finite when training starts (a resumed checkpoint with damaged weights),
  and the trained ones before every checkpoint save, so no checkpoint or final model holds NaN.

The logs show NaN as NaN: run.py turns ``logging_nan_inf_filter`` off, and LlavaTrainer empties
Trainer's running loss after each log (``tr_loss -= tr_loss`` keeps a NaN).

A skipped step is one in which no weight moves: the gradients are dropped (set to None, which
every optimizer here skips, so moments and per-tensor step counts stay as they were); Trainer's
step count, the data position and the learning-rate schedule advance as for any step, and so
does SGG's step count, so its re-clustering stays on Trainer's steps (one due on a skipped step
has nothing to cluster and waits for the next interval).

Under DDP and FSDP2 every rank takes the same decision: the flags are summed over the ranks
(the loss differs per rank; FSDP2's gradients are shards), one small all-reduce per step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..optim.dtensor import local
from .checkpoints import CheckpointError, newest_complete

logger = logging.getLogger(__name__)


class DivergenceError(ValueError):
    """Training met a non-finite loss, gradient or weight; the message names the step and what to resume from."""


def nonfinite_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """A bool per tensor, on ``device``, without a host sync: is its 2-norm NaN or infinite? (A DTensor: its
    local shard's.)

    True for a tensor with a NaN or an infinity, or one whose sum of squares overflows, as Trainer's logged
    grad norm does. One read of each tensor, as that norm, where ``isfinite(t).all()`` would write a
    boolean copy of every tensor first.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return ~torch.isfinite(torch.stack([torch.linalg.vector_norm(local(t)).to(device) for t in tensors]))


def _summed_over_ranks(values: Tensor) -> Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values)
    return values


def _trained(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class DivergenceGuard(TrainerCallback):
    """Stops the run at the first non-finite loss or gradient, after skipping up to ``max_bad_steps`` such steps."""

    def __init__(self, max_bad_steps: int = 0):
        self.max_bad_steps = max_bad_steps
        self.skipped: list[int] = []  # the steps skipped in this process (a resumed run counts afresh)
        self._loss: Tensor | None = None  # sum of this step's micro-batch losses, kept on the device
        self._grad_norm: Tensor | float | None = None  # Trainer's global norm of this step's gradients
        self._resumed_at = 0  # the step training (re)started from

    def observe_loss(self, loss: Tensor) -> None:
        """Called with each micro-batch's loss; a NaN or infinity anywhere makes the sum non-finite."""
        loss = loss.detach().float().sum()
        self._loss = loss if self._loss is None else self._loss + loss

    def observe_grad_norm(self, norm: Tensor | float) -> None:
        """Called with the gradient norm Trainer computes (and clips with) before the optimizer step."""
        self._grad_norm = norm

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._loss, self._grad_norm, self.skipped, self._resumed_at = None, None, [], state.global_step
        if state.global_step == 0:
            where = "before the first step: the model files the config names are damaged"
        else:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            source = str(folder) if folder.is_dir() else f"the checkpoint of step {state.global_step}"
            where = (f"as loaded from {source}: it is damaged or was saved after divergence; resume from an "
                     "earlier checkpoint (train.resume_from_checkpoint=FOLDER) or start again")
        # Every weight, frozen ones included: a full checkpoint restores the frozen vision tower too.
        weights = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        self._check_weights(args, weights, "the weights", lambda: f"{where}.")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        loss = self._loss if self._loss is not None else torch.zeros((), device=args.device)
        self._loss = None
        if self._grad_norm is not None:  # Trainer's norm, the same on every rank: no second pass over the gradients
            bad_grads = ~torch.isfinite(torch.as_tensor(self._grad_norm, dtype=torch.float32, device=loss.device))
        else:  # a Trainer that does not report its norm
            bad_grads = nonfinite_norms([p.grad for _, p in _trained(model) if p.grad is not None], loss.device).any()
        self._grad_norm = None
        flags = torch.stack([loss, bad_grads.float()])
        loss_value, bad_grads = _summed_over_ranks(flags).tolist()
        problems = ([] if math.isfinite(loss_value) else [f"the loss is {loss_value}"]) \
            + (["the gradient norm is not finite"] if bad_grads else [])
        if not problems:
            return
        what = " and ".join(problems)
        if len(self.skipped) >= self.max_bad_steps:
            skipped = f" (train.max_bad_steps={self.max_bad_steps}: skipped steps {self.skipped})" \
                if self.max_bad_steps else ""
            first = (f" It is the first step after resuming at step {self._resumed_at}: if that checkpoint's weights "
                     "are damaged, resume from an earlier one." if self._resumed_at and step == self._resumed_at + 1
                     else "")
            raise DivergenceError(f"training diverged at step {step}: {what}{skipped}. The weights were not updated "
                                  f"with it and nothing was saved after step {step - 1}.{first} {_resume_hint(args)}")
        self.skipped.append(step)
        model.zero_grad(set_to_none=True)  # the optimizer then moves no weight and keeps its moments
        logger.warning("step %d: %s; skipping it, %d of train.max_bad_steps=%d", step, what, len(self.skipped),
                       self.max_bad_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:  # DefaultFlowCallback, which runs before this callback, has decided
            self._check_weights(args, _trained(model), "the trained weights",
                                lambda: f"after step {state.global_step}, although its loss and gradients were "
                                        f"finite; checkpoint-{state.global_step} and the final model were not "
                                        f"written. " + _resume_hint(args))

    def _check_weights(self, args, weights: list[tuple[str, Tensor]], which: str, when: Callable[[], str]) -> None:
        """DivergenceError if the norm of any of ``weights`` is not finite on any rank.

        ``when`` makes the message's end, only for an error: the resume hint looks for checkpoints, and
        logs when there is none."""
        bad = nonfinite_norms([p for _, p in weights], args.device)
        if not _summed_over_ranks(bad.any().float().reshape(1)).item():
            return
        names = [name for (name, _), flag in zip(weights, bad.tolist()) if flag]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        rank = " on this rank" if args.world_size > 1 else ""
        at_fault = f" ({', '.join(names[:3])}{more}{rank})" if names else ""
        raise DivergenceError(f"{which} hold NaN, infinite or overflowing values{at_fault} "
                              f"{when()}")


def _resume_hint(args) -> str:
    try:  # the checkpoint resume_from_checkpoint=last would take
        last = newest_complete(args.output_dir) if Path(args.output_dir).is_dir() else None
    except CheckpointError:
        last = None
    fixes = ("lowering optimizer.lr (or clipping with train.max_grad_norm > 0, or letting train.max_bad_steps "
             "skip a few such steps)")
    if last is None:
        return f"No checkpoint was saved before it: start again after {fixes}."
    return f"The last checkpoint is {last}: resume with train.resume_from_checkpoint=last after {fixes}."
