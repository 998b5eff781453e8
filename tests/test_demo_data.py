"""The demo dataset: scenes of scikit-learn's handwritten digits in LLaVA-v1.5's train and benchmark formats."""

import base64
import csv
import hashlib
import io
import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from llava_sgg.data import load_llava_json
from llava_sgg.demo import DemoDataConfig, build_demo_data, render_scene
from llava_sgg.demo.data import config_hash, digit_statistics, pope_negatives

SMALL = DemoDataConfig(train_scenes=40, eval_scenes=20)
SHORT = "\nAnswer the question using a single word or phrase."
CHOICE = "\nAnswer with the option's letter from the given choices directly."
PRESENCE = re.compile(r"Is there an? (\d) in the image\?")
COUNT_CHECK = re.compile(r"(?:Is there (1) digit|Are there (\d) digits) in the image\?")
POSITION = re.compile(r"What digit is in the ((?:top|middle|bottom) (?:left|center|right))\?")
COUNT = "How many digits are in the image?"


def test_build_then_load_the_training_file(tmp_path):
    data = build_demo_data(tmp_path, SMALL, progress=False)

    samples = load_llava_json(data.train_json, image_token="<image>")
    assert len(samples) == data.counts["train_scenes"] == 40
    for sample in samples:
        assert (data.image_folder / sample.image).is_file()
        assert sample.turns[0][0].startswith("<image>\n")
        assert 1 <= len(sample.turns) <= 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo"), SMALL, progress=False)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _scenes(data, split="eval"):
    return {s["image"]: s for s in json.loads(data.scenes_json.read_text())[split]}


def _digit_at(scene, place):
    return scene["digits"][scene["positions"].index(place)]


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_yes_no(question, answer, scene):
    """The right Yes/No for a presence or count-check question, or None for another kind."""
    if match := PRESENCE.fullmatch(question):
        return answer == ("Yes" if int(match[1]) in scene["digits"] else "No")
    if match := COUNT_CHECK.fullmatch(question):
        return answer == ("Yes" if int(match[1] or match[2]) == len(scene["digits"]) else "No")
    return None


def test_train_questions_are_right_and_use_the_benchmarks_wording(built):
    scenes = _scenes(built, "train")
    kinds, yes_no = set(), []
    for record in json.loads(built.train_json.read_text()):
        assert set(record) == {"id", "image", "conversations"} and record["image"].startswith("train/")
        scene = scenes[record["image"].removeprefix("train/")]
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        for human, gpt in zip(turns[::2], turns[1::2]):
            prompt, answer = human["value"].removeprefix("<image>\n"), gpt["value"]
            assert "<image>" not in prompt
            if prompt.endswith(CHOICE):  # MMBench's layout: question, "A. 3" ... "D. 5", instruction
                kinds.add("multiple_choice")
                question, *options = prompt.removesuffix(CHOICE).split("\n")
                assert [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. "] and answer in "ABCD"
                chosen = options["ABCD".index(answer)][3:]
                right = len(scene["digits"]) if question == COUNT else _digit_at(scene, POSITION.fullmatch(question)[1])
                assert chosen == str(right)
                continue
            assert prompt.endswith(SHORT)
            question = prompt.removesuffix(SHORT)
            if question == COUNT:
                kinds.add("count")
                assert answer == str(len(scene["digits"]))
            elif question == "Which digits are in the image?":
                kinds.add("listing")
                assert answer == ", ".join(map(str, scene["digits"]))  # reading order
            elif match := POSITION.fullmatch(question):
                kinds.add("position")
                assert answer == str(_digit_at(scene, match[1]))
            else:
                kinds.add("presence" if PRESENCE.fullmatch(question) else "count_check")
                assert _check_yes_no(question, answer, scene), (question, answer, scene)
                yes_no.append(answer)
    assert kinds == {"count", "count_check", "presence", "position", "listing", "multiple_choice"}
    assert {"Yes", "No"} == set(yes_no)


def test_scenes_hold_distinct_digits_in_distinct_cells(built):
    for split in ("train", "eval"):
        for name, scene in _scenes(built, split).items():
            assert 1 <= len(scene["digits"]) <= 3
            assert len(set(scene["digits"])) == len(scene["digits"])  # distinct labels: one answer per question
            assert scene["cells"] == sorted(set(scene["cells"])) and all(0 <= c < 9 for c in scene["cells"])
            with Image.open(built.image_folder / split / name) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)


