"""``train.checkpoint_layers: auto``: recompute only as many decoder layers as the GPU's memory requires.

Checkpointing every layer recomputes about a third of the decoder's work; a GPU with memory to spare
can keep some layers' activations instead. How many depends on the model, the mode, the attention,
the batch and the optimizer, so it is measured rather than estimated from shapes:

1. The first ``MEASURED_STEPS`` steps checkpoint every layer but the last, the probe. Its forward
   counts the bytes autograd saves for the backward (:func:`saved_bytes`) and the tokens it sees.
2. On a CUDA device the step's peak allocation, and the allocation held between steps (weights,
   optimizer states), are read from torch's allocator; the last measured step is the one used, as
   the optimizer's states exist before it starts.
3. :func:`layers_to_keep` then predicts a step's peak for the longest batch the data can give
   (``max_tokens``) with ``k`` layers kept, and keeps the most that fit ``MEMORY_FRACTION`` of the
   memory torch can use. Every rank keeps the fewest any rank can (a collective minimum).

Without CUDA there is no allocator to read: every layer stays checkpointed (the behaviour of
``checkpoint_layers: null``), and the log says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MEASURED_STEPS = 2
# The share of usable memory a predicted peak may reach: the allocator's fragmentation and the
# prediction's own error (it is linear in tokens; attention kernels may keep a little more) need room.
MEMORY_FRACTION = 0.9


def saved_bytes(module: torch.nn.Module, run) -> tuple[object, int]:
    """``run()``'s result and the bytes autograd saved for the backward while it ran, parameters left out.

    Each storage counts once (views of one tensor share it). Parameters are held anyway; what a layer
    that is not recomputed adds is the rest.
    """
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(seen.values())


@dataclass(frozen=True)
class StepMemory:
    """One measured step with every layer but ``kept`` recomputed."""

    held: int  # bytes allocated as the step began (weights, optimizer states)
    peak: int  # the step's peak allocation
    tokens: int  # the most tokens one forward of the step carried
    layer_bytes: int  # what one kept layer saved for those tokens
    kept: int = 1


def predicted_peak(step: StepMemory, tokens: int, kept: int) -> float:
    """A step's peak with ``kept`` layers not recomputed, for ``tokens`` tokens in one forward.

    Everything above ``held`` but the kept layers' activations is taken to grow with the tokens
    (gradients do not; counting them so only over-predicts when ``tokens`` is above the measured).
    """
    per_token_layer = step.layer_bytes / step.tokens
    rest = step.peak - step.held - step.kept * step.layer_bytes
    return step.held + rest * tokens / step.tokens + kept * per_token_layer * tokens


def layers_to_keep(step: StepMemory, layers: int, budget: int, max_tokens: int) -> int:
    """The most layers (0..``layers``) whose activations can be kept at ``max_tokens`` within ``budget``."""
    if step.tokens <= 0:
        return 0
    base = predicted_peak(step, max_tokens, 0)
    per_layer = step.layer_bytes / step.tokens * max_tokens
    if per_layer <= 0:
        return layers if base <= budget else 0
    return max(0, min(layers, math.floor((budget - base) / per_layer)))


def max_batch_tokens(lengths: list[int], batch: int, packing: bool) -> int:
    """The most tokens one forward can carry: the ``batch`` longest samples in one row (packed), or
    ``batch`` rows as long as the longest sample (padded)."""
    if not lengths:
        return 0
    if packing:
        return sum(sorted(lengths, reverse=True)[:batch])
    return batch * max(lengths)


class CheckpointFromMemory(TrainerCallback):
    """``train.checkpoint_layers: auto`` (see the module's docstring)."""

    def __init__(self, layers: list[torch.nn.Module], max_tokens: int):
        self.layers = layers
        self.max_tokens = max_tokens
        self.chosen: int | None = None  # layers recomputed, once decided
        self.measured: StepMemory | None = None
        self.budget = self.predicted_peak = self.peak_after = None
        self._tokens = 0
        self._saved = 0
        self._held = 0

    def on_train_begin(self, args, state, control, **kwargs):
        probe = self.layers[-1]
        for layer in self.layers:
            layer.gradient_checkpointing = layer is not probe
        forward = probe.forward

        def measured_forward(*a, **kw):
            out, saved = saved_bytes(probe, lambda: forward(*a, **kw))
            if torch.is_grad_enabled():
                hidden = a[0] if a else kw["hidden_states"]
                tokens = hidden.shape[0] * hidden.shape[1]
                if tokens > self._tokens:
                    self._tokens, self._saved = tokens, saved
            return out

        # An instance attribute over the class's forward, deleted once measured: the saved-tensor hooks
        # are then active for exactly the layer's own forward.
        probe.forward = measured_forward
        self._probe = probe

    def on_step_begin(self, args, state, control, **kwargs):
        if self.chosen is not None:
            return
        self._tokens = self._saved = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._held = torch.cuda.memory_allocated()

    def on_step_end(self, args, state, control, **kwargs):
        if self.chosen is not None or state.global_step < MEASURED_STEPS:
            return
        del self._probe.forward  # the instance attribute: the class's forward again
        layers = len(self.layers)
        if not torch.cuda.is_available() or self._tokens == 0:
            self._decide(layers, "no CUDA allocator to measure" if self._tokens else "no forward was measured")
            return
        torch.cuda.synchronize()
        self.measured = StepMemory(held=self._held, peak=torch.cuda.max_memory_allocated(), tokens=self._tokens,
                                   layer_bytes=self._saved)
        free, _ = torch.cuda.mem_get_info()
        budget = int(MEMORY_FRACTION * (free + torch.cuda.memory_reserved()))
        keep = layers_to_keep(self.measured, layers, budget, self.max_tokens)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            fewest = torch.tensor(keep, device=torch.cuda.current_device())
            torch.distributed.all_reduce(fewest, op=torch.distributed.ReduceOp.MIN)
            keep = int(fewest)
        self.budget = budget
        self.predicted_peak = predicted_peak(self.measured, self.max_tokens, keep)
        gib = 2**30
        self._decide(layers - keep, f"a measured step of {self._tokens} tokens peaked at "
                     f"{self.measured.peak / gib:.1f} GiB with one layer kept ({self._saved / gib:.2f} GiB); "
                     f"predicted peak {self.predicted_peak / gib:.1f} GiB for batches of up to {self.max_tokens} "
                     f"tokens, {budget / gib:.1f} GiB usable")
        torch.cuda.reset_peak_memory_stats()  # what the rest of the run reaches, against the prediction

    def on_train_end(self, args, state, control, **kwargs):
        if self.predicted_peak is not None:
            self.peak_after = torch.cuda.max_memory_allocated()
            logger.info("train.checkpoint_layers auto: peak %.1f GiB after the choice (predicted at most %.1f GiB)",
                        self.peak_after / 2**30, self.predicted_peak / 2**30)

    def report(self) -> dict:
        """The choice and what it rests on, in bytes (for benchmarks and logs)."""
        out = {"recomputed_layers": self.chosen, "max_tokens": self.max_tokens}
        if self.measured is not None:
            out.update(measured=asdict(self.measured), budget=self.budget,
                       predicted_peak=self.predicted_peak, peak_after=self.peak_after)
        return out

    def _decide(self, recompute: int, why: str) -> None:
        self.chosen = recompute
        for index, layer in enumerate(self.layers):
            layer.gradient_checkpointing = index < recompute
        logger.info("train.checkpoint_layers auto: recomputing %d of %d decoder layers (%s)",
                    recompute, len(self.layers), why)
