"""eval/<benchmark>.sh end to end on a tiny model and the demo's files, laid out as the official playground."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_sgg.demo.data import DemoDataConfig, build_demo_data
from llava_sgg.model.builder import ModelConfig, build_llava

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    data = build_demo_data(base / "data", DemoDataConfig(train_scenes=4, eval_scenes=4), progress=False)
    model, processor = build_llava(ModelConfig(vision_tower="tiny", language_model="tiny"))
    model.save_pretrained(base / "tiny-llava")
    processor.save_pretrained(base / "tiny-llava")
    root = base / "playground"
    pope = root / "pope"
    pope.mkdir(parents=True)
    shutil.copy(data.pope.question_file, pope / "llava_pope_test.jsonl")
    shutil.copytree(data.pope.annotations[0].parent, pope / "coco")
    (pope / "val2014").symlink_to(data.pope.image_folder)
    shutil.copytree(data.mme.question_file.parent, root / "MME")
    _mmbench_with_circular_copies(data.mmbench.question_file, root / "mmbench" / "mmbench_dev_20230712.tsv")
    _seed_bench(sorted(data.pope.image_folder.glob("*.png"))[:3], root / "seed_bench")
    return base / "tiny-llava", root


def _mmbench_with_circular_copies(demo_tsv: Path, path: Path, questions: int = 2) -> None:
    """The demo's first questions with CircularEval's copies as rows of their own, as the official TSV."""
    with demo_tsv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))[:questions]
    copies = []
    for row in rows:
        options = [row[letter] for letter in "ABCD"]
        right = options["ABCD".index(row["answer"])]
        for k in range(1, 4):
            shifted = options[k:] + options[:k]
            copies.append({**row, "index": str(int(row["index"]) + k * 1_000_000),
                           **dict(zip("ABCD", shifted)), "answer": "ABCD"[shifted.index(right)]})
    path.parent.mkdir(parents=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows + copies)


def _seed_bench(images: list[Path], folder: Path) -> None:
    """SEED-Bench in LLaVA's layout: two image questions and a video one answered from its extracted frame."""
    for sub in ("SEED-Bench-image", "SEED-Bench-video-image"):
        (folder / sub).mkdir(parents=True)
    shutil.copy(images[0], folder / "SEED-Bench-image" / "1.png")
    shutil.copy(images[1], folder / "SEED-Bench-image" / "2.png")
    shutil.copy(images[2], folder / "SEED-Bench-video-image" / "v_1.png")
    types = {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}
    annotation = {"question_type": types, "questions": [
        {"question_id": "1", "question_type_id": 1, "answer": "A", "data_type": "image"},
        {"question_id": "2", "question_type_id": 2, "answer": "B", "data_type": "image"},
        {"question_id": "v_1", "question_type_id": 10, "answer": "C", "data_type": "video"}]}
    (folder / "SEED-Bench.json").write_text(json.dumps(annotation))
    suffix = "\nA. one\nB. two\nC. three\nD. four\nAnswer with the option's letter from the given choices directly."
    lines = [{"image": "SEED-Bench-image/1.png", "text": "How many?" + suffix, "question_id": 1},
             {"image": "SEED-Bench-image/2.png", "text": "Which?" + suffix, "question_id": 2},
             {"image": "SEED-Bench-video-image/v_1.png", "text": "What happens?" + suffix, "question_id": "v_1"}]
    (folder / "llava-seed-bench.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _run(script: str, model: Path, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "eval" / script), str(model), str(root)], capture_output=True,
                          text=True, env=env, timeout=300)


