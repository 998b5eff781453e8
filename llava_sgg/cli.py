"""The `llava-sgg` command line: train, merge, answer and score, the demo, studies, the SGG example."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _int_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {value!r}") from None


def _sgg_example(args: argparse.Namespace) -> int:
    if args.steps < 1:
        print("llava-sgg: --steps must be >= 1", file=sys.stderr)
        return 2
    from .sgg_example import run

    run(Path(args.output), steps=args.steps, optimizers=args.optimizers, seed=args.seed)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.config import load_run_config
    from .train.run import leave_process_group, train

    cfg = load_run_config(args.config, optim=args.optim, overrides=args.set)
    output = train(cfg)
    leave_process_group()
    print(f"wrote {output}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from .study import load_plan, run_study

    records = run_study(load_plan(args.plan), args.output, jobs=args.jobs, retry_failed=args.retry_failed,
                        part=args.part)
    print(f"{sum(r['status'] == 'finished' for r in records)} of {len(records)} runs finished; "
          f"`llava-sgg report {args.output}` tabulates them")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .study import write_report

    print(f"wrote {write_report(args.study, args.output)}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .model.loading import merge_lora

    print(f"wrote {merge_lora(args.model, args.output)}")
    return 0


def _load_for_answers(path: str):
    import torch

    from .model.loading import load_trained

    model, processor = load_trained(path)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, processor


def _generation_options(args) -> dict:
    return {"template": args.conv_mode, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "image_aspect_ratio": args.image_aspect_ratio}


def _write_answers(args: argparse.Namespace, prompts) -> int:
    from .evaluation.generate import write_answers

    model, processor = _load_for_answers(args.model)
    path = write_answers(model, processor, prompts, args.answers_file, model_id=Path(args.model).name,
                         **_generation_options(args))
    print(f"wrote {path}")
    return 0


def _answer(args: argparse.Namespace) -> int:
    from .evaluation.generate import question_prompts

    return _write_answers(args, question_prompts(args.question_file, args.image_folder, num_chunks=args.num_chunks,
                                                 chunk_idx=args.chunk_idx))


def _answer_mmbench(args: argparse.Namespace) -> int:
    from .evaluation.generate import mmbench_prompts

    return _write_answers(args, mmbench_prompts(args.question_file, rotate_options=args.rotate_options,
                                                lang=args.lang, num_chunks=args.num_chunks, chunk_idx=args.chunk_idx))


def _answer_sqa(args: argparse.Namespace) -> int:
    from .evaluation.generate import science_prompts

    return _write_answers(args, science_prompts(args.question_file, args.image_folder,
                                                single_pred_prompt=not args.no_single_pred_prompt,
                                                num_chunks=args.num_chunks, chunk_idx=args.chunk_idx))


def _answer_merge(args: argparse.Namespace) -> int:
    from .evaluation.generate import merge_answer_files

    print(f"wrote {merge_answer_files(args.inputs, args.output)}")
    return 0


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an output folder of `llava-sgg train` or any HF Llava folder")
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--conv-mode", default="vicuna_v1", help="conversation template")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the official evaluations")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-aspect-ratio", default="pad", choices=["pad", "resize", "crop"])
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions for several GPUs")
    parser.add_argument("--chunk-idx", type=int, default=0)


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    run_demo(args.output, quick=args.quick, cache=args.cache, steps=args.steps, optimizers=args.optimizers,
             seed=args.seed, lr_scale=args.lr_scale, rule=args.rule, result=args.result, mode=args.mode,
             prepare_only=args.prepare_only, sgg=args.sgg)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    output = Path(args.output)
    if args.what == "optim":
        bench.run_optim(args.params, args.optimizers.split(","), args.steps, args.device, output)
    elif args.what == "cluster":
        bench.run_cluster(args.elements, args.n_clusters, args.device, output)
    else:
        bench.run_train(args.optimizers.split(","), args.steps, args.text_tokens, output, tiny=args.tiny)
    return 0


def _bench_pipeline(args: argparse.Namespace) -> int:
    from .bench_pipeline import run_pipeline

    run_pipeline(size=args.size, mode=args.mode, lengths=args.lengths, batch=args.batch, steps=args.steps,
                 warmup=args.warmup, gradient_checkpointing=args.gradient_checkpointing, workers=args.workers,
                 attn=args.attn, optimizers=args.optimizers.split(","), peak_tflops=args.peak_tflops,
                 lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed, output=Path(args.output),
                 compile=args.compile, checkpoint_layers=args.checkpoint_layers, liger=args.liger,
                 lean_lora_dropout=args.lean_lora_dropout)
    return 0


def _bench_run(args: argparse.Namespace) -> int:
    from .bench_run import run_whole

    run_whole(setup=args.setup, optimizers=args.optimizers.split(","), steps=args.steps, repeats=args.repeats,
              recluster_interval=args.recluster_interval, mode=args.mode, batch=args.batch, attn=args.attn,
              workers=args.workers, cache=args.cache, quick=args.quick, profile=args.profile,
              device_profile_steps=args.device_profile, seed=args.seed, cold=args.cold, output=Path(args.output))
    return 0


def _bench_loss(args: argparse.Namespace) -> int:
    from .bench_loss import run_loss

    report = run_loss(size=args.size, mode=args.mode, lengths=args.lengths, batch=args.batch, steps=args.steps,
                      attn=args.attn, workers=args.workers, seed=args.seed, output=Path(args.output))
    return 0 if report["check"]["passed"] else 1


def _add_bench(commands) -> None:
    from .bench import OPTIMIZERS, PARAM_SETS

    bench = commands.add_parser("bench", help="benchmark optimizer steps, SGG's re-clustering, a LLaVA step")
    kinds = bench.add_subparsers(dest="what", required=True)
    optim = kinds.add_parser("optim", help="time each optimizer's step side by side on one set of parameters")
    optim.add_argument("--params", choices=sorted(PARAM_SETS), default="1b",
                       help="1b: LLaMA-1B shapes (1.34B); 7b-lora: LLaVA-7B's LoRA r=128 matrices; tiny: CPU")
    optim.add_argument("--optimizers", default="adamw,adamw_sgg", help=f"comma-separated, of: {','.join(OPTIMIZERS)}")
    optim.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (median reported)")
    optim.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    cluster = kinds.add_parser("cluster", help="one re-clustering of one layer: default backend vs sklearn")
    cluster.add_argument("--elements", type=int, default=2048 * 5461, help="layer size (default: a 1B MLP matrix)")
    cluster.add_argument("--n-clusters", type=int, default=3)
    cluster.add_argument("--device", default=None, help="default: cpu")
    train = kinds.add_parser("train", help="LLaVA-7B-shaped LoRA steps (random weights, bf16) per optimizer")
    train.add_argument("--optimizers", default="adamw,adamw_sgg")
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--text-tokens", type=int, default=300)
    train.add_argument("--tiny", action="store_true", help="tiny model parts instead of the 7B shapes")
    for parser in (optim, cluster, train):
        parser.add_argument("--output", default="runs/bench", help="folder for the JSON report")
        parser.set_defaults(func=_bench)
    pipeline = kinds.add_parser("pipeline", help="the stock transformers + peft loop against `llava-sgg train` "
                                "(padded and packed) on the same synthetic LLaVA data on disk")
    _add_parts_arguments(pipeline)
    pipeline.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    pipeline.add_argument("--warmup", type=int, default=3, help="untimed steps before them (at least 1)")
    pipeline.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    pipeline.add_argument("--checkpoint-layers", type=_int_or_auto, default=None,
                          help="the llava-sgg rows' train.checkpoint_layers: recompute only the first N decoder "
                               "layers, or auto (as many as the GPU's memory needs)")
    pipeline.add_argument("--compile", action="store_true", help="the llava-sgg rows' train.compile")
    pipeline.add_argument("--liger", action="store_true", help="the llava-sgg rows' train.liger (CUDA)")
    pipeline.add_argument("--lean-lora-dropout", action="store_true",
                          help="the llava-sgg rows' train.lean_lora_dropout (LoRA)")
    pipeline.add_argument("--optimizers", default="adamw", help="llava-sgg rows, a padded and a packed one per name "
                                                                "(e.g. adamw,adamw_sgg)")
    pipeline.add_argument("--peak-tflops", type=float, default=None,
                          help="the device's dense bf16 peak for MFU (default: 989 on an H100 SXM or H200, none on a CPU)")
    pipeline.add_argument("--lora-r", type=int, default=None, help="default 128 (tiny: 8)")
    pipeline.add_argument("--lora-alpha", type=int, default=None, help="default 2 x r")
    pipeline.set_defaults(func=_bench_pipeline)
    whole = kinds.add_parser("run", help="SGG's cost over a whole training run against its base optimizer "
                             "(re-clusterings, compilation and per-step work included), in one process")
    whole.add_argument("--setup", choices=["demo", "tiny", "1b", "7b"], default="demo",
                       help="demo: the demo's fine-tuning stage (its cache, recipe and data); tiny, 1b, 7b: "
                            "`bench pipeline`'s parts with random weights on LLaVA-mix-like packed samples")
    whole.add_argument("--optimizers", default="adamw,adamw_sgg", help="the first is the base the others compare to")
    whole.add_argument("--steps", type=int, default=None, help="steps per run (demo: its recipe's; else 200)")
    whole.add_argument("--repeats", type=int, default=2, help="runs per optimizer, in the order A B B A ...")
    whole.add_argument("--recluster-interval", type=int, default=None,
                       help="SGG's (demo: its recipe's; else 50)")
    whole.add_argument("--mode", choices=["lora", "full"], default="lora", help="tiny, 1b, 7b: LoRA r=128 or full")
    whole.add_argument("--batch", type=int, default=16, help="tiny, 1b, 7b: samples per step")
    whole.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention", "flash_attention_2"],
                       help="tiny, 1b, 7b: train.attn_implementation")
    whole.add_argument("--workers", type=int, default=4, help="tiny, 1b, 7b: dataloader workers")
    whole.add_argument("--cache", default=None, help="demo: its cache folder (default ~/.cache/llava-sgg)")
    whole.add_argument("--quick", action="store_true", help="demo: the tiny QUICK recipe (CPU tests)")
    whole.add_argument("--profile", action="store_true",
                       help="after the timed runs, one cProfile'd run per optimizer: the functions with most host time")
    whole.add_argument("--device-profile", type=int, default=0, metavar="N",
                       help="after the timed runs, one run per optimizer under torch.profiler, recording its last "
                            "N steps: operators by device and host time, and how busy the device was")
    whole.add_argument("--cold", action="store_true",
                       help="every run in a new process with empty Triton and inductor caches, as on a new machine: "
                            "each SGG run compiles its kernels")
    whole.add_argument("--seed", type=int, default=0)
    whole.add_argument("--output", default="runs/bench", help="folder for the JSON report")
    whole.set_defaults(func=_bench_run)
    loss = kinds.add_parser("loss", help="packed against padded loss curves, in bf16 and in fp32: is packing's "
                            "difference within bf16's own noise? (exit 1 if not)")
    _add_parts_arguments(loss)
    loss.add_argument("--steps", type=int, default=8, help="steps per row")
    loss.set_defaults(func=_bench_loss)


def _add_parts_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `bench pipeline` and `bench loss` share: which parts and samples, and how they are fed."""
    parser.add_argument("--size", choices=["tiny", "1b", "3b", "7b"], default="7b",
                        help="7b: LLaVA-v1.5-7B shapes; 1b, 3b: smaller decoders behind the same tower (full "
                             "fine-tuning that fits one GPU); tiny: CPU (random weights from config at every size)")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--lengths", choices=["uniform", "mix"], default="mix",
                        help="uniform: 300 text tokens + the image per sample; mix: LLaVA-mix-665k-like")
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention", "flash_attention_2",
                                                           "flash_attention_3"],
                        help="the llava-sgg rows' train.attn_implementation (a stock row uses transformers' "
                             "default, sdpa)")
    parser.add_argument("--workers", type=int, default=4, help="dataloader workers decoding the JPEGs (llava-sgg rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/bench", help="folder for the JSON report (and plot)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="llava-sgg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llava-sgg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train LLaVA-v1.5 (stage 1, or full, LoRA or QLoRA fine-tuning) with any optimizer")
    train.add_argument("--config", action="append", required=True, metavar="FILE",
                       help="YAML run config; repeat to merge several, later ones win")
    train.add_argument("--optim", metavar="FILE", help="YAML file with an optimizer section (replaces the config's)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one key, value parsed as YAML (e.g. train.max_steps=10)")
    train.set_defaults(func=_train)

    merge = commands.add_parser("merge", help="fold a LoRA output folder into a full HF checkpoint")
    merge.add_argument("--model", required=True, help="a LoRA output folder of `llava-sgg train`")
    merge.add_argument("--output", required=True, help="folder for the merged checkpoint")
    merge.set_defaults(func=_merge)

    answer = commands.add_parser("answer", help="answer a LLaVA question jsonl (resumes an existing answers file)")
    _add_generation_arguments(answer)
    answer.add_argument("--question-file", required=True, help="jsonl of {question_id, image, text, category}")
    answer.add_argument("--image-folder", default=".", help="image paths are relative to it")
    answer.set_defaults(func=_answer)

    mmbench = commands.add_parser("answer-mmbench", help="answer the official MMBench / MMBench-CN TSV, each row "
                                  "once (the official protocol: the TSV holds the circular copies)")
    _add_generation_arguments(mmbench)
    mmbench.add_argument("--question-file", required=True, help="the official TSV (base64 images)")
    mmbench.add_argument("--rotate-options", "--all-rounds", dest="rotate_options", action="store_true",
                         help="ask each row once per rotation of its options (the official script's --all-rounds): "
                              "n times the compute, and on the official TSV, which already holds the rotated copies, "
                              "a question then needs n x n right answers, so the circular accuracy is NOT "
                              "comparable to published MMBench numbers; for a TSV with one row per question")
    mmbench.add_argument("--lang", default="en", choices=["en", "cn"], help="cn: the Chinese answer instruction")
    mmbench.set_defaults(func=_answer_mmbench)

    sqa = commands.add_parser("answer-sqa", help="answer ScienceQA (LLaVA's conversation-format question file)")
    _add_generation_arguments(sqa)
    sqa.add_argument("--question-file", required=True, help="llava_test_CQM-A.json")
    sqa.add_argument("--image-folder", default=".", help="image paths are relative to it")
    sqa.add_argument("--no-single-pred-prompt", action="store_true",
                     help="do not append the option-letter instruction")
    sqa.set_defaults(func=_answer_sqa)

    merge_answers = commands.add_parser("answer-merge", help="concatenate chunk answer files")
    merge_answers.add_argument("inputs", nargs="+")
    merge_answers.add_argument("--output", required=True)
    merge_answers.set_defaults(func=_answer_merge)

    from .evaluation.registry import add_score_commands

    score = commands.add_parser("score", help="score answers with a benchmark's official rules")
    add_score_commands(score.add_subparsers(dest="benchmark", required=True))

    demo = commands.add_parser("demo", help="offline: fine-tune a small LLaVA with AdamW and AdamW+SGG, evaluate, report")
    demo.add_argument("--quick", action="store_true", help="a seconds-long version on tiny parts (used by the tests)")
    demo.add_argument("--output", default="runs/demo", help="folder for models, answers, metrics, report and plots")
    demo.add_argument("--cache", default=None, help="cache for data and model copies (default ~/.cache/llava-sgg)")
    demo.add_argument("--steps", type=int, default=None,
                      help="stage-2 steps of each run (default 2500 on a GPU; on a CPU planned from a measured "
                           "step so the demo ends within 9 minutes)")
    demo.add_argument("--optimizers", nargs="+", default=["adamw", "adamw_sgg"], metavar="NAME",
                      choices=["adamw", "adafactor", "lamb", "adamw_sgg", "adafactor_sgg", "lamb_sgg"],
                      help="the fine-tuning runs, one per optimizer (default: adamw adamw_sgg)")
    demo.add_argument("--seed", type=int, default=None, help="the recipe's seed (default 0)")
    demo.add_argument("--lr-scale", type=float, default=1.0, help="multiplies the recipe's learning rates")
    demo.add_argument("--rule", choices=["mda", "mean_ratio"], default=None,
                      help="SGG's scaling rule for the *_sgg runs (default the recipe's: mda, the paper's)")
    demo.add_argument("--result", default=None, help="also write metrics and loss curves here, for `llava-sgg study`")
    demo.add_argument("--mode", choices=["full", "lora"], default="full",
                      help="fine-tune the decoder fully (the recipe) or with LoRA (rank 64, lr 5x)")
    demo.add_argument("--sgg", choices=["none", "mda", "mean_ratio", "decay_only"], default=None,
                      help="with base --optimizers (adamw adafactor lamb): none plain, mda / mean_ratio their SGG "
                           "versions with that rule, decay_only plain with the stepwise lr decay the mean_ratio "
                           "rule implies (a study's control)")
    demo.add_argument("--prepare-only", action="store_true",
                      help="build data, tower, decoder and connector into --cache and stop (a study's shared start)")
    demo.set_defaults(func=_demo)

    study = commands.add_parser("study", help="run a plan's grid of runs (a YAML file), one JSON each; resumes "
                                               "a study folder, skipping finished runs")
    study.add_argument("plan", help="the plan (YAML: name, command, grid, fixed, compare; see llava_sgg/study)")
    study.add_argument("--output", required=True, help="the study folder (runs/<key>/record.json, plan.yaml)")
    study.add_argument("--jobs", type=int, default=1, help="runs at a time (small runs share one GPU well)")
    study.add_argument("--retry-failed", action="store_true", help="run again the runs that failed before")
    study.add_argument("--part", type=int, default=None,
                       help="with a plan whose grid is a list: run only its N-th grid (from 1)")
    study.set_defaults(func=_study)

    report = commands.add_parser("report", help="a study folder as markdown: mean ± std over seeds, Welch's "
                                                 "t-test against the baseline, plots")
    report.add_argument("study", help="a folder `llava-sgg study` wrote")
    report.add_argument("--output", default=None, help="the markdown file (default STUDY/report.md; plots beside)")
    report.set_defaults(func=_report)

    example = commands.add_parser(
        "sgg-example", help="train a badly scaled toy network with each base optimizer and its SGG version")
    example.add_argument("--output", default="runs/sgg-example", help="folder for the plots and JSON")
    example.add_argument("--steps", type=int, default=200, help="training steps per run")
    example.add_argument("--optimizers", nargs="+", default=["adamw", "adafactor", "lamb"],
                         choices=["adamw", "adafactor", "lamb"], help="base optimizers to compare")
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(func=_sgg_example)

    _add_bench(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
        return result if isinstance(result, int) else 0  # scorers return their metrics
    except Exception as error:
        from .errors import describe

        # ConfigError, DataError, ModelError name their file and key; a library's error about a file
        # (invalid JSON, a truncated safetensors or torch file, a missing file) gets its path. Anything
        # else is a bug to report, traceback and all.
        message = describe(error)
        if message is None:
            raise
        print(f"llava-sgg {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
