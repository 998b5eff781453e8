"""The demo's recipes: what it builds, trains and evaluates (FULL, QUICK, and FULL cut to a CPU's time).

:func:`recipe` picks one for a device; :mod:`.planning` fits a CPU recipe's stage-2 steps to its budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .align import ConnectorAlignment
from .data import DemoDataConfig
from .tower import TowerPretraining

OPTIMIZERS = ("adamw", "adamw_sgg")


@dataclass(frozen=True)
class ConnectorPretraining:
    """LLaVA's stage 1: the connector alone learns the captions (template plain), tower and decoder frozen."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3


@dataclass(frozen=True)
class DemoSettings:
    """One demo recipe. `full` is the README's default; `quick` is a tiny one for the tests."""

    data: DemoDataConfig
    decoder_layers: int | None  # keep SmolLM2's first N decoder layers (None: all 30); 0: tiny decoder from config
    vision: dict  # CLIPVisionConfig fields of the tower built from config
    steps: int
    batch_size: int
    lr: float
    mm_projector_lr: float
    sgg: dict = field(default_factory=lambda: {"n_clusters": 3, "recluster_interval": 25, "beta3": 0.9})
    mode: str = "full"  # full, or lora (LoRA on the decoder; the connector trained fully)
    lora_r: int = 64
    lora_alpha: int = 128
    # train.lr_step_decay of the fine-tuning runs ({every, factor, floor}); None: the cosine schedule alone.
    lr_step_decay: dict | None = None
    # Pretrain the tower on the training scenes first (tower.py) and keep it frozen while fine-tuning, as
    # LLaVA-v1.5 keeps CLIP; None: train the from-config tower along with the connector instead.
    tower: TowerPretraining | None = TowerPretraining()
    # Before stage 1: fit the connector onto the decoder's word embeddings of each patch's digit and
    # place (align.py); None: stage 1 starts from a random connector, as LLaVA's does.
    alignment: ConnectorAlignment | None = None
    # Stage 1 before the two fine-tuning runs, shared by both (as LLaVA's released projector is); None: skip.
    connector: ConnectorPretraining | None = ConnectorPretraining()
    # Trim the decoder's vocabulary to the tokens the demo's texts use (model/vocabulary.py): the same
    # tokens for every text the demo feeds it, 100x fewer embedding rows to train and update.
    trim_vocabulary: bool = True
    eval_batch_size: int = 32
    max_new_tokens: int = 8
    seed: int = 0
    # bf16 autocast; None: where the device computes it natively (see native_bf16).
    bf16: bool | None = None
    # Seconds the whole demo may take: stage 2's steps are cut to fit (plan_steps); None: run ``steps``.
    time_budget: float | None = None


# One 16-px patch per grid cell: each image token sees exactly one whole digit at a fixed place, so the
# tower's pretraining (tower.py) is a per-token digit classification, quick to learn.
VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": 48, "patch_size": 16}
# A truncated SmolLM2 learns where-is-digit questions soon, but questions that match a named digit
# against the image (POPE, MME existence, MMBench options) only after about 1000 full fine-tuning
# steps, and not stably with LoRA (README, "The demo"). So: full fine-tuning at a full-model learning
# rate, about five question-answer turns per scene with a presence pair and a multiple-choice question
# in each. A GPU runs GPU_STEPS; a CPU as many as its time budget allows.
GPU_STEPS = 2500
# CPUs differ too much per step (bf16 matrix units or float32 only) for one step count to suit them
# all: on a CPU stage 2's steps are planned from a step timed here (planning.py) so that the whole
# demo ends within CPU_BUDGET_S, at most CPU_MAX_STEPS.
CPU_BUDGET_S, CPU_MAX_STEPS = 540.0, 400
# Above FULL's longest training conversation with SmolLM2's tokenizer, its image tokens included
# (tests/test_smollm.py checks it): a shorter limit would cut the last turns off conversations.
MAX_LENGTH = 320
FULL = DemoSettings(data=DemoDataConfig(canvas=48, grid=3, digit_size=16, train_scenes=800, eval_scenes=60,
                                        max_turns=6, always_ask=("presence", "multiple_choice")),
                    decoder_layers=4, vision=VISION, steps=GPU_STEPS, batch_size=8, lr=2e-4, mm_projector_lr=1e-3,
                    # The paper's rule: in docs/evidence.md the authors' mean_ratio acts as a stepwise lr decay
                    # and is worse than AdamW on this task; mda is no worse.
                    sgg={"n_clusters": 3, "recluster_interval": 50, "beta3": 0.9, "rule": "mda"}, mode="full",
                    tower=TowerPretraining(position_weight=1.0), alignment=ConnectorAlignment(),
                    connector=ConnectorPretraining(steps=120))
QUICK = DemoSettings(data=DemoDataConfig(train_scenes=16, eval_scenes=6), decoder_layers=0,
                     vision={**VISION, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
                     steps=2, batch_size=4, lr=1e-3, mm_projector_lr=1e-3,
                     tower=TowerPretraining(steps=3, position_weight=1.0), alignment=ConnectorAlignment(steps=2),
                     time_budget=CPU_BUDGET_S,
                     connector=ConnectorPretraining(steps=2, batch_size=4),
                     sgg={"n_clusters": 3, "recluster_interval": 1, "beta3": 0.5, "rule": "mda"}, eval_batch_size=8,
                     max_new_tokens=3)


# LoRA (``--mode lora``): the decoder's Linear layers adapted at rank 64, the connector trained fully.
# Official LLaVA trains LoRA at 10x its full learning rate (2e-4 against 2e-5, r = 128); here 5x the
# full recipe's lr, since the full recipe's own lr is already 10x official LLaVA's.
LORA = {"mode": "lora", "lr": 1e-3}


def with_mode(settings: DemoSettings, mode: str) -> DemoSettings:
    """``settings`` fine-tuning in ``mode``: "full" (as they are) or "lora" (LORA's changes)."""
    if mode == "full":
        return settings
    if mode != "lora":
        raise ValueError(f"demo mode must be full or lora, got {mode!r}")
    return dataclasses.replace(settings, **LORA)


def native_bf16() -> bool:
    """Whether bf16 matrix work is native here: CUDA with bf16, or a CPU that oneDNN runs bf16 on."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a private probe: absent means no
        return False


def bf16(settings: DemoSettings) -> bool:
    return native_bf16() if settings.bf16 is None else settings.bf16


def recipe(quick: bool, gpu: bool, steps: int | None = None) -> DemoSettings:
    """QUICK; FULL on a GPU; on a CPU, FULL within CPU_BUDGET_S and without the captions stage.

    On a CPU the alignment alone makes the connector (align.py): the captions stage costs as much per
    step as fine-tuning. ``steps`` fixes stage 2's step count (no time budget).
    """
    if quick:
        settings = QUICK
    elif gpu:
        settings = FULL
    else:
        settings = dataclasses.replace(FULL, steps=CPU_MAX_STEPS, connector=None, time_budget=CPU_BUDGET_S)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"demo steps must be a positive integer, got {steps!r}")
        settings = dataclasses.replace(settings, steps=steps, time_budget=None)
    return settings
