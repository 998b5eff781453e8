"""Fitting a recipe's stage-2 steps to a time budget, from costs measured on this machine."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from ..train.run import build_trainer
from .evaluate import answering_precision, evaluation_prompts
from .recipes import OPTIMIZERS, DemoSettings
from .stages import run_config

# plan_steps' floor: the demo would rather run over its budget than not train.
MIN_STEPS = 10
# A measured evaluation is counted at this many times its estimate: the estimate times only two batches,
# and the demo should end within its budget, not just past it.
EVAL_MARGIN = 1.25


def plan_steps(budget: float, elapsed: float, step: float, most: int, *, evaluation: float,
               runs: int = len(OPTIMIZERS)) -> int:
    """Stage-2 steps per run that fit ``budget`` seconds after ``elapsed``: ``runs`` runs and their evaluations.

    ``evaluation``: measured seconds of one model's evaluation (probe_costs).
    At most ``most``; at least MIN_STEPS (or ``most`` if fewer): the demo then runs over budget rather
    than not train.
    """
    left = budget - elapsed - runs * (EVAL_MARGIN * evaluation)
    return min(most, max(MIN_STEPS, int(left / (runs * step))))


def probe_costs(settings: DemoSettings, vision, language_model, data, output: Path, projector) -> tuple[float, float]:
    """Seconds per stage-2 step and seconds to answer every benchmark once, both measured here.

    A throwaway AdamW run times three steps (the first not counted); its model then times the
    evaluation (evaluation_seconds).
    """
    probe = dataclasses.replace(settings, steps=3)
    cfg = run_config(probe, vision, language_model, data, output, "adamw", projector)
    trainer, processor = build_trainer(cfg)
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.time())

    trainer.add_callback(Clock())
    trainer.train()
    step = (times[-1] - times[0]) / (len(times) - 1)
    evaluation = evaluation_seconds(trainer.model.eval(), processor, data, settings)
    shutil.rmtree(output, ignore_errors=True)
    return step, evaluation


def evaluation_seconds(model, processor, data, settings: DemoSettings) -> float:
    """Seconds ``model`` takes to answer every benchmark, from an even sample of two batches of prompts.

    The first batch is a warm-up, not counted; the second's time per prompt, times the prompt count,
    is the estimate. A barely trained model tends to run to ``max_new_tokens`` where trained models
    stop early, so for the probe's model the estimate errs long.
    """
    from ..evaluation.generate import generate

    prompts = [p for group in evaluation_prompts(data).values() for p in group]
    batch = settings.eval_batch_size
    sample = prompts[::max(1, len(prompts) // (2 * batch))][:2 * batch]
    warm, timed = sample[:batch], sample[batch:] or sample[:batch]
    options = {"batch_size": batch, "max_new_tokens": settings.max_new_tokens, "progress": False}
    with answering_precision(model, settings):
        list(generate(model, processor, warm, **options))
        start = time.time()
        list(generate(model, processor, timed, **options))
    return (time.time() - start) / len(timed) * len(prompts)
