"""``train.checkpoint_layers: auto``: recompute only as many decoder layers as the GPU's memory requires.

Checkpointing every layer recomputes about a third of the decoder's work; a GPU with memory to spare
can keep some layers' activations instead. How many depends on the model, the mode, the attention,
the optimizer and each batch's tokens, so it is measured rather than estimated from shapes:

1. The first ``MEASURED_STEPS`` steps checkpoint every layer but the last, the probe. Its forward
   counts the bytes autograd saves for the backward (:func:`saved_bytes`) and the tokens it sees.
2. On a CUDA device the step's peak allocation, and the allocation held as it began (weights,
   optimizer states), are read from torch's allocator; the last measured step is the one used, as
   the optimizer's states exist before it starts.
3. From then on, as each batch enters the decoder, :func:`layers_to_keep` predicts the step's peak
   for its tokens with ``k`` layers kept, and keeps the most that fit ``MEMORY_FRACTION`` of the memory
   torch can use; the first layers are the ones recomputed. A short batch keeps more layers than a
   long one; each rank chooses for its own batch.

Without CUDA there is no allocator to read: every layer stays checkpointed (the behaviour of
``checkpoint_layers: null``), and the log says so.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MEASURED_STEPS = 2
# The share of usable memory a predicted peak may reach: the allocator's fragmentation and the
# prediction's own error (it is linear in tokens; attention kernels may keep a little more) need room.
MEMORY_FRACTION = 0.9


def recompute_first(layers: list[torch.nn.Module], count: int) -> None:
    """Gradient checkpointing for the first ``count`` decoder layers only: transformers reads each layer's own
    ``gradient_checkpointing`` flag at every call, so setting the flags is enough."""
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count


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
    above the measured step's and not to shrink below them: gradients and other fixed costs are
    in it, so the prediction errs high on either side.
    """
    per_token_layer = step.layer_bytes / step.tokens
    rest = step.peak - step.held - step.kept * step.layer_bytes
    return step.held + rest * max(1.0, tokens / step.tokens) + kept * per_token_layer * tokens


def layers_to_keep(step: StepMemory, layers: int, budget: int, tokens: int) -> int:
    """The most layers (0..``layers``) whose activations can be kept for ``tokens`` tokens within ``budget``."""
    if step.tokens <= 0 or tokens <= 0:
        return 0
    base = predicted_peak(step, tokens, 0)
    per_layer = step.layer_bytes / step.tokens * tokens
    if per_layer <= 0:
        return layers if base <= budget else 0
    return max(0, min(layers, math.floor((budget - base) / per_layer)))


class CheckpointFromMemory(TrainerCallback):
    """``train.checkpoint_layers: auto`` (see the module's docstring) over ``decoder``'s ``layers``."""

    def __init__(self, decoder: torch.nn.Module, layers: list[torch.nn.Module]):
        self.decoder, self.layers = decoder, layers
        self.measured: StepMemory | None = None
        self.budget: int | None = None
        self.recomputed: Counter[int] = Counter()  # layers recomputed -> batches, once measured
        self.predicted_peak = 0.0  # the highest predicted for a batch
        self.peak_after: int | None = None
        self._done = False
        self._hook = None
        self._tokens = self._saved = self._held = 0

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
        if self._done:
            return
        self._tokens = self._saved = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._held = torch.cuda.memory_allocated()

    def on_step_end(self, args, state, control, **kwargs):
        if self._done or state.global_step < MEASURED_STEPS:
            return
        self._done = True
        del self._probe.forward  # the instance attribute: the class's forward again
        if not torch.cuda.is_available() or self._tokens == 0:
            recompute_first(self.layers, len(self.layers))
            logger.info("train.checkpoint_layers auto: recomputing every decoder layer (%s)",
                        "no CUDA allocator to measure" if self._tokens else "no forward was measured")
            return
        torch.cuda.synchronize()
        self.measured = StepMemory(held=self._held, peak=torch.cuda.max_memory_allocated(), tokens=self._tokens,
                                   layer_bytes=self._saved)
        free, _ = torch.cuda.mem_get_info()
        self.budget = int(MEMORY_FRACTION * (free + torch.cuda.memory_reserved()))
        gib = 2**30
        logger.info("train.checkpoint_layers auto: a step of %d tokens peaked at %.1f GiB with one layer kept "
                    "(%.2f GiB of activations); %.1f GiB usable: %d of %d layers kept at that length",
                    self._tokens, self.measured.peak / gib, self._saved / gib, self.budget / gib,
                    layers_to_keep(self.measured, len(self.layers), self.budget, self._tokens), len(self.layers))
        self._hook = self.decoder.register_forward_pre_hook(self._choose, with_kwargs=True)
        torch.cuda.reset_peak_memory_stats()  # what the rest of the run reaches, against the prediction

    def _choose(self, module, args, kwargs) -> None:
        """Before the decoder runs a training batch: checkpoint the first layers its tokens need."""
        if not (module.training and torch.is_grad_enabled()):
            return
        embeds = kwargs.get("inputs_embeds")
        shape = (embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)).shape
        self.choose_for(shape[0] * shape[1])

    def choose_for(self, tokens: int) -> int:
        """Set the layers' flags for a batch of ``tokens`` tokens; returns how many are recomputed."""
        keep = layers_to_keep(self.measured, len(self.layers), self.budget, tokens)
        recompute = len(self.layers) - keep
        recompute_first(self.layers, recompute)
        self.recomputed[recompute] += 1
        self.predicted_peak = max(self.predicted_peak, predicted_peak(self.measured, tokens, keep))
        return recompute

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self.peak_after = torch.cuda.max_memory_allocated()
            logger.info("train.checkpoint_layers auto: layers recomputed per batch %s; peak %.1f GiB after the "
                        "measured steps (predicted at most %.1f GiB)", dict(sorted(self.recomputed.items())),
                        self.peak_after / 2**30, self.predicted_peak / 2**30)

    def report(self) -> dict:
        """The choices and what they rest on, in bytes (for benchmarks and logs): ``recomputed_layers``, the
        fewest and most layers recomputed for a batch (every layer without a measurement)."""
        every = len(self.layers)
        out = {"recomputed_layers": [min(self.recomputed, default=every), max(self.recomputed, default=every)]}
        if self.measured is not None:
            out.update(batches_by_recomputed_layers=dict(sorted(self.recomputed.items())),
                       measured=asdict(self.measured), budget=self.budget, predicted_peak=self.predicted_peak,
                       peak_after=self.peak_after)
        return out
