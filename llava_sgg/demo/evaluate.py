"""The demo's evaluation: every benchmark answered by a trained model or an image-blind baseline,
then scored by the project's official scorers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .recipes import DemoSettings, bf16


def _write_lines(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def score_all(data, answers: dict[str, Path], out: Path) -> dict[str, dict]:
    """Every benchmark's official scorer on one set of answer files."""
    from ..evaluation.registry import score

    pope, gqa, mmbench, mme = data.pope, data.gqa, data.mmbench, data.mme
    return {
        "pope": score("pope", ["--answers", str(answers["pope"]), "--questions", str(pope.question_file),
                               "--annotation-dir", str(pope.annotations[0].parent),
                               "--output", str(out / "pope_metrics.json")]),
        "gqa": score("gqa", ["--answers", str(answers["gqa"]), "--questions", str(gqa.annotations[0]),
                             "--output", str(out / "gqa_metrics.json")]),
        "mmbench": score("mmbench", ["--questions", str(mmbench.question_file), "--answers", str(answers["mmbench"]),
                                     "--output", str(out / "mmbench_metrics.json")]),
        "mme": score("mme", ["--answers", str(answers["mme"]), "--mme-root", str(mme.annotations[0]),
                             "--output", str(out / "mme_metrics.json")]),
    }


def evaluation_prompts(data) -> dict:
    """Every benchmark's prompts, as the official question files give them (MMBench: all rotations)."""
    from ..evaluation.generate import mmbench_prompts, question_prompts

    return {
        "pope": question_prompts(data.pope.question_file, data.pope.image_folder),
        "gqa": question_prompts(data.gqa.question_file, data.gqa.image_folder),
        "mmbench": mmbench_prompts(data.mmbench.question_file, rotate_options=True),
        "mme": question_prompts(data.mme.question_file, data.mme.image_folder),
    }


def answering_precision(model, settings: DemoSettings):
    """Answer in the precision the model trained in (bf16 autocast or float32), as fast as training."""
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16(settings))


def answer_benchmarks(model, processor, data, out: Path, settings: DemoSettings, model_id: str) -> dict[str, Path]:
    from ..evaluation.generate import write_answers

    options = {"batch_size": settings.eval_batch_size, "max_new_tokens": settings.max_new_tokens,
               "model_id": model_id}
    jobs = evaluation_prompts(data)
    with answering_precision(model, settings):
        return {name: write_answers(model, processor, prompts, out / f"{name}.jsonl", desc=f"{model_id}: {name}",
                                    **options) for name, prompts in jobs.items()}


def baseline_answers(data, out: Path, kind: str, seed: int = 0) -> dict[str, Path]:
    """Answer files of a model that ignores the image: `chance` (uniform guesses) or `majority`."""
    import random
    from collections import Counter

    from ..evaluation.answers import read_json, read_jsonl_records
    from ..evaluation.generate import mmbench_prompts

    rng = random.Random(seed)

    def line(record, text, **extra):
        return {"question_id": record["question_id"], **extra, "prompt": record["text"], "text": text,
                "answer_id": f"{kind}-{record['question_id']}", "model_id": kind, "metadata": {}}

    gqa_truth = read_json(data.gqa.annotations[0])
    gqa_majority = Counter(q["answer"] for q in gqa_truth.values()).most_common(1)[0][0]
    gqa_vocabulary = sorted({q["answer"] for q in gqa_truth.values()})

    def yes_no():
        return "Yes" if kind == "majority" else rng.choice(["Yes", "No"])

    files = {
        "pope": [line(r, yes_no()) for r in read_jsonl_records(data.pope.question_file)],
        "gqa": [line(r, gqa_majority if kind == "majority" else rng.choice(gqa_vocabulary))
                for r in read_jsonl_records(data.gqa.question_file)],
        "mme": [line(r, yes_no()) for r in read_jsonl_records(data.mme.question_file)],
        "mmbench": [line({"question_id": p.question_id, "text": p.text},
                         "A" if kind == "majority" else rng.choice(p.record["option_char"]), **p.record)
                    for p in mmbench_prompts(data.mmbench.question_file, rotate_options=True)],
    }
    return {name: _write_lines(out / f"{name}.jsonl", records) for name, records in files.items()}
