import json

import pytest

from llava_sgg.cli import main

ROWS = ("stock", "llava-sgg padded", "llava-sgg packed")


def run_tiny(tmp_path, mode: str, lengths: str = "mix", *extra: str) -> dict:
    # Batches of 4 from a mix of 12 samples: short and long ones in one batch, so the padded rows pad.
    assert main(["bench", "pipeline", "--size", "tiny", "--mode", mode, "--lengths", lengths, "--batch", "4",
                 "--steps", "2", "--warmup", "1", "--workers", "0", "--output", str(tmp_path), *extra]) == 0
    (report,) = tmp_path.glob(f"pipeline-tiny-{mode}-{lengths}*-cpu.json")
    return json.loads(report.read_text())


def check_report(report: dict, mode: str) -> None:
    assert report["args"]["mode"] == mode and report["environment"]["transformers"] and report["environment"]["peft"]
    assert [r["row"] for r in report["rows"]] == list(ROWS)
    assert report["flops_formula"] and report["peak_tflops"] is None  # a CPU: no MFU
    stock, padded, packed = report["rows"]
    for r in report["rows"]:
        assert r["step_s"] > 0 and len(r["step_times_s"]) == 2 and r["mfu"] is None
        assert r["padded_tokens"] >= r["real_tokens"] > 0
        assert r["real_tokens_per_s"] == pytest.approx(r["real_tokens"] / sum(r["step_times_s"]))
    # The same samples in the same batches: every row trained the same real tokens, step by step.
    assert report["same_batches"]
    assert padded["real_tokens_per_step"] == packed["real_tokens_per_step"] == stock["real_tokens_per_step"]
    assert padded["padded_tokens_per_step"] == stock["padded_tokens_per_step"]
    assert packed["padded_tokens"] == packed["real_tokens"] and packed["padding_share"] == 0
    assert stock["x_stock"] == 1.0
    check = report["loss_check"]
    assert check["passed"] and check["tolerance"] == 1e-5 and check["pairs"][0]["relative_difference"] <= 1e-5
    # Same weights, same first batch: the model's own loss is ours too.
    assert check["pairs"][0]["stock_relative_difference"] < 1e-5


@pytest.mark.slow  # three LoRA loops on a CPU; the full fine-tuning test below runs by default
def test_bench_pipeline_lora_on_cpu_times_three_rows_on_the_same_batches(tmp_path, capsys):
    # checkpoint_layers auto: without CUDA it measures, then recomputes every layer, as the stock loop does.
    report = run_tiny(tmp_path, "lora", "mix", "--checkpoint-layers", "auto")
    check_report(report, "lora")
    layers = report["rows"][1]["recomputed_layers"][0]
    assert [r.get("recomputed_layers") for r in report["rows"]] == [None, [layers] * 2, [layers] * 2] and layers >= 1
    assert report["parameters"]["lora"] > 0
    lengths = report["lengths"]
    assert lengths["samples"] == 12 and lengths["image_tokens"] == 16
    assert report["rows"][1]["padding_share"] > 0  # a mix of lengths pads
    out = capsys.readouterr().out
    assert "llava-sgg packed" in out and "relative difference" in out and ": equal" in out
    assert f"(llava-sgg rows: auto, recomputing {layers} decoder layers a batch)" in out


def test_bench_pipeline_full_fine_tuning_on_cpu(tmp_path, capsys):
    # The llava-sgg rows recompute only the first decoder layer; the stock loop, every layer.
    report = run_tiny(tmp_path, "full", "uniform", "--checkpoint-layers", "1")
    check_report(report, "full")
    assert report["args"]["checkpoint_layers"] == 1 and report["args"]["compile"] is False
    assert (tmp_path / "pipeline-tiny-full-uniform-ck1-b4-cpu.json").is_file()
    assert "(llava-sgg rows: the first 1 decoder layers)" in capsys.readouterr().out
    assert report["parameters"]["lora"] == 0
    assert report["lengths"]["tokens"]["min"] == report["lengths"]["tokens"]["max"] == 316
    assert all(r["padding_share"] == 0 for r in report["rows"])  # uniform lengths: nothing to pad


def test_mix_is_four_fifths_images_and_uniform_hits_its_length(tmp_path):
    from llava_sgg.bench_pipeline import UNIFORM_TEXT_TOKENS, plan_samples, write_dataset
    from llava_sgg.model.tiny import tiny_tokenizer

    plans = plan_samples("mix", 2000, seed=0)
    assert plans == plan_samples("mix", 2000, seed=0)  # every row, every run: the same samples
    assert sum(p.image for p in plans) / len(plans) == pytest.approx(0.8, abs=0.03)
    assert {p.kind for p in plans} == {"short_vqa", "conversation", "long_multi_turn", "text_only"}
    data, stats = write_dataset(tmp_path, plan_samples("uniform", 3, seed=0), tiny_tokenizer(), 576, seed=0,
                                image_scale=0.1)
    assert stats["tokens"]["min"] == stats["tokens"]["max"] == 576 + UNIFORM_TEXT_TOKENS  # 876, the issue's
    samples = json.loads(open(data["data_path"]).read())
    assert all((tmp_path / "images" / s["image"]).read_bytes()[:2] == b"\xff\xd8" for s in samples)  # JPEG


def test_bench_pipeline_refuses_flex_attention_on_a_cpu(tmp_path, capsys):
    assert main(["bench", "pipeline", "--size", "tiny", "--attn", "flex_attention", "--output", str(tmp_path)]) != 0
    assert "sdpa or eager" in capsys.readouterr().err


def test_bench_pipeline_refuses_lean_dropout_without_lora(tmp_path, capsys):
    assert main(["bench", "pipeline", "--size", "tiny", "--mode", "full", "--lean-lora-dropout",
                 "--output", str(tmp_path / "out")]) != 0
    assert "--mode lora" in capsys.readouterr().err and not (tmp_path / "out").exists()
