"""transformers' Trainer, with the optimizer from build_optimizer and LLaVA's modality-grouped sampling.

Checkpoints are Trainer's, written so that each is complete or ignored (checkpoints.py): staged and
renamed when every rank has written, resumed only when nothing the run reads back is missing, and
a finished run resumed trains nothing. A non-finite loss or gradient stops the run before the
optimizer step (guards.py). Everything else (the loop, accumulation, clipping, mixed
precision, logging, multi-GPU launch) is Trainer's own.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import LlavaForConditionalGeneration, Trainer

from ..data import IGNORE_INDEX
from ..optim import SGG, build_optimizer
from ..optim.factory import decays
from ..optim.distributed import refuse_zero
from .checkpoints import (STAGING, CheckpointError, check_resumable, newest_complete, publish, rotate,
                          seal_checkpoint)
from .guards import DivergenceGuard

logger = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"
SGG_CHECKPOINT = "sgg_state"  # folder of a checkpoint holding SGG's sharded entry (FSDP runs)
# What a failed torch.load / safetensors read / load_state_dict raises; re-raised naming the checkpoint file.
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)


def llava_param_groups(model: nn.Module, lr: float, weight_decay: float, mm_projector_lr: float | None) -> list[dict]:
    """Trainable parameters grouped by (projector or not) x (decayed or not).

    LLaVA trains the connector at its own learning rate (mm_projector_lr);
    biases and norm weights never get weight decay.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        projector = PROJECTOR in name and mm_projector_lr is not None
        groups.setdefault((projector, decays(name, p)), []).append(p)
    return [{"params": params, "lr": mm_projector_lr if projector else lr,
             "weight_decay": weight_decay if decay else 0.0}
            for (projector, decay), params in sorted(groups.items())]


