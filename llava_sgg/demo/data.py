"""A deterministic multimodal demo dataset made from real images that ship with scikit-learn.

A scene is a black canvas holding a few of scikit-learn's handwritten digits (``load_digits()``:
1797 real 8x8 scans, labels 0-9, inside the package: no download) in the cells of a 3x3 grid. One
build writes LLaVA-v1.5's training format and four benchmarks in the file layouts of LLaVA-v1.5's
evaluation (``playground/data/eval/...`` in the official repository), so the offline demo trains and
scores through the same file formats as the real benchmarks::

    digits-v2-<config hash>/
      pretrain.json                                 stage-1 captions (LLaVA's pretraining format), train images
      train.json                                    LLaVA SFT list; "image" is relative to images/
      images/train/train_00000.png ...
      images/eval/eval_00000.png ...                POPE and GQA read their images here
      scenes.json                                   ground truth: digits, cells, source indices per image
      eval/pope/llava_pope_test.jsonl
      eval/pope/coco/coco_pope_{random,popular,adversarial}.json
      eval/gqa/llava_gqa_testdev_balanced.jsonl
      eval/gqa/data/testdev_balanced_questions.json
      eval/mmbench/mmbench_dev_en.tsv               images inline, base64 PNG
      eval/MME/llava_mme.jsonl
      eval/MME/MME_Benchmark_release_version/{existence,count}/eval_00000.{png,txt} ...
      manifest.json                                 written last: config, source indices, counts, sha256s

Decisions:

* Digit labels within a scene are distinct, so "Is there a 7 in the image?" and "What digit is in
  the top left?" have exactly one answer and POPE's negatives are well defined.
* Train and eval scenes draw their digits from disjoint pools of the 1797 scans (a seeded
  permutation), so evaluation measures recognition of unseen handwriting, not memorised images. A
  scan may appear in several scenes of its own split.
* Each random decision has its own stream (``numpy.random.default_rng([seed, stream])``), so e.g.
  asking for more train scenes leaves the eval scenes and questions unchanged.
* Prompts are exactly what LLaVA-v1.5's evaluation feeds the model, and train.json asks the same
  questions in the same words, so the answer vocabulary a model learns is the one it is scored on:
  digits "0"-"9" (position, counting), "Yes"/"No" (presence, count check; the POPE and MME scorers
  are case-insensitive), "3, 7" (listing) and "A"-"D" (multiple choice).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..evaluation.prompts import MME_SUFFIX, OPTION_LETTER, OPTION_LETTERS, SHORT_ANSWER

__all__ = [
    "DemoData", "DemoDataConfig", "EvalFiles", "PRETRAIN_PROMPT", "Scene", "build_demo_data", "caption",
    "config_hash", "count_check_question",
    "digit_statistics", "multiple_choice_prompt", "pope_negatives", "position_name", "position_question",
    "presence_question", "render_scene", "sample_scenes", "split_source_indices",
]

FORMAT = "digits-v2"  # the folder prefix; bump it when the files written change so old folders are not reused
N_LABELS = 10
SOURCE = "sklearn_digits"  # MMBench's "source" column

COUNT_QUESTION = "How many digits are in the image?"
LISTING_QUESTION = "Which digits are in the image?"

POPE_CATEGORIES = ("random", "popular", "adversarial")
MME_SUBTASKS = ("existence", "count")
MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")
# MMBench's own ability names: reading the digit at a place is single-instance perception,
# counting relates all instances.
MMBENCH_L2 = {"digit_recognition": "finegrained_perception (instance-level)",
              "counting": "finegrained_perception (cross-instance)"}

# Row and column names per grid size; position questions need a name for every cell.
POSITION_NAMES = {2: (("top", "bottom"), ("left", "right")),
                  3: (("top", "middle", "bottom"), ("left", "center", "right"))}

# One stream per random decision (see the module docstring).
_STREAMS = {"split": 0, "train_scenes": 1, "eval_scenes": 2, "train_questions": 3, "pope": 4, "mmbench": 5,
            "mme": 6}


@dataclass(frozen=True)
class DemoDataConfig:
    """What to build; every field is part of the folder's hash."""

    seed: int = 0
    canvas: int = 64            # square scene size in pixels
    grid: int = 3               # digits sit in cells of a grid x grid layout
    digit_size: int = 16        # each 8x8 digit is upscaled (nearest) to this size
    min_digits: int = 1
    max_digits: int = 3
    train_scenes: int = 600
    eval_scenes: int = 120
    eval_fraction_of_digits: float = 0.2   # share of the 1797 source digits reserved for eval scenes
    max_turns: int = 3          # question-answer turns per training scene: 1..max_turns, distinct types
    # Question types asked of every training scene on top of the random ones (each at most once;
    # "presence" asks twice, about a present and an absent digit), to weight the mix toward a skill.
    always_ask: tuple[str, ...] = ()

    def __post_init__(self):
        problems = []
        if not 1 <= self.max_turns <= 6:
            problems.append(f"max_turns must be in [1, 6] (six question types), got {self.max_turns}")
        unknown = [kind for kind in self.always_ask if kind not in TRAIN_QUESTIONS]
        if unknown or len(set(self.always_ask)) != len(self.always_ask):
            problems.append(f"always_ask must hold distinct question types among {', '.join(TRAIN_QUESTIONS)}; "
                            f"got {list(self.always_ask)}")
        if self.grid not in POSITION_NAMES:
            problems.append(f"grid must be one of {sorted(POSITION_NAMES)} (cells need names), got {self.grid}")
        elif not 1 <= self.digit_size <= self.canvas // self.grid:
            problems.append(f"digit_size must be in [1, canvas // grid = {self.canvas // self.grid}], "
                            f"got {self.digit_size}")
        # Labels are distinct and POPE asks one absent digit per present one: at most 5 of 10 digits.
        most = min(self.grid ** 2, N_LABELS // 2)
        if not 1 <= self.min_digits <= self.max_digits <= most:
            problems.append(f"need 1 <= min_digits <= max_digits <= {most}, got {self.min_digits} and "
                            f"{self.max_digits}")
        if self.train_scenes < 1 or self.eval_scenes < 1:
            problems.append(f"train_scenes and eval_scenes must be >= 1, got {self.train_scenes} and "
                            f"{self.eval_scenes}")
        if not 0 < self.eval_fraction_of_digits < 1:
            problems.append(f"eval_fraction_of_digits must be in (0, 1), got {self.eval_fraction_of_digits}")
        if problems:
            raise ValueError("invalid DemoDataConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class Scene:
    """One image: distinct digit labels in reading order, their cells and the scans drawn."""

    image: str                  # file name, e.g. "eval_00003.png"
    digits: tuple[int, ...]     # labels, in reading order (ascending cell)
    cells: tuple[int, ...]      # row * grid + column, ascending
    sources: tuple[int, ...]    # indices into load_digits() of the scan drawn for each digit

    @property
    def id(self) -> str:
        return self.image.rsplit(".", 1)[0]

    def absent(self) -> list[int]:
        return [d for d in range(N_LABELS) if d not in self.digits]


@dataclass(frozen=True)
class EvalFiles:
    """One benchmark: what LLaVA's answering script reads, and what its scorer compares against."""

    question_file: Path
    annotations: tuple[Path, ...]   # the files (or, for MME, the folder) the official scorer reads
    image_folder: Path | None       # None: images inline (MMBench's base64 column)


@dataclass(frozen=True)
class DemoData:
    """Where a finished build is; ``counts`` are scenes and questions per file."""

    root: Path              # the build folder, digits-v2-<hash>
    train_json: Path
    pretrain_json: Path     # stage-1 captions of the training scenes
    image_folder: Path      # what train.json's "image" paths are relative to
    scenes_json: Path
    pope: EvalFiles
    gqa: EvalFiles
    mmbench: EvalFiles
    mme: EvalFiles
    counts: dict[str, int]


# --- scenes ---------------------------------------------------------------------------------------

def config_hash(config: DemoDataConfig) -> str:
    """12 hex digits naming the build folder: equal configs share a folder, any change gets a new one."""
    text = json.dumps(asdict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _rng(config: DemoDataConfig, stream: str) -> np.random.Generator:
    return np.random.default_rng([config.seed, _STREAMS[stream]])


def split_source_indices(labels: np.ndarray, config: DemoDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train pool, eval pool): disjoint sorted indices of the source scans, the eval pool the configured share."""
    order = _rng(config, "split").permutation(len(labels))
    n_eval = round(config.eval_fraction_of_digits * len(labels))
    train_pool, eval_pool = np.sort(order[n_eval:]), np.sort(order[:n_eval])
    for name, pool in (("train", train_pool), ("eval", eval_pool)):
        missing = sorted(set(range(N_LABELS)) - set(labels[pool].tolist()))
        if missing:
            raise ValueError(f"eval_fraction_of_digits={config.eval_fraction_of_digits} leaves the {name} pool "
                             f"without any scan of digit(s) {missing}")
    return train_pool, eval_pool


def sample_scenes(split: str, n: int, pool: np.ndarray, labels: np.ndarray, config: DemoDataConfig,
                  rng: np.random.Generator) -> list[Scene]:
    """``n`` scenes named ``{split}_00000.png`` ...: k distinct labels in k distinct cells, scans from ``pool``."""
    by_label = [pool[labels[pool] == d] for d in range(N_LABELS)]
    scenes = []
    for i in range(n):
        k = int(rng.integers(config.min_digits, config.max_digits + 1))
        cells = np.sort(rng.choice(config.grid ** 2, size=k, replace=False))
        digits = rng.choice(N_LABELS, size=k, replace=False)
        sources = [int(rng.choice(by_label[d])) for d in digits]
        scenes.append(Scene(f"{split}_{i:05d}.png", tuple(int(d) for d in digits), tuple(int(c) for c in cells),
                            tuple(sources)))
    return scenes


def render_scene(digit_images: Sequence[np.ndarray], cells: Sequence[int], config: DemoDataConfig) -> np.ndarray:
    """A (canvas, canvas, 3) uint8 scene: each 8x8 scan (values 0..16) grey on black, centred in its cell.

    Nearest upscaling keeps the scan's real pixels (no interpolated greys a model could key on), and
    the grid is centred on the canvas when ``canvas`` is not a multiple of ``grid``.
    """
    cell_size = config.canvas // config.grid
    margin = (config.canvas - cell_size * config.grid) // 2
    offset = (cell_size - config.digit_size) // 2
    nearest = np.arange(config.digit_size) * 8 // config.digit_size
    canvas = np.zeros((config.canvas, config.canvas), dtype=np.uint8)
    for image, cell in zip(digit_images, cells):
        grey = np.rint(np.asarray(image, dtype=np.float64) * (255 / 16)).astype(np.uint8)
        row, column = divmod(int(cell), config.grid)
        top, left = margin + row * cell_size + offset, margin + column * cell_size + offset
        canvas[top:top + config.digit_size, left:left + config.digit_size] = grey[np.ix_(nearest, nearest)]
    return np.repeat(canvas[:, :, None], 3, axis=2)


def _png(array: np.ndarray) -> bytes:
    # PIL writes no timestamp; fixed settings make the bytes a function of the pixels (and zlib).
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=9, optimize=False)
    return buffer.getvalue()


# --- questions ------------------------------------------------------------------------------------

def position_name(cell: int, grid: int) -> str:
    """"top left", "middle center", "bottom right", ... (row name, then column name)."""
    rows, columns = POSITION_NAMES[grid]
    row, column = divmod(cell, grid)
    return f"{rows[row]} {columns[column]}"


def position_question(cell: int, grid: int) -> str:
    return f"What digit is in the {position_name(cell, grid)}?"


def presence_question(digit: int) -> str:
    return f"Is there {'an' if digit == 8 else 'a'} {digit} in the image?"


def count_check_question(count: int) -> str:
    """The yes/no form of counting that MME's ``count`` subtask asks."""
    return "Is there 1 digit in the image?" if count == 1 else f"Are there {count} digits in the image?"


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """Exactly what LLaVA's model_vqa_mmbench builds (no hint, --single-pred-prompt)."""
    lines = [question] + [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options)]
    return "\n".join(lines + [OPTION_LETTER])


def _position_choice(scene: Scene, config: DemoDataConfig, rng) -> tuple[str, list[str], str]:
    j = int(rng.integers(len(scene.cells)))
    correct = scene.digits[j]
    # The scene's other digits come first among the distractors: answering then needs the position,
    # not only recognising which digits are present.
    others = [int(d) for d in rng.permutation([d for d in scene.digits if d != correct])][:3]
    others += [int(d) for d in rng.choice(scene.absent(), size=3 - len(others), replace=False)]
    options = [int(d) for d in rng.permutation([correct] + others)]
    letter = OPTION_LETTERS[options.index(correct)]
    return position_question(scene.cells[j], config.grid), [str(d) for d in options], letter


def _count_choice(scene: Scene, config: DemoDataConfig, rng) -> tuple[str, list[str], str]:
    # Four consecutive counts around the true one, shuffled so the answer letter is uniform.
    count = len(scene.digits)
    start = int(rng.integers(max(1, count - 3), count + 1))
    options = [int(c) for c in rng.permutation(np.arange(start, start + 4))]
    return COUNT_QUESTION, [str(c) for c in options], OPTION_LETTERS[options.index(count)]


def _wrong_count(scene: Scene, config: DemoDataConfig, rng) -> int:
    return int(rng.choice([c for c in range(1, config.max_digits + 2) if c != len(scene.digits)]))


def _yes_no(answer: bool) -> str:
    return "Yes" if answer else "No"


def _ask_count(scene, config, rng):
    return f"{COUNT_QUESTION}\n{SHORT_ANSWER}", str(len(scene.digits))


def _ask_count_check(scene, config, rng):
    count = len(scene.digits) if rng.random() < 0.5 else _wrong_count(scene, config, rng)
    return f"{count_check_question(count)}\n{SHORT_ANSWER}", _yes_no(count == len(scene.digits))


def _ask_presence(scene, config, rng):
    # Balanced: half the questions ask about a present digit.
    digit = int(rng.choice(scene.digits if rng.random() < 0.5 else scene.absent()))
    return f"{presence_question(digit)}\n{SHORT_ANSWER}", _yes_no(digit in scene.digits)


def _ask_position(scene, config, rng):
    j = int(rng.integers(len(scene.cells)))
    return f"{position_question(scene.cells[j], config.grid)}\n{SHORT_ANSWER}", str(scene.digits[j])


def _ask_listing(scene, config, rng):
    return f"{LISTING_QUESTION}\n{SHORT_ANSWER}", ", ".join(map(str, scene.digits))


def _ask_multiple_choice(scene, config, rng):
    question, options, letter = (_position_choice if rng.random() < 0.5 else _count_choice)(scene, config, rng)
    return multiple_choice_prompt(question, options), letter


# Train question types: name -> (scene, config, rng) -> (prompt, answer).
TRAIN_QUESTIONS: dict[str, Callable] = {
    "count": _ask_count, "count_check": _ask_count_check, "presence": _ask_presence, "position": _ask_position,
    "listing": _ask_listing, "multiple_choice": _ask_multiple_choice,
}


PRETRAIN_PROMPT = "Describe the digits in the image and where they are."


def caption(scene: Scene, config: DemoDataConfig) -> str:
    """The stage-1 caption: every digit with its place, in reading order ("7 in the top left, 3 in the ...")."""
    return ", ".join(f"{d} in the {position_name(c, config.grid)}" for d, c in zip(scene.digits, scene.cells))


def _pretrain_sample(scene: Scene, config: DemoDataConfig) -> dict:
    # LLaVA's 558K pretraining records: one instruction holding the placeholder, one caption. The
    # "plain" template used in stage 1 keeps only the placeholder and the caption.
    return {"id": scene.id, "image": f"train/{scene.image}",
            "conversations": [{"from": "human", "value": f"<image>\n{PRETRAIN_PROMPT}"},
                              {"from": "gpt", "value": caption(scene, config)}]}


def _presence_pair(scene, config, rng) -> list[tuple[str, str]]:
    """Two presence questions, about one present and one absent digit, in random order."""
    digits = [int(rng.choice(scene.digits)), int(rng.choice(scene.absent()))]
    order = rng.permutation(2)
    return [(f"{presence_question(digits[k])}\n{SHORT_ANSWER}", _yes_no(k == 0)) for k in order]


def _train_sample(scene: Scene, config: DemoDataConfig, rng) -> dict:
    kinds = rng.choice(list(TRAIN_QUESTIONS), size=int(rng.integers(1, config.max_turns + 1)), replace=False)
    turns = [(str(kind), None) for kind in kinds if kind not in config.always_ask]
    for kind in config.always_ask:
        turns += [(kind, qa) for qa in _presence_pair(scene, config, rng)] if kind == "presence" else [(kind, None)]
    conversations = []
    for k in rng.permutation(len(turns)):
        kind, qa = turns[k]
        prompt, answer = qa or TRAIN_QUESTIONS[kind](scene, config, rng)
        # LLaVA-v1.5's mix puts the image placeholder at the start of the first question.
        conversations += [{"from": "human", "value": ("<image>\n" if not conversations else "") + prompt},
                          {"from": "gpt", "value": answer}]
    return {"id": scene.id, "image": f"train/{scene.image}", "conversations": conversations}


# --- POPE -----------------------------------------------------------------------------------------

def digit_statistics(scenes_digits: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(frequency[d]: scenes holding d, cooccurrence[a, b]: scenes holding both a != b), over the given scenes."""
    frequency = np.zeros(N_LABELS, dtype=np.int64)
    cooccurrence = np.zeros((N_LABELS, N_LABELS), dtype=np.int64)
    for digits in scenes_digits:
        present = sorted(set(digits))
        frequency[present] += 1
        for a in present:
            for b in present:
                if a != b:
                    cooccurrence[a, b] += 1
    return frequency, cooccurrence


def pope_negatives(present: Sequence[int], category: str, frequency: np.ndarray, cooccurrence: np.ndarray,
                   rng: np.random.Generator) -> list[int]:
    """As many absent digits as ``present`` has, chosen by POPE's rule for ``category``.

    random: drawn uniformly; popular: most frequent over the eval scenes; adversarial: co-occurring
    most often with the present digits (then most frequent). Ties go to the smaller digit.
    """
    absent = [d for d in range(N_LABELS) if d not in present]
    n = len(present)
    if category == "random":
        return [int(d) for d in rng.choice(absent, size=n, replace=False)]
    if category == "popular":
        return sorted(absent, key=lambda d: (-frequency[d], d))[:n]
    if category == "adversarial":
        together = cooccurrence[list(present)].sum(axis=0)
        return sorted(absent, key=lambda d: (-together[d], -frequency[d], d))[:n]
    raise ValueError(f"unknown POPE category {category!r}; choose one of: {', '.join(POPE_CATEGORIES)}")


def _pope(scenes: list[Scene], rng) -> tuple[list[dict], dict[str, list[dict]]]:
    frequency, cooccurrence = digit_statistics([s.digits for s in scenes])
    questions, annotations, question_id = [], {c: [] for c in POPE_CATEGORIES}, 0
    # Category blocks in annotation-file order: LLaVA's eval_pope.py pairs a category's answers with
    # its annotation lines by position, and needs question ids unique across categories.
    for category in POPE_CATEGORIES:
        for scene in scenes:
            negatives = pope_negatives(scene.digits, category, frequency, cooccurrence, rng)
            for positive, negative in zip(scene.digits, negatives):
                for digit, label in ((positive, "yes"), (negative, "no")):
                    question_id += 1
                    text = presence_question(digit)
                    annotations[category].append(
                        {"question_id": question_id, "image": scene.image, "text": text, "label": label})
                    questions.append({"question_id": question_id, "image": scene.image,
                                      "text": f"{text}\n{SHORT_ANSWER}", "category": category})
    return questions, annotations


# --- GQA, MMBench, MME ----------------------------------------------------------------------------

def _gqa_entry(question: str, answer: str, full_answer: str, image_id: str, kind: str, semantic: list) -> dict:
    # The fields GQA's official eval.py reads (isBalanced, types, groups, semantic, entailed), with
    # GQA's type names: both kinds are open "query" questions.
    semantic_type, detailed, group = {"position": ("cat", "digitPosition", "digit"),
                                      "count": ("global", "digitCount", "count")}[kind]
    return {"imageId": image_id, "question": question, "answer": answer, "fullAnswer": full_answer,
            "isBalanced": True, "groups": {"global": group, "local": f"{kind}-{answer}"},
            "types": {"structural": "query", "semantic": semantic_type, "detailed": detailed},
            "semantic": semantic, "semanticStr": " -> ".join(f"{s['operation']}: {s['argument']}" for s in semantic),
            "entailed": [], "equivalent": [], "annotations": {"question": {}, "answer": {}, "fullAnswer": {}}}


def _gqa(scenes: list[Scene], config: DemoDataConfig) -> tuple[list[dict], dict[str, dict]]:
    questions, annotations = [], {}

    def add(scene, question, entry):
        question_id = f"{len(questions) + 1:08d}"  # numeric strings as GQA's; fixed width sorts in order
        entry["equivalent"] = [question_id]
        annotations[question_id] = entry
        questions.append({"question_id": question_id, "image": scene.image, "text": f"{question}\n{SHORT_ANSWER}"})

    for scene in scenes:
        count = len(scene.digits)
        add(scene, COUNT_QUESTION, _gqa_entry(
            COUNT_QUESTION, str(count), f"There {'is 1 digit' if count == 1 else f'are {count} digits'} in the image.",
            scene.id, "count", [{"operation": "select", "argument": "digits", "dependencies": []},
                                {"operation": "count", "argument": "", "dependencies": [0]}]))
        for cell, digit in zip(scene.cells, scene.digits):
            place = position_name(cell, config.grid)
            question = position_question(cell, config.grid)
            add(scene, question, _gqa_entry(
                question, str(digit), f"The digit in the {place} is {digit}.", scene.id, "position",
                [{"operation": "select", "argument": place, "dependencies": []},
                 {"operation": "query", "argument": "name", "dependencies": [0]}]))
    return questions, annotations


def _mmbench(scenes: list[Scene], pngs: dict[str, bytes], config: DemoDataConfig, rng) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(MMBENCH_COLUMNS)
    index = 0
    for scene in scenes:
        image = base64.b64encode(pngs[scene.image]).decode("ascii")
        for category, choose in (("digit_recognition", _position_choice), ("counting", _count_choice)):
            question, options, letter = choose(scene, config, rng)
            # One row per question: circular evaluation rotates the options at answer time.
            writer.writerow([index, question, "", *options, letter, category, image, SOURCE, MMBENCH_L2[category],
                             "", "dev"])
            index += 1
    return buffer.getvalue().encode("utf-8")


def _mme(scenes: list[Scene], config: DemoDataConfig, rng) -> tuple[list[dict], dict[str, str]]:
    """LLaVA's llava_mme.jsonl records, and the official ``<subtask>/<image>.txt`` ground truth by path.

    As LLaVA's file, the two questions of an image share the question_id ``<subtask>/<image>`` and
    end with the short-answer instruction; its convert_answer_to_mme.py swaps that back for
    " Please answer yes or no." to find the ground-truth line.
    """
    questions, ground_truth = [], {}
    for subtask in MME_SUBTASKS:
        for scene in scenes:
            if subtask == "existence":
                yes = presence_question(int(rng.choice(scene.digits)))
                no = presence_question(int(rng.choice(scene.absent())))
            else:
                yes = count_check_question(len(scene.digits))
                no = count_check_question(_wrong_count(scene, config, rng))
            path = f"{subtask}/{scene.image}"
            ground_truth[f"{subtask}/{scene.id}.txt"] = f"{yes} {MME_SUFFIX}\tYes\n{no} {MME_SUFFIX}\tNo\n"
            for question in (yes, no):
                questions.append({"question_id": path, "image": path, "text": f"{question}\n{SHORT_ANSWER}",
                                  "category": subtask})
    return questions, ground_truth


# --- writing --------------------------------------------------------------------------------------

def _json(value, indent: int | None = 1) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def _jsonl(records: Sequence[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _write(folder: Path, relative: str, data: bytes, files: dict[str, str]) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    files[relative] = hashlib.sha256(data).hexdigest()


def _scene_record(scene: Scene, config: DemoDataConfig) -> dict:
    return {"image": scene.image, "digits": list(scene.digits), "cells": list(scene.cells),
            "positions": [position_name(c, config.grid) for c in scene.cells], "sources": list(scene.sources)}


def _write_all(folder: Path, config: DemoDataConfig, progress: bool) -> dict:
    """Every file of a build into ``folder``, the manifest last; returns the manifest."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes a second to import

    digits = load_digits()
    images, labels = digits.images, digits.target
    train_pool, eval_pool = split_source_indices(labels, config)
    train = sample_scenes("train", config.train_scenes, train_pool, labels, config, _rng(config, "train_scenes"))
    evaluation = sample_scenes("eval", config.eval_scenes, eval_pool, labels, config, _rng(config, "eval_scenes"))
    files: dict[str, str] = {}

    pngs = {}
    for split, scenes in (("train", train), ("eval", evaluation)):
        for scene in tqdm(scenes, desc=f"Writing {split} images", unit=" images", disable=not progress):
            pngs[scene.image] = _png(render_scene([images[i] for i in scene.sources], scene.cells, config))
            _write(folder, f"images/{split}/{scene.image}", pngs[scene.image], files)

    rng = _rng(config, "train_questions")
    samples = [_train_sample(scene, config, rng) for scene in train]
    _write(folder, "train.json", _json(samples), files)
    _write(folder, "pretrain.json", _json([_pretrain_sample(scene, config) for scene in train]), files)
    _write(folder, "scenes.json", _json({"train": [_scene_record(s, config) for s in train],
                                         "eval": [_scene_record(s, config) for s in evaluation]}), files)

    pope_questions, pope_annotations = _pope(evaluation, _rng(config, "pope"))
    _write(folder, "eval/pope/llava_pope_test.jsonl", _jsonl(pope_questions), files)
    for category, records in pope_annotations.items():
        # POPE's annotation files are JSON Lines despite the .json name.
        _write(folder, f"eval/pope/coco/coco_pope_{category}.json", _jsonl(records), files)

    gqa_questions, gqa_annotations = _gqa(evaluation, config)
    _write(folder, "eval/gqa/llava_gqa_testdev_balanced.jsonl", _jsonl(gqa_questions), files)
    _write(folder, "eval/gqa/data/testdev_balanced_questions.json", _json(gqa_annotations), files)

    _write(folder, "eval/mmbench/mmbench_dev_en.tsv", _mmbench(evaluation, pngs, config, _rng(config, "mmbench")),
           files)

    mme_questions, mme_ground_truth = _mme(evaluation, config, _rng(config, "mme"))
    _write(folder, "eval/MME/llava_mme.jsonl", _jsonl(mme_questions), files)
    benchmark = "eval/MME/MME_Benchmark_release_version"
    for subtask in MME_SUBTASKS:
        # MME's layout for existence/count: image and its question file side by side in the subtask folder.
        for scene in tqdm(evaluation, desc=f"Writing MME {subtask}", unit=" images", disable=not progress):
            _write(folder, f"{benchmark}/{subtask}/{scene.image}", pngs[scene.image], files)
            _write(folder, f"{benchmark}/{subtask}/{scene.id}.txt",
                   mme_ground_truth[f"{subtask}/{scene.id}.txt"].encode("utf-8"), files)

    used = {name: sorted({i for s in scenes for i in s.sources}) for name, scenes in
            (("train", train), ("eval", evaluation))}
    manifest = {
        "format": FORMAT, "config": asdict(config),
        "counts": {"train_scenes": len(train), "train_questions": sum(len(s["conversations"]) // 2 for s in samples),
                   "eval_scenes": len(evaluation), "pope_questions": len(pope_questions),
                   "gqa_questions": len(gqa_questions), "mmbench_questions": 2 * len(evaluation),
                   "mme_questions": len(mme_questions)},
        "source_pools": {"train": train_pool.tolist(), "eval": eval_pool.tolist()},
        "source_indices": used,
        "files": files,
    }
    # Last: a folder with a manifest is finished (the manifest does not list itself).
    (folder / "manifest.json").write_bytes(_json(manifest))
    return manifest


def _read_manifest(folder: Path, config: DemoDataConfig) -> dict | None:
    """The finished build's manifest, or None when the folder is missing, half-written or another config's."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    expected = json.loads(json.dumps(asdict(config)))  # as the manifest stores it: tuples become lists
    ok = isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("config") == expected
    return manifest if ok else None


def _demo_data(folder: Path, counts: dict[str, int]) -> DemoData:
    eval_images = folder / "images" / "eval"
    pope, mme = folder / "eval" / "pope", folder / "eval" / "MME"
    mmbench = folder / "eval" / "mmbench" / "mmbench_dev_en.tsv"
    return DemoData(
        root=folder, train_json=folder / "train.json", pretrain_json=folder / "pretrain.json",
        image_folder=folder / "images",
        scenes_json=folder / "scenes.json",
        pope=EvalFiles(pope / "llava_pope_test.jsonl",
                       tuple(pope / "coco" / f"coco_pope_{c}.json" for c in POPE_CATEGORIES), eval_images),
        gqa=EvalFiles(folder / "eval" / "gqa" / "llava_gqa_testdev_balanced.jsonl",
                      (folder / "eval" / "gqa" / "data" / "testdev_balanced_questions.json",), eval_images),
        mmbench=EvalFiles(mmbench, (mmbench,), None),
        mme=EvalFiles(mme / "llava_mme.jsonl", (mme / "MME_Benchmark_release_version",),
                      mme / "MME_Benchmark_release_version"),
        counts=dict(counts))


def build_demo_data(root: str | os.PathLike, config: DemoDataConfig = DemoDataConfig(),
                    progress: bool = True) -> DemoData:
    """Build (or find) the demo dataset for ``config`` under ``root / "digits-v2-<config hash>"``.

    A folder with a manifest for this config is returned at once; one without (half-written) is
    rebuilt. The build goes to a private ``.partial`` folder renamed into place when finished, so a
    crash never leaves a folder that looks finished, and of two concurrent builders the first to
    finish wins. Files are byte-identical across runs and machines with the same library versions.
    """
    root = Path(root)
    folder = root / f"{FORMAT}-{config_hash(config)}"
    manifest = _read_manifest(folder, config)
    if manifest is not None:
        return _demo_data(folder, manifest["counts"])

    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        manifest = _write_all(partial, config, progress)
        finished = _read_manifest(folder, config)
        if finished is not None:  # another process finished first: keep its (identical) files
            return _demo_data(folder, finished["counts"])
        if folder.exists():  # half-written, or left by another format version
            shutil.rmtree(folder)
        try:
            os.rename(partial, folder)
        except OSError:  # another process renamed its build in meanwhile
            finished = _read_manifest(folder, config)
            if finished is None:
                raise
            return _demo_data(folder, finished["counts"])
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return _demo_data(folder, manifest["counts"])