def test_render_scene_centres_each_upscaled_digit_in_its_cell():
    digit = np.full((8, 8), 16.0)
    digit[0, 0] = 8.0  # 8 of 16 -> grey 128, a 2x2 block after nearest upscaling to 16 px
    scene = render_scene([digit], [4], DemoDataConfig())  # cell 4: middle center

    # 64 px / 3 cells = 21 px cells; a 16 px digit sits 2 px into its cell: rows and columns 23..38.
    assert scene.shape == (64, 64, 3) and scene.dtype == np.uint8
    assert (scene[23:25, 23:25] == 128).all()
    assert (scene[23:39, 23:39] > 0).all()
    assert scene.astype(int).sum() == 3 * (4 * 128 + (256 - 4) * 255)  # black everywhere else


def test_pope_files(built):
    scenes = _scenes(built)
    questions = _jsonl(built.pope.question_file)
    ids = [q["question_id"] for q in questions]
    assert len(set(ids)) == len(ids) == built.counts["pope_questions"]  # unique across categories
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category"} and isinstance(q["question_id"], int)
        assert PRESENCE.fullmatch(q["text"].removesuffix(SHORT))
        assert (built.pope.image_folder / q["image"]).is_file()

    frequency, cooccurrence = digit_statistics([s["digits"] for s in scenes.values()])
    for category, path in zip(("random", "popular", "adversarial"), built.pope.annotations):
        assert path.name == f"coco_pope_{category}.json"
        lines = _jsonl(path)
        asked = [q for q in questions if q["category"] == category]
        # LLaVA's eval_pope.py pairs a category's answers with its annotation lines by position.
        assert [line["question_id"] for line in lines] == [q["question_id"] for q in asked]
        assert [line["text"] + SHORT for line in lines] == [q["text"] for q in asked]
        labels = [line["label"] for line in lines]
        assert set(labels) == {"yes", "no"} and labels.count("yes") == labels.count("no")
        for name, scene in scenes.items():
            digits = [int(PRESENCE.fullmatch(line["text"])[1]) for line in lines if line["image"] == name]
            labelled = [line["label"] for line in lines if line["image"] == name]
            positives = [d for d, label in zip(digits, labelled) if label == "yes"]
            negatives = [d for d, label in zip(digits, labelled) if label == "no"]
            assert positives == scene["digits"]  # every present digit, once
            assert len(negatives) == len(set(negatives)) == len(positives)
            absent = [d for d in range(10) if d not in scene["digits"]]
            assert set(negatives) <= set(absent)
            together = cooccurrence[scene["digits"]].sum(axis=0)
            ranked = {"popular": sorted(absent, key=lambda d: (-frequency[d], d)),
                      "adversarial": sorted(absent, key=lambda d: (-together[d], -frequency[d], d))}
            if category in ranked:
                assert negatives == ranked[category][:len(positives)]


def test_pope_negatives_follow_each_category_rule_on_a_hand_checked_case():
    frequency, cooccurrence = digit_statistics([(1, 2), (1, 2), (1, 3), (4, 5), (4,)])
    assert frequency.tolist() == [0, 3, 2, 1, 2, 1, 0, 0, 0, 0]
    assert cooccurrence[1, 2] == cooccurrence[2, 1] == 2 and cooccurrence[4, 5] == 1 and cooccurrence[2, 3] == 0
    rng = np.random.default_rng(0)

    # popular: the most frequent absent digits: 1 (3 scenes); for [1, 2]: 4 (2 scenes), then 3 and 5 tie: 3
    assert pope_negatives([4], "popular", frequency, cooccurrence, rng) == [1]
    assert pope_negatives([1, 2], "popular", frequency, cooccurrence, rng) == [4, 3]
    # adversarial: what co-occurs with the present digits: 5 with 4; 3 with 1, then the most frequent: 4
    assert pope_negatives([4], "adversarial", frequency, cooccurrence, rng) == [5]
    assert pope_negatives([1, 2], "adversarial", frequency, cooccurrence, rng) == [3, 4]
    negatives = pope_negatives([1, 2], "random", frequency, cooccurrence, rng)
    assert len(set(negatives)) == 2 and not {1, 2} & set(negatives)
    with pytest.raises(ValueError, match="unknown POPE category 'rare'"):
        pope_negatives([1], "rare", frequency, cooccurrence, rng)


