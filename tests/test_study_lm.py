"""`python -m llava_sgg.study.lm`: a corpus of Python sources, and LLaMA pretrained on it with AdamW and SGG."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from llava_sgg.study import lm, load_plan

TINY = ["--size", "tiny", "--device", "cpu", "--steps", "30", "--batch-size", "4", "--seq-len", "16",
        "--lr", "1e-2", "--eval-every", "10", "--eval-batches", "2", "--seed", "0"]


def write_sources(folder, n=40):
    """Small Python files, varied enough for a BPE to learn; one holds the EOT string and non-ASCII text."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = folder / f"mod{i % 4}"
        sub.mkdir(exist_ok=True)
        body = "\n".join(f"def f{i}_{j}(x, y={j}):\n    return x * {i} + y - {j}  # item {i * j}" for j in range(6))
        (sub / f"file_{i:02d}.py").write_text(f'"""Module {i}."""\n\n{body}\n')
    (folder / "special.py").write_text('EOT = "<|endoftext|>"  # the separator, as text\nname = "café ünïcode"\n')
    (folder / "notes.txt").write_text("not Python: left out\n")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    sources = write_sources(root / "tinypkg")
    meta = lm.build_corpus(root / "corpus", source_dir=sources, vocab_size=300, val_every=4, log=lambda *a, **k: None)
    return root / "corpus", sources, meta


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Results of the three optimizer settings the study compares, one seed, on the tiny model."""
    out = tmp_path_factory.mktemp("runs")
    results = {}
    for optimizer, rule in (("adamw", "mda"), ("adamw_sgg", "mda"), ("adamw_sgg", "mean_ratio")):
        result = out / f"{optimizer}-{rule}.json"
        status = lm.main(["train", "--corpus", str(corpus[0]), "--optimizer", optimizer, "--rule", rule,
                          "--recluster-interval", "10", *TINY, "--result", str(result)])
        assert status == 0
        results[optimizer, rule] = json.loads(result.read_text())
    return results


def test_training_writes_a_study_result(runs, corpus):
    for (optimizer, rule), result in runs.items():
        metrics, curves, summary = result["metrics"], result["curves"], result["summary"]
        assert set(metrics) == {"val_ppl", "val_loss", "final_train_loss"}
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
        assert [s for s, _ in curves["train_loss"]] == [10, 20, 30]
        assert [s for s, _ in curves["val_ppl"]] == [10, 20, 30]
        assert curves["val_ppl"][-1][1] == metrics["val_ppl"]
        assert curves["train_loss"][-1][1] == metrics["final_train_loss"]
        # The tiny model learns: the loss falls from about log(vocab) over 30 steps.
        assert curves["train_loss"][0][1] > curves["train_loss"][-1][1]
        assert curves["train_loss"][0][1] < math.log(corpus[2]["vocab_size"]) + 0.5
        assert summary["optimizer"] == optimizer and summary["tokens_seen"] == 30 * 4 * 16
        model = lm.build_model("tiny", corpus[2]["vocab_size"], 16, seed=0)
        assert summary["params"] == sum(p.numel() for p in model.parameters())
        assert summary["corpus"]["sha256"] == corpus[2]["sha256"] and summary["tokens_per_s"] > 0
        if optimizer == "adamw":
            assert "scales" not in result and summary["sgg"] is None and summary["rule"] is None
        else:
            assert summary["rule"] == rule and summary["sgg"]["recluster_interval"] == 10
            assert summary["sgg"]["beta3"] == 0.9
            assert summary["sgg"].get("mean_decay") == (0.95 if rule == "mean_ratio" else None)
            assert [s for s, _ in result["scales"]] == [10, 20, 30]
            assert "scale_median/0" in result["scales"][0][1]
            assert [s for s, _ in curves["sgg/scale_median/0"]] == [10, 20, 30]


def test_one_seed_gives_every_optimizer_the_same_start_and_batches(runs):
    # SGG is its base optimizer, bit for bit, until its first re-clustering (step 10's update): the first
    # ten losses are the same only if the initialisation and the batches are.
    first = {key: result["curves"]["train_loss"][0][1] for key, result in runs.items()}
    assert len(set(first.values())) == 1
    assert runs["adamw", "mda"]["metrics"]["val_ppl"] != runs["adamw_sgg", "mda"]["metrics"]["val_ppl"]


def test_corpus_split_is_deterministic_and_disjoint(corpus, tmp_path, monkeypatch):
    folder, sources, meta = corpus
    files = json.loads((folder / "files.json").read_text())
    everything = sorted(p.relative_to(sources).as_posix() for p in sources.rglob("*.py"))
    assert sorted(files["train"] + files["val"]) == everything and not set(files["train"]) & set(files["val"])
    assert files["val"] and files["train"] == sorted(files["train"])
    # The split is a hash of the path alone, as computed here independently.
    in_val = [f for f in everything if int.from_bytes(hashlib.sha256(f.encode()).digest()[:8], "big") % 4 == 0]
    assert files["val"] == in_val
    assert meta["files"] == {"train": len(files["train"]), "val": len(files["val"])}
    for part in ("train", "val"):
        data = (folder / f"{part}.bin").read_bytes()
        assert meta["sha256"][part] == hashlib.sha256(data).hexdigest() and len(data) == 2 * meta["tokens"][part]

    # Built again, from the folder as an installed package: the same bytes.
    monkeypatch.syspath_prepend(str(sources.parent))
    again = lm.build_corpus(tmp_path / "again", package="tinypkg", vocab_size=300, val_every=4, log=lambda *a: None)
    assert again["sha256"] == meta["sha256"] and again["package"] == "tinypkg" and again["version"] is None
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_token_files_decode_back_to_the_files(corpus):
    folder, sources, meta = corpus
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    files = json.loads((folder / "files.json").read_text())
    assert tokenizer.get_vocab_size() == meta["vocab_size"] <= 300 and tokenizer.token_to_id(lm.EOT) == meta["eot_id"]
    for part in ("train", "val"):
        tokens = np.fromfile(folder / f"{part}.bin", dtype="<u2")
        assert tokens[-1] == meta["eot_id"] and tokens.max() < meta["vocab_size"]
        ends = np.flatnonzero(tokens == meta["eot_id"])
        pieces = np.split(tokens, ends + 1)[:-1]
        assert len(pieces) == len(files[part])
        for rel, piece in zip(files[part], pieces):
            assert tokenizer.decode(piece[:-1].tolist(), skip_special_tokens=False) == (sources / rel).read_text()
    assert "special.py" in files["train"] + files["val"]


def test_perplexity_is_exp_of_the_mean_token_nll(corpus):
    folder, _, meta = corpus
    model = lm.build_model("tiny", meta["vocab_size"], 16, seed=3)
    windows = lm.validation_windows(lm.load_tokens(folder / "val.bin"), 6, 16)
    loss, ppl = lm.evaluate(model, windows, batch_size=4, device=torch.device("cpu"))
    # Independently: the first 6 windows of 17 tokens, every next token scored, one mean.
    tokens = np.fromfile(folder / "val.bin", dtype="<u2")[: 6 * 17].astype(np.int64).reshape(6, 17)
    x = torch.from_numpy(tokens)
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    assert loss == pytest.approx(nll.item(), rel=1e-5) and ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert lm.evaluate(model, windows, batch_size=5, device=torch.device("cpu"))[0] == pytest.approx(loss, rel=1e-6)


def test_a_nan_loss_stops_the_run_naming_the_step(corpus, tmp_path, monkeypatch, capsys):
    real, calls = lm.next_token_loss, []

    def loss_going_nan(model, windows, reduction="mean"):
        calls.append(1)
        loss = real(model, windows, reduction)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(lm, "next_token_loss", loss_going_nan)
    result = tmp_path / "result.json"
    status = lm.main(["train", "--corpus", str(corpus[0]), "--optimizer", "adamw_sgg", "--recluster-interval", "2",
                      *TINY, "--result", str(result)])
    assert status == 1 and not result.exists()
    assert "train: step 3: training loss is nan; the run diverged" in capsys.readouterr().err


def test_bad_arguments_stop_before_any_work(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lm, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    base = ["train", "--optimizer", "adamw", *TINY, "--result", str(tmp_path / "r.json")]
    assert lm.main([*base, "--corpus", str(tmp_path / "nowhere")]) == 2
    assert "missing train.bin, val.bin, tokenizer.json, corpus.json" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train.bin", "tokenizer.json", "corpus.json"):
        (partial / name).write_bytes((corpus[0] / name).read_bytes())
    assert lm.main([*base, "--corpus", str(partial)]) == 2
    assert "partial: missing val.bin" in capsys.readouterr().err
    good = ["--corpus", str(corpus[0])]
    for extra, message in ((["--eval-batches", "1000"], "fewer than 4000 windows"), (["--lr", "0"], "--lr must be > 0"),
                           (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1)")):
        assert lm.main([*base, *good, *extra]) == 2
        assert message in capsys.readouterr().err
    assert lm.main(["train", "--optimizer", "adamw_sgg", *good, *TINY, "--result", str(tmp_path / "r.json")]) == 2
    assert "needs --recluster-interval" in capsys.readouterr().err
    assert lm.main([*base, *good, "--sgg", "mda"]) == 2  # --optimizer and --sgg: one of them
    assert "give --optimizer (with --rule) or --sgg, one of them" in capsys.readouterr().err
    assert lm.main(["train", "--sgg", "mean_ratio", *good, *TINY, "--result", str(tmp_path / "r.json")]) == 2
    assert "--optimizer adamw_sgg needs --recluster-interval" in capsys.readouterr().err  # --sgg picked adamw_sgg
    with pytest.raises(SystemExit):
        lm.main([*base, *good, "--optimizer", "lamb"])
    assert not (tmp_path / "r.json").exists()


def test_learning_rate_warms_up_then_follows_a_cosine_to_its_floor():
    assert [lm.lr_factor(s, 10, 100, 0.1) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert lm.lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lm.lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_the_study_plan_runs_this_command():
    plan = load_plan("configs/study/lm_pretrain.yaml")
    runs = plan.runs(Path("study"))
    assert len(runs) == 9 and runs[0].key == "seed=0,sgg=none"
    args = lm.build_parser().parse_args(list(runs[4].command[3:]))
    assert (args.sgg, args.seed, args.recluster_interval, args.corpus) == ("mda", 1, 40, "study/corpus")
    assert (args.steps, args.batch_size, args.seq_len, args.lr, args.size) == (400, 64, 256, 1e-3, "60m")
    assert args.result.endswith("result.json") and plan.compare["baseline"] == {"sgg": "none"}


def test_a_model_folder_goes_whole_to_one_side_of_the_split():
    """transformers copies code between its models: a model's files never straddle training and validation."""
    assert lm.split_unit("models/llama/modeling_llama.py") == "models/llama"
    assert lm.split_unit("models/__init__.py") == "models/__init__.py"
    assert lm.split_unit("trainer.py") == "trainer.py"
    files = [f"models/m{i}/{name}.py" for i in range(40) for name in ("modeling", "configuration", "tokenization")]
    sides = {}
    for path in files:
        sides.setdefault(path.split("/")[1], set()).add(lm.is_validation(path, 5))
    assert all(len(side) == 1 for side in sides.values()) and {True, False} == set().union(*sides.values())