def step_decayed(scheduler, every: int, factor: float, floor: float):
    """``scheduler`` (a LambdaLR, as transformers' schedules are) times max(factor ** (step // every), floor).

    ``step`` counts optimizer steps from 1, as SGG counts them: the decay applies from step ``every``
    on, the step at which SGG re-clusters and rescales. The lambdas are closures, so the scheduler's
    state dict (checkpoints) keeps only the step count, as transformers' own schedules do.
    """
    from torch.optim.lr_scheduler import LambdaLR

    if type(scheduler) is not LambdaLR:
        raise ValueError(f"train.lr_step_decay needs a LambdaLR schedule, got {type(scheduler).__name__}")

    def decayed(schedule):
        return lambda index: schedule(index) * max(factor ** ((index + 1) // every), floor)

    optimizer = scheduler.optimizer
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base  # LambdaLR starts from the groups' lr; the inner schedule has already scaled it
    return LambdaLR(optimizer, [decayed(schedule) for schedule in scheduler.lr_lambdas])


def restore_thread_count() -> None:
    """Set torch's intra-op thread count to this thread's own again, for the threads started after this.

    The count is a global that every new thread starts with, and the DataLoader's pin-memory thread sets it
    to 1 for itself. Autograd's device thread starts at the first backward pass, after the first batch, and
    so would run with 1 thread: checkpointed layers recompute their forward there, and torch.compile guards
    on the thread count, so flex_attention (and `train.compile`'s layers) would compile a second time for the
    recomputation, a step nearer dynamo's recompile limit; past it flex_attention falls back to an unfused
    form that holds the whole score matrix.
    """
    torch.set_num_threads(torch.get_num_threads())


class LlavaTrainer(Trainer):
    """Trainer whose optimizer is any :func:`build_optimizer` name, SGG ones included."""

    _saving_checkpoint = False  # while True, Trainer's output dir is the staging folder (_save_checkpoint)
    _sgg_logged = 0  # re-clusterings whose summary has been logged (a resumed run: those of the checkpoint)
    resumed_finished_run = False  # set as training starts: the checkpoint resumed from ends the schedule

    def __init__(self, *args, optimizer_config: dict, mm_projector_lr: float | None = None,
                 modality_lengths: list[int] | None = None, max_bad_steps: int = 0,
                 lr_step_decay: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_step_decay = lr_step_decay
        self.optimizer_config = dict(optimizer_config)
        self.mm_projector_lr = mm_projector_lr
        self.modality_lengths = modality_lengths
        # A non-finite loss or gradient stops the run before the optimizer step (guards.py).
        self.divergence_guard = DivergenceGuard(max_bad_steps)
        self.add_callback(self.divergence_guard)
        self._thread_count_restored = False

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and self.args.bf16 and getattr(plugin, "fsdp_version", 1) == 2:
            # accelerate's bf16 policy also reduces gradients in bf16; DeepSpeed's bf16 mode, which the
            # official recipe uses, reduces them in fp32. Parameters are all-gathered in bf16 for compute,
            # the sharded fp32 masters stay fp32 (accelerate upcasts trainable parameters under FSDP2).
            from torch.distributed.fsdp import MixedPrecisionPolicy

            plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            options = dict(self.optimizer_config)
            name = options.pop("name")
            if self.is_fsdp_enabled and name.startswith("adafactor"):
                raise ValueError(f"optimizer {name!r} cannot run under FSDP2: transformers' Adafactor creates its "
                                 "factored second moments as plain tensors, which do not mix with FSDP2's DTensor "
                                 "parameters. Use adamw or lamb (with or without _sgg) under FSDP2, or DDP.")
            lr = options.pop("lr", self.args.learning_rate)
            weight_decay = options.pop("weight_decay", 0.0)
            groups = llava_param_groups(model or self.model, lr, weight_decay, self.mm_projector_lr)
            self.optimizer = build_optimizer(groups, name, lr=lr, **options)
            if self.is_deepspeed_enabled:
                refuse_zero(self.optimizer)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None or self.lr_step_decay is None:
            return super().create_scheduler(num_training_steps, optimizer)
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = step_decayed(scheduler, **self.lr_step_decay)
        return self.lr_scheduler

    def _sgg(self) -> SGG | None:
        """The SGG inside accelerate's optimizer wrapper, if the run uses one."""
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, SGG):
            optimizer = getattr(optimizer, "optimizer", None)
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        sgg = self._sgg()
        if self.is_fsdp_enabled and sgg is not None:
            # accelerate saves FSDP optimizers through torch's get_optimizer_state_dict, which
            # keeps only "state" and "param_groups": SGG's own entry goes next to it, sharded.
            import torch.distributed.checkpoint as dcp

            dcp.save({"sgg": sgg.checkpoint_state()}, checkpoint_id=str(Path(output_dir) / SGG_CHECKPOINT))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        # check_resumable has made sure the files are there (Trainer would skip absent ones).
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
            sgg = self._sgg()
            if sgg is not None and (Path(checkpoint) / SGG_CHECKPOINT).is_dir():
                sgg.load_checkpoint_state(Path(checkpoint) / SGG_CHECKPOINT)
            if sgg is not None:
                self._sgg_logged = sgg.reclusterings
        except _LOAD_ERRORS as error:
            files = ", ".join(name for name in self._checkpoint_needs()
                              if name not in ("trainer_state.json", self._model_file()))
            raise CheckpointError(f"{checkpoint}: cannot load the optimizer or learning-rate schedule state "
                                  f"({files}): {type(error).__name__}: {error}") from error

    # ---- checkpoints that are complete or ignored (checkpoints.py)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer.train, resuming only from a complete checkpoint that holds all this run reads back.

        ``resume_from_checkpoint`` "last" (or True): the newest complete checkpoint of the output
        folder (newer incomplete ones are skipped and named), or step 0 when there is none yet.
        """
        if resume_from_checkpoint is True or resume_from_checkpoint == "last":
            resume_from_checkpoint = newest_complete(self.args.output_dir)
        if resume_from_checkpoint:
            check_resumable(resume_from_checkpoint, self._checkpoint_needs())
        return super().train(str(resume_from_checkpoint) if resume_from_checkpoint else None, *args, **kwargs)

    def _checkpoint_needs(self) -> dict[str, tuple[str, ...]]:
        """What a resume of this run reads back: the file (or folder) holding each state, with the name
        patterns of its accepted layouts."""
        needs = {"trainer_state.json": ("trainer_state.json",)}  # step, epoch, data position, log
        if self.is_deepspeed_enabled:
            return needs  # DeepSpeed keeps model, optimizer and scheduler in its own global_step*/ layout
        if self.is_fsdp_enabled:  # accelerate's layouts: FULL_STATE_DICT files, or sharded folders
            needs.update({self._model_file(): ("pytorch_model_fsdp*",),
                          "optimizer.bin": ("optimizer.bin", "optimizer_0*")})
        else:
            model = self._model_file()
            needs[model] = (model, "model.safetensors.index.json") if model == "model.safetensors" else (model,)
            needs["optimizer.pt"] = ("optimizer.pt",)  # SGG's cluster ids and scales are in it
        needs["scheduler.pt"] = ("scheduler.pt",)
        if self.is_fsdp_enabled and self.optimizer_config["name"].lower().endswith("_sgg"):
            needs[SGG_CHECKPOINT] = (SGG_CHECKPOINT,)  # SGG's cluster ids and scales, sharded
        return needs

    def _model_file(self) -> str:
        if self.is_fsdp_enabled:
            return "pytorch_model_fsdp.bin"
        if getattr(self.model, "peft_config", None) is not None:
            return "adapter_model.safetensors"
        return "model.safetensors"

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._saving_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written into saving-checkpoint/checkpoint-N and renamed when complete.

        Every rank writes its part (under FSDP2: its shards of the optimizer and of ``sgg_state/``);
        the main process seals the folder only after all have, so ``checkpoint-N/`` never exists in part.
        """
        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)  # what an interrupted save left
        self.accelerator.wait_for_everyone()
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)  # its save_total_limit rotation sees the staging folder only
        finally:
            self._saving_checkpoint = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            seal_checkpoint(run_dir / STAGING / name, self.state.global_step)
            publish(run_dir / STAGING / name, run_dir / name)
            rotate(run_dir, self.args.save_total_limit, keep=run_dir / name)
        self.accelerator.wait_for_everyone()

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs,
                             resume_from_checkpoint, trial):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        self.resumed_finished_run = resume_from_checkpoint is not None and self.state.global_step >= max_steps
        if self.resumed_finished_run:
            # Trainer would go on with the epoch the last step fell in: one more step past the schedule's end.
            logger.warning("%s is step %d of %d: the run is already finished; nothing to train",
                           resume_from_checkpoint, self.state.global_step, max_steps)
            return num_train_epochs, 0  # the epoch loop runs no epoch
        return epochs_trained, steps_trained

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.resumed_finished_run:
            logs = {key: value for key, value in logs.items() if key != "train_loss"}  # 0/0 steps, not a loss
        sgg = self._sgg()
        if sgg is not None and sgg.reclusterings > self._sgg_logged:
            # After each re-clustering the next log carries SGG's state: TensorBoard, W&B (train.report_to)
            # and trainer_state.json's log history get it; save_outputs plots it.
            self._sgg_logged = sgg.reclusterings
            logs = {**logs, **{f"sgg/{key}": value for key, value in sgg.summary().items()}}
        super().log(logs, *args, **kwargs)

    def _get_grad_norm(self, model, grad_norm=None):
        # The norm Trainer computes before every optimizer step, handed to the divergence guard so that it
        # does not read every gradient a second time.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.divergence_guard.observe_grad_norm(grad_norm)
        return grad_norm

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._thread_count_restored:
            restore_thread_count()
            self._thread_count_restored = True
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.divergence_guard.observe_loss(loss)
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        if self._globalstep_last_logged == self.state.global_step:
            # Trainer empties its running loss with `tr_loss -= tr_loss` once logged, which leaves a NaN
            # a NaN: with logging_nan_inf_filter off, a step skipped by train.max_bad_steps would otherwise
            # log NaN at every later step. Just after a log the sum holds nothing yet.
            tr_loss.zero_()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The causal LM loss, with logits computed only where a trained token follows.

        LLaVA trains on answers only: in a batch of multi-turn samples a few percent of
        the positions are answer tokens. The LM head over a 32k-50k vocabulary at every
        other position is most of the head's time and memory for nothing. The model is
        called as usual (so DDP, FSDP and PEFT wrappers see their forward) on the columns
        where any row trains, and a pre-hook on the output embeddings keeps, of those,
        the (row, column) pairs that train: outputs.logits is then (trained tokens,
        vocabulary). Same value as the model's own loss: summed token cross-entropy over
        the trained tokens, divided by their count (across accumulation steps when
        Trainer gives it). The same for a packed batch (data.packing: one row, each
        sample's first label -100), which trains the same tokens.
        """
        labels = inputs["labels"]
        targets = labels[:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        kept = targets[:, keep]
        trained = kept != IGNORE_INDEX

        def trained_rows(module, args):
            return (args[0][trained.to(args[0].device)],) + tuple(args[1:])

        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        hook = head.register_forward_pre_hook(trained_rows)
        try:
            # No KV cache in training: with one (the decoder's config.use_cache is true), transformers
            # would not read a packed batch's restarting position_ids as sample boundaries, and its
            # samples would attend to each other.
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep,
                            use_cache=False)
        finally:
            hook.remove()
        logits = outputs.logits
        loss = nn.functional.cross_entropy(logits.float(), kept[trained].to(logits.device), reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else trained.sum()
        loss = loss / count
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            # num_items_in_batch counts the trained tokens of every process, and DDP / FSDP then
            # average the gradients over the processes: without this factor, N processes x batch b
            # would log 1/N of the loss of one process with batch N*b and clip at N x max_grad_norm.
            # transformers' own compute_loss applies the same factor.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # transformers writes Llava checkpoints in the legacy key layout (language_model.model.*)
        # and maps them back in from_pretrained, but Trainer's resume loads the raw state dict
        # with strict=False, so a full-model resume would silently keep the fresh weights.
        # Load through from_pretrained instead, and insist on every key.
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        plain = isinstance(model, LlavaForConditionalGeneration) and not self.is_deepspeed_enabled \
            and not self.is_fsdp_enabled
        try:
            if not (plain and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            # float32, so the fp32 master weights a checkpoint holds come back bit for bit (load_state_dict
            # copies each tensor into the parameter's own dtype; frozen bf16 weights round-trip exactly).
            loaded = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict(), strict=True)
        except _LOAD_ERRORS as error:  # safetensors' "header too small" names no file
            raise CheckpointError(f"cannot load the model weights {folder / self._model_file()}: "
                                  f"{type(error).__name__}: {error}") from error

    def _get_train_sampler(self, train_dataset=None):
        if self.modality_lengths is None:
            return super()._get_train_sampler(train_dataset)
        from ..data import ModalityLengthGroupedSampler

        # As the official LLaVA trainer: megabatches span every rank and accumulation step.
        return ModalityLengthGroupedSampler(
            self.modality_lengths, batch_size=self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps, seed=self.args.seed)