def test_gqa_files(built):
    scenes = _scenes(built)
    questions = _jsonl(built.gqa.question_file)
    (annotation_file,) = built.gqa.annotations
    assert annotation_file.relative_to(built.root).as_posix() == "eval/gqa/data/testdev_balanced_questions.json"
    annotations = json.loads(annotation_file.read_text())
    assert [q["question_id"] for q in questions] == list(annotations)
    assert len(questions) == built.counts["gqa_questions"] == sum(1 + len(s["digits"]) for s in scenes.values())
    for q in questions:
        assert set(q) == {"question_id", "image", "text"} and q["question_id"].isdigit()
        assert (built.gqa.image_folder / q["image"]).is_file()
        entry = annotations[q["question_id"]]
        assert entry["question"] + SHORT == q["text"] and entry["imageId"] + ".png" == q["image"]
        assert set(entry["types"]) == {"structural", "semantic", "detailed"} and entry["types"]["structural"] == "query"
        assert entry["isBalanced"] is True and entry["groups"]["global"] in {"count", "digit"}
        assert all({"operation", "argument", "dependencies"} == set(step) for step in entry["semantic"])
        scene = scenes[q["image"]]
        right = len(scene["digits"]) if entry["question"] == COUNT else \
            _digit_at(scene, POSITION.fullmatch(entry["question"])[1])
        assert entry["answer"] == str(right) == entry["answer"].lower()


def test_mmbench_tsv(built):
    eval_images = {base64.b64encode(p.read_bytes()).decode(): p.name for p in (built.image_folder / "eval").iterdir()}
    scenes = _scenes(built)
    with built.mmbench.question_file.open(newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle, delimiter="\t"))
    assert header == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                      "l2-category", "comment", "split"]
    assert built.mmbench.image_folder is None and len(rows) == built.counts["mmbench_questions"] == 2 * len(scenes)
    for i, row in enumerate(rows):
        record = dict(zip(header, row, strict=True))
        assert record["index"] == str(i) and record["hint"] == "" and record["split"] == "dev"
        assert record["category"] in {"digit_recognition", "counting"} and record["l2-category"]
        options = [record[letter] for letter in "ABCD"]
        assert len(set(options)) == 4 and all(o.isdigit() for o in options) and record["answer"] in "ABCD"
        with Image.open(io.BytesIO(base64.b64decode(record["image"]))) as image:
            assert image.format == "PNG" and image.size == (64, 64)
        scene = scenes[eval_images[record["image"]]]
        right = len(scene["digits"]) if record["category"] == "counting" else \
            _digit_at(scene, POSITION.fullmatch(record["question"])[1])
        assert record[record["answer"]] == str(right)


def test_mme_layout(built):
    scenes = _scenes(built)
    benchmark = built.mme.image_folder
    assert benchmark.name == "MME_Benchmark_release_version" and built.mme.annotations == (benchmark,)
    ground_truth = {}
    for subtask in ("existence", "count"):
        assert sorted(p.name for p in (benchmark / subtask).glob("*.png")) == sorted(scenes)
        assert sorted(p.stem for p in (benchmark / subtask).glob("*.txt")) == sorted(n[:-4] for n in scenes)
        for name, scene in scenes.items():
            assert (benchmark / subtask / name).read_bytes() == (built.image_folder / "eval" / name).read_bytes()
            lines = (benchmark / subtask / f"{name[:-4]}.txt").read_text().splitlines()
            pairs = [line.split("\t") for line in lines]
            assert [answer for _, answer in pairs] == ["Yes", "No"]
            for question, answer in pairs:
                assert question.endswith(" Please answer yes or no.")
                assert _check_yes_no(question.removesuffix(" Please answer yes or no."), answer, scene)
                ground_truth[(subtask, f"{name[:-4]}.txt", question)] = answer

    questions = _jsonl(built.mme.question_file)
    assert len(questions) == built.counts["mme_questions"] == 2 * 2 * len(scenes)
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category"}
        assert q["question_id"] == q["image"] == f"{q['category']}/{q['image'].split('/')[1]}"
        assert (benchmark / q["image"]).is_file()
        # What LLaVA's convert_answer_to_mme.py does to find the ground-truth line of an answer.
        prompt = q["text"].replace("Answer the question using a single word or phrase.", "").strip()
        key = (q["category"], q["question_id"].split("/")[-1].split(".")[0] + ".txt", prompt + " Please answer yes or no.")
        assert key in ground_truth


def test_train_and_eval_draw_digits_from_disjoint_scans(built):
    manifest = json.loads((built.root / "manifest.json").read_text())
    pools, used = manifest["source_pools"], manifest["source_indices"]
    assert not set(pools["train"]) & set(pools["eval"])
    assert sorted(pools["train"] + pools["eval"]) == list(range(1797)) and len(pools["eval"]) == round(0.2 * 1797)
    assert set(used["train"]) <= set(pools["train"]) and set(used["eval"]) <= set(pools["eval"])
    for split in ("train", "eval"):
        assert {i for s in _scenes(built, split).values() for i in s["sources"]} == set(used[split])


