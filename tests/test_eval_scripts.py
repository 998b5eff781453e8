"""eval/<benchmark>.sh end to end on a tiny model and the demo's files, laid out as the official playground."""

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
    return base / "tiny-llava", root


def _run(script: str, model: Path, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "eval" / script), str(model), str(root)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("script, answers, metrics", [
    ("pope.sh", "pope/answers/tiny-llava.jsonl", "pope/answers/tiny-llava_metrics.json"),
    ("mme.sh", "MME/answers/tiny-llava.jsonl", "MME/answers/tiny-llava_metrics.json"),
])
def test_eval_script_answers_and_scores(playground, script, answers, metrics):
    model, root = playground
    result = _run(script, model, root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / answers).is_file() and (root / metrics).is_file()


def test_every_benchmark_has_a_script_naming_its_scorer():
    from llava_sgg.evaluation.registry import SCORERS

    for key in SCORERS:
        text = (ROOT / "eval" / f"{key}.sh").read_text()
        assert f"llava-sgg score {key} " in text