# Each script end to end, its answering and scoring processes (4-30 s each on 2 cores), so on demand
# (-m slow); test_the_mmbench_and_seed_scripts_follow_the_official_protocols and the scorers' own tests
# cover them in the default run.
@pytest.mark.slow
@pytest.mark.parametrize("script, answers, metrics", [
    ("pope.sh", "pope/answers/tiny-llava.jsonl", "pope/answers/tiny-llava_metrics.json"),
    ("mme.sh", "MME/answers/tiny-llava.jsonl", "MME/answers/tiny-llava_metrics.json"),
    ("seed.sh", "seed_bench/answers/tiny-llava.jsonl", "seed_bench/answers/tiny-llava_metrics.json"),
    ("mmbench.sh", "mmbench/answers/mmbench_dev_20230712/tiny-llava.jsonl",
     "mmbench/answers/mmbench_dev_20230712/tiny-llava_metrics.json"),
])
def test_eval_script_answers_and_scores(playground, script, answers, metrics):
    model, root = playground
    result = _run(script, model, root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / answers).is_file() and (root / metrics).is_file()
    records = [json.loads(line) for line in (root / answers).read_text().splitlines()]
    scores = json.loads((root / metrics).read_text())
    if script == "mmbench.sh":  # the official protocol: each of the 8 rows once, circular over the TSV's copies
        assert sorted(r["question_id"] for r in records) == sorted(k * 1_000_000 + i for i in (0, 1) for k in range(4))
        assert {r["round_id"] for r in records} == {0}
        assert scores["protocol"] == "official" and scores["circular"] and scores["circular_copies"] == 6
        assert (root / "mmbench/answers_upload/mmbench_dev_20230712/tiny-llava.tsv").is_file()
    if script == "seed.sh":  # the video question answered from its frame, and scored
        assert sorted(str(r["question_id"]) for r in records) == ["1", "2", "v_1"]
        assert scores["video_questions"] == 1 and scores["video_accuracy"] is not None
        assert scores["overall_accuracy"] is not None
        assert len((root / "seed_bench/answers_upload/tiny-llava.jsonl").read_text().splitlines()) == 3


def test_every_benchmark_has_a_script_naming_its_scorer():
    from llava_sgg.evaluation.registry import SCORERS

    for key in SCORERS:
        if key.startswith("mmbench"):  # one script for both: test_the_mmbench_script_switches_language
            continue
        text = (ROOT / "eval" / f"{key}.sh").read_text()
        assert f"llava-sgg score {key} " in text


@pytest.mark.slow  # launches bash (with a stand-in llava-sgg: milliseconds)
@pytest.mark.parametrize("command, lang, scorer, split", [
    (["mmbench.sh"], "en", "mmbench", "mmbench_dev_20230712"),
    (["mmbench.sh", "--lang", "cn"], "cn", "mmbench_cn", "mmbench_dev_cn_20231003"),
    (["mmbench_cn.sh"], "cn", "mmbench_cn", "mmbench_dev_cn_20231003"),  # the official script's name
])
def test_the_mmbench_script_switches_language(tmp_path, command, lang, scorer, split):
    # A stand-in `llava-sgg` records the commands the script runs.
    log = tmp_path / "commands.txt"
    (tmp_path / "llava-sgg").write_text('#!/usr/bin/env bash\necho "$*" >> "$COMMANDS"\n')
    (tmp_path / "llava-sgg").chmod(0o755)
    env = {**os.environ, "COMMANDS": str(log), "CUDA_VISIBLE_DEVICES": "0", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env.pop("SPLIT", None)
    script, *options = command
    result = subprocess.run(["bash", str(ROOT / "eval" / script), *options, "models/m", "root"], capture_output=True,
                            text=True, env=env, timeout=60, cwd=tmp_path)  # (the script makes folders under root/)
    assert result.returncode == 0, result.stderr
    answer, score = log.read_text().splitlines()
    assert answer.startswith(f"answer-mmbench --model models/m --question-file root/mmbench/{split}.tsv --lang {lang} ")
    assert score.startswith(f"score {scorer} --questions root/mmbench/{split}.tsv ")
    assert score.endswith(f"--submission root/mmbench/answers_upload/{split}/m.tsv")


def test_the_mmbench_and_seed_scripts_follow_the_official_protocols():
    # Each TSV row once: no rotation of the options (mmbench_cn.sh runs this script with --lang cn).
    text = (ROOT / "eval" / "mmbench.sh").read_text()
    assert "answer-mmbench" in text and "--all-rounds" not in text and "--rotate-options" not in text
    seed = (ROOT / "eval" / "seed.sh").read_text()  # every question, the video ones included
    assert "--image-only" not in seed and '--questions "$D/llava-seed-bench.jsonl"' in seed