def test_builds_in_different_roots_are_byte_identical(tmp_path, built):
    other = build_demo_data(tmp_path, SMALL, progress=False)

    assert other.root != built.root and other.root.name == built.root.name
    assert _hashes(other.root) == _hashes(built.root)
    manifest = json.loads((other.root / "manifest.json").read_text())
    assert manifest["files"] == {k: v for k, v in _hashes(other.root).items() if k != "manifest.json"}


def test_a_second_build_returns_the_finished_folder_untouched(built):
    mtimes = {p: p.stat().st_mtime_ns for p in built.root.rglob("*")}
    assert build_demo_data(built.root.parent, SMALL, progress=False) == built
    assert {p: p.stat().st_mtime_ns for p in built.root.rglob("*")} == mtimes


def test_a_half_written_folder_is_rebuilt(tmp_path, built, capsys):
    half = tmp_path / built.root.name
    shutil.copytree(built.root, half)
    (half / "manifest.json").unlink()  # as if the build stopped before its last file
    (half / "train.json").write_text("[")
    (half / "images" / "eval" / "eval_00000.png").unlink()

    again = build_demo_data(tmp_path, SMALL, progress=True)
    assert again.root == half and _hashes(half) == _hashes(built.root)
    assert [p.name for p in tmp_path.iterdir()] == [half.name]  # no partial folder left behind
    assert "Writing train images" in capsys.readouterr().err


def test_each_config_has_its_own_folder_and_eval_set(tmp_path, built):
    smaller = build_demo_data(tmp_path, replace(SMALL, train_scenes=10), progress=False)
    assert smaller.root.name != built.root.name and smaller.counts["train_scenes"] == 10
    # Separate random streams: fewer train scenes leave the eval scenes and every benchmark file as they were.
    ours, theirs = _hashes(smaller.root), _hashes(built.root)
    assert {k: v for k, v in ours.items() if k.startswith("eval/")} == \
        {k: v for k, v in theirs.items() if k.startswith("eval/")}
    assert ours["train.json"] != theirs["train.json"]
    assert config_hash(replace(SMALL, seed=1)) != config_hash(SMALL)


@pytest.mark.parametrize("change, message", [
    ({"max_digits": 6}, "max_digits <= 5"), ({"min_digits": 0}, "1 <= min_digits"), ({"grid": 4}, "grid must be"),
    ({"digit_size": 30}, "digit_size must be"), ({"eval_fraction_of_digits": 1.0}, "eval_fraction_of_digits"),
    ({"eval_scenes": 0}, "eval_scenes must be"),
])
def test_bad_configs_are_rejected(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DemoDataConfig(**change)


def test_max_turns_bounds_the_questions_per_training_scene(tmp_path):
    import json

    from llava_sgg.demo.data import DemoDataConfig, build_demo_data

    data = build_demo_data(tmp_path, DemoDataConfig(train_scenes=30, eval_scenes=4, max_turns=6), progress=False)
    turns = [len(s["conversations"]) // 2 for s in json.loads(data.train_json.read_text())]
    assert max(turns) <= 6 and max(turns) > 3
    with pytest.raises(ValueError, match="max_turns"):
        DemoDataConfig(max_turns=7)


def test_always_ask_puts_a_presence_pair_and_a_choice_in_every_training_scene(tmp_path):
    import json

    from llava_sgg.demo.data import DemoDataConfig, build_demo_data

    config = DemoDataConfig(train_scenes=30, eval_scenes=4, always_ask=("presence", "multiple_choice"))
    data = build_demo_data(tmp_path, config, progress=False)
    scenes = {s["image"]: s for s in json.loads(data.scenes_json.read_text())["train"]}
    for sample in json.loads(data.train_json.read_text()):
        turns = sample["conversations"]
        questions = [t["value"].removeprefix("<image>\n") for t in turns[0::2]]
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in q for q in questions)
        digits = scenes[sample["image"].split("/")[-1]]["digits"]
        presence = [(int(q.split()[3]), a["value"]) for q, a in zip(questions, turns[1::2])
                    if q.startswith("Is there a") or q.startswith("Is there an")]
        # One question about a present digit ("Yes") and one about an absent digit ("No").
        assert sorted(answer for _, answer in presence) == ["No", "Yes"]
        assert all((digit in digits) == (answer == "Yes") for digit, answer in presence)
        assert sum("Answer with the option's letter" in q for q in questions) == 1
    with pytest.raises(ValueError, match="always_ask"):
        DemoDataConfig(always_ask=("presence", "presence"))
    with pytest.raises(ValueError, match="always_ask"):
        DemoDataConfig(always_ask=("colour",))
