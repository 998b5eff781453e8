"""``python -m llava_sgg.study.lm``: language-model pretraining from scratch, the analogue of the SGG paper's Table 1.

The paper (arXiv 2506.01049, Table 1) pretrains LLaMA-60M on C4 as GaLore did and reports validation
perplexity 34.06 with Adam against 30.31 with Adam+SGG. C4 is not reachable offline, so the text here is
the Python source of an installed package (transformers by default: about 54 MB, real text that installs
with the project). Two subcommands:

    python -m llava_sgg.study.lm corpus --output runs/lm-corpus [--package transformers | --source-dir DIR]
    python -m llava_sgg.study.lm train --corpus runs/lm-corpus --optimizer adamw_sgg --rule mda \\
        --recluster-interval 100 --seed 0 --steps 1000 --result runs/lm/result.json

``corpus`` splits the files by a hash of their path (one in ``--val-every`` to validation), trains a
byte-level BPE tokenizer on the training files alone, and writes ``train.bin`` and ``val.bin`` (uint16,
little-endian, each file followed by the end-of-text token), ``tokenizer.json``, ``files.json`` (which
file went where) and ``corpus.json`` (source, counts, checksums).

``train`` builds GaLore's LLaMA-60M (``--size 60m``; ``tiny`` for tests) from its config, never
downloaded, trains it on random windows of ``train.bin`` with the project's optimizer factory, and
writes the result JSON that ``llava-sgg study`` records (``configs/study/lm_pretrain.yaml`` is the
study): validation perplexity on a fixed set of windows of ``val.bin``, the same for every run and seed.
A non-finite loss or gradient norm stops the run before the optimizer sees it, naming the step
(exit status 1); a bad argument or corpus stops it before any work (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["EOT", "SIZES", "DivergenceError", "LMError", "build_corpus", "build_model", "evaluate", "is_validation",
           "lr_factor", "main", "next_token_loss", "source_files", "train", "validation_windows"]

EOT = "<|endoftext|>"
CORPUS_FILES = ("train.bin", "val.bin", "tokenizer.json", "corpus.json")
TOKEN_DTYPE = np.dtype("<u2")
ENCODE_CHUNK = 256  # files per encode_batch call: bounds the memory of the Encoding objects

# GaLore's configs/llama_60m.json (the paper's LLaMA-60M): untied embeddings, SiLU, RMSNorm eps 1e-6.
# `tiny` keeps the architecture at a few thousand parameters for CPU tests.
SIZES = {
    "60m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8},
    "tiny": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
}
# SGG's settings per rule when the caller gives none: the paper's rule as configs/optim/adamw_sgg.yaml,
# the authors' as configs/optim/adamw_sgg_mean_ratio.yaml (MergeMix's preset); K = 3 for both.
SGG_DEFAULTS = {"mda": {"beta3": 0.9}, "mean_ratio": {"beta3": 0.9, "mean_decay": 0.95}}
LOG_EVERY = 10  # steps per point of the train-loss curve


class LMError(ValueError):
    """An argument or corpus file that cannot work; raised before any training, the message names it."""


class DivergenceError(RuntimeError):
    """A non-finite loss or gradient norm; the message names the step."""


# ---------------------------------------------------------------------------------------------- corpus


def source_files(root: Path) -> list[str]:
    """The ``.py`` files under ``root``, as relative POSIX paths, sorted (so the corpus is the same on any machine)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())


def split_unit(relative_path: str) -> str:
    """What goes whole to one side of the split: a model's folder (``models/<name>``), else the file.

    transformers copies code between its models ("# Copied from ..."): split file by file, a validation
    file would have near-copies in training, and validation would measure copying.
    """
    parts = relative_path.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 and parts[0] == "models" else relative_path


def is_validation(relative_path: str, val_every: int) -> bool:
    """One unit (:func:`split_unit`) in ``val_every`` goes to validation, by a hash of its path: stable across
    runs, Python versions and additions of other files (Python's own ``hash`` is salted per process)."""
    digest = hashlib.sha256(split_unit(relative_path).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % val_every == 0


def _package_source(package: str) -> tuple[Path, str | None]:
    """(the package's folder, its distribution's version), found without importing the package."""
    if "." in package:
        raise LMError(f"--package {package}: give a top-level package (finding a subpackage imports its parent)")
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise LMError(f"--package {package}: not installed")
    locations = list(spec.submodule_search_locations or [])
    if len(locations) != 1:
        raise LMError(f"--package {package}: not a package with one folder ({spec.origin or locations})")
    dists = importlib.metadata.packages_distributions().get(package, [])
    version = importlib.metadata.version(dists[0]) if dists else None
    return Path(locations[0]), version


def _read_texts(root: Path, relative_paths: list[str], log) -> tuple[list[str], list[str]]:
    """(paths, texts) of the files that are UTF-8; the others are left out and named."""
    kept, texts = [], []
    for rel in relative_paths:
        try:
            texts.append((root / rel).read_bytes().decode("utf-8"))
            kept.append(rel)
        except UnicodeDecodeError:
            log(f"  left out {rel}: not UTF-8")
    return kept, texts


def _new_tokenizer(vocab_size: int, texts: list[str]):
    """A byte-level BPE (GPT-2's scheme: lossless on any text) trained on ``texts``, with EOT as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def _encode(tokenizer, texts: list[str], eot: int) -> np.ndarray:
    """Every text's tokens followed by EOT, concatenated. The source of a tokenizer contains the EOT string
    itself (GPT-2's, for one): it is encoded as the text it is, so EOT only ever separates files."""
    tokenizer.encode_special_tokens = True
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets computed
    parts = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        for encoding in encode(texts[start:start + ENCODE_CHUNK], add_special_tokens=False):
            parts.append(np.asarray(encoding.ids, dtype=np.int64))
            parts.append(np.asarray([eot], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def build_corpus(output: str | Path, *, package: str | None = None, source_dir: str | Path | None = None,
                 vocab_size: int = 32000, val_every: int = 50, log=print) -> dict:
    """Write the token files of a package's (or a folder's) ``.py`` files to ``output``; return corpus.json."""
    if (package is None) == (source_dir is None):
        raise LMError("give one of --package and --source-dir")
    if not 257 <= vocab_size < 2**16:
        raise LMError(f"--vocab-size {vocab_size}: must be in [257, 65535] (256 bytes + EOT; tokens are uint16)")
    if val_every < 2:
        raise LMError(f"--val-every {val_every}: must be >= 2 (1 would put every file in validation)")
    start = time.time()
    if package is not None:
        root, version = _package_source(package)
        name = package
    else:
        root, version = Path(source_dir), None
        if not root.is_dir():
            raise LMError(f"--source-dir {root}: not a folder")
        name = root.name
    files = source_files(root)
    log(f"{name} {version or ''}: {len(files)} .py files under {root}")
    split = {"train": [f for f in files if not is_validation(f, val_every)],
             "val": [f for f in files if is_validation(f, val_every)]}
    texts = {}
    for part in ("train", "val"):
        split[part], texts[part] = _read_texts(root, split[part], log)
        if not split[part]:
            raise LMError(f"{root}: no {part} file (of {len(files)}, one in {val_every} goes to validation)")
    log(f"split: {len(split['train'])} training files, {len(split['val'])} validation files "
        f"({sum(map(len, texts['train'])) / 1e6:.1f} + {sum(map(len, texts['val'])) / 1e6:.1f} M characters)")

    tokenizer = _new_tokenizer(vocab_size, texts["train"])
    vocab = tokenizer.get_vocab_size()
    eot = tokenizer.token_to_id(EOT)
    log(f"tokenizer: byte-level BPE, {vocab} tokens, trained in {time.time() - start:.1f} s")

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tokens, sha256 = {}, {}
    for part in ("train", "val"):
        ids = _encode(tokenizer, texts[part], eot)
        path = output / f"{part}.bin"
        data = ids.astype(TOKEN_DTYPE).tobytes()
        path.write_bytes(data)
        tokens[part], sha256[part] = int(ids.size), hashlib.sha256(data).hexdigest()
        log(f"{part}.bin: {ids.size:,} tokens ({ids.size and sum(map(len, texts[part])) / ids.size:.2f} "
            f"characters per token)")
    tokenizer.encode_special_tokens = False  # the saved tokenizer reads EOT as the separator
    tokenizer.save(str(output / "tokenizer.json"))
    (output / "files.json").write_text(json.dumps(split, indent=0))
    meta = {"package": name, "version": version, "source": str(root), "val_every": val_every,
            "vocab_size": vocab, "requested_vocab_size": vocab_size, "eot_id": eot,
            "files": {part: len(split[part]) for part in split}, "tokens": tokens, "sha256": sha256,
            "dtype": "uint16 little-endian", "seconds": round(time.time() - start, 1)}
    (output / "corpus.json").write_text(json.dumps(meta, indent=1))
    log(f"wrote {output} in {meta['seconds']} s")
    return meta


# ---------------------------------------------------------------------------------------------- training


def read_corpus(folder: str | Path) -> dict:
    """corpus.json's contents, after checking that every file is there and the token files are whole."""
    folder = Path(folder)
    missing = [name for name in CORPUS_FILES if not (folder / name).is_file()]
    if missing:
        raise LMError(f"--corpus {folder}: missing {', '.join(missing)} "
                      f"(write it with `python -m llava_sgg.study.lm corpus --output {folder}`)")
    try:
        meta = json.loads((folder / "corpus.json").read_text())
        counts = {part: int(meta["tokens"][part]) for part in ("train", "val")}
        int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as error:
        raise LMError(f"{folder / 'corpus.json'}: not a corpus description ({error})") from None
    for part, count in counts.items():
        size = (folder / f"{part}.bin").stat().st_size
        if size != count * TOKEN_DTYPE.itemsize:
            raise LMError(f"{folder / f'{part}.bin'}: {size} bytes, corpus.json says {count} tokens")
    return meta


def load_tokens(path: str | Path) -> np.ndarray:
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def validation_windows(tokens: np.ndarray, count: int, seq_len: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``seq_len + 1`` tokens: one fixed set for every run."""
    window = seq_len + 1
    if tokens.size < count * window:
        raise LMError(f"val.bin holds {tokens.size:,} tokens, fewer than {count} windows of {window}: "
                      f"lower --eval-batches or --batch-size")
    return torch.from_numpy(np.asarray(tokens[:count * window], dtype=np.int64).reshape(count, window))


def build_model(size: str, vocab_size: int, seq_len: int, seed: int):
    """LLaMA of ``SIZES[size]`` from its config, initialised from ``seed`` on the CPU (the same weights anywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len, rms_norm_eps=1e-6,
                         hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, use_cache=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, **SIZES[size])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def next_token_loss(model, windows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every token of ``windows`` [B, L+1] given the ones before it, in float32."""
    logits = model(input_ids=windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten(),
                                             reduction=reduction)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, device: torch.device,
             autocast=contextlib.nullcontext) -> tuple[float, float]:
    """(mean token NLL, perplexity = exp of it) over every predicted token of ``windows``."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device, non_blocking=True)
        with autocast():
            total += next_token_loss(model, batch, reduction="sum").double()
    model.train(was_training)
    loss = total.item() / (windows.shape[0] * (windows.shape[1] - 1))
    return loss, math.exp(loss)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """GaLore's schedule (peft_pretraining/training_utils.py, one cosine cycle): linear warmup from 0, then a
    cosine from 1 to ``min_ratio`` at ``total``. ``step`` counts optimizer steps taken, as LambdaLR does."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sgg_options(args: argparse.Namespace) -> dict | None:
    """SGG's keyword arguments for build_optimizer, the rule's defaults filled in; None for plain AdamW."""
    if not args.optimizer.endswith("_sgg"):
        return None
    options = {"rule": args.rule, "n_clusters": args.n_clusters, "recluster_interval": args.recluster_interval,
               **SGG_DEFAULTS[args.rule]}
    if args.beta3 is not None:
        options["beta3"] = args.beta3
    if args.mean_decay is not None:
        options["mean_decay"] = args.mean_decay
    return options


def check_train_args(args: argparse.Namespace) -> None:
    """Every argument problem, before any work; the message names the flag."""
    rules = [("--steps", args.steps >= 1, ">= 1"), ("--batch-size", args.batch_size >= 1, ">= 1"),
             ("--seq-len", args.seq_len >= 1, ">= 1"), ("--lr", args.lr > 0 and math.isfinite(args.lr), "> 0"),
             ("--warmup-ratio", 0 <= args.warmup_ratio < 1, "in [0, 1)"),
             ("--min-lr-ratio", 0 < args.min_lr_ratio <= 1, "in (0, 1]"),
             ("--grad-clip", args.grad_clip >= 0, ">= 0 (0: no clipping)"),
             ("--eval-every", args.eval_every >= 1, ">= 1"), ("--eval-batches", args.eval_batches >= 1, ">= 1"),
             ("--n-clusters", args.n_clusters >= 1, ">= 1")]
    for flag, ok, want in rules:
        if not ok:
            raise LMError(f"{flag} must be {want}, got {getattr(args, flag[2:].replace('-', '_'))}")
    if args.optimizer.endswith("_sgg") and args.recluster_interval is None:
        raise LMError(f"--optimizer {args.optimizer} needs --recluster-interval (SGG's T)")
    if args.mean_decay is not None and args.rule != "mean_ratio":
        raise LMError("--mean-decay applies to --rule mean_ratio only")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LMError("--device cuda: no CUDA device here")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def train(args: argparse.Namespace, log=print) -> dict:
    """Train as ``args`` says and write ``args.result``; returns the result."""
    from ..optim import SGG
    from ..optim.factory import build_optimizer, check_optimizer_options

    check_train_args(args)
    corpus = read_corpus(args.corpus)
    options = {"betas": (0.9, 0.999), "weight_decay": 0.0, **(sgg_options(args) or {})}
    try:
        check_optimizer_options(args.optimizer, {"lr": args.lr, **options})
    except ValueError as error:
        raise LMError(str(error)) from None
    train_tokens = load_tokens(Path(args.corpus) / "train.bin")
    if train_tokens.size <= args.seq_len + 1:
        raise LMError(f"train.bin holds {train_tokens.size} tokens, too few for --seq-len {args.seq_len}")
    val_windows = validation_windows(load_tokens(Path(args.corpus) / "val.bin"), args.eval_batches * args.batch_size,
                                     args.seq_len)
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # fp32 weights and optimizer states, bf16 compute (the paper's runs are bf16).
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    model = build_model(args.size, int(corpus["vocab_size"]), args.seq_len, args.seed).to(device)
    params = sum(p.numel() for p in model.parameters())
    log(f"LLaMA {args.size}: {params:,} parameters on {_device_name(device)}; {args.optimizer}"
        + (f" ({args.rule})" if args.optimizer.endswith("_sgg") else "") + f", {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens")
    optimizer = build_optimizer(model, args.optimizer, lr=args.lr, **options)
    sgg = optimizer if isinstance(optimizer, SGG) else None
    warmup = int(args.warmup_ratio * args.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, args.steps, args.min_lr_ratio))

    # The data order depends on the seed alone, so the optimizers of one seed see the same batches.
    generator = torch.Generator().manual_seed(args.seed)
    window = args.seq_len + 1
    curves = {"train_loss": [], "val_ppl": []}
    scales = []
    recent, since_progress = [], []
    progress_every = max(1, args.steps // 10)
    train_seconds = eval_seconds = 0.0
    start = time.time()
    tick = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, train_tokens.size - window + 1, (args.batch_size,), generator=generator)
        batch = torch.from_numpy(np.stack([train_tokens[s:s + window] for s in starts.tolist()]).astype(np.int64))
        batch = batch.to(device, non_blocking=True)
        with autocast():
            loss = next_token_loss(model, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()
        # Checked before the optimizer steps, so no NaN reaches the weights or the moments.
        if not math.isfinite(loss_value):
            raise DivergenceError(f"step {step}: training loss is {loss_value}; the run diverged")
        if not math.isfinite(norm_value):
            raise DivergenceError(f"step {step}: gradient norm is {norm_value} (loss {loss_value:.4f}); "
                                  f"the run diverged")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss_value)
        since_progress.append(loss_value)
        if sgg is not None and step % sgg.recluster_interval == 0:
            summary = sgg.summary()
            scales.append([step, summary])
            for key in ("global_mda", *(f"scale_median/{c}" for c in range(sgg.n_clusters))):
                if key in summary:
                    curves.setdefault(f"sgg/{key}", []).append([step, summary[key]])
        if step % LOG_EVERY == 0 or step == args.steps:
            # A point is the mean over the steps since the last one: one step's loss is one batch's noise.
            curves["train_loss"].append([step, sum(recent) / len(recent)])
            recent = []
        if step % progress_every == 0 or step == args.steps:
            elapsed = time.time() - tick
            train_seconds += elapsed
            log(f"step {step}/{args.steps}: loss {sum(since_progress) / len(since_progress):.4f}, lr "
                f"{scheduler.get_last_lr()[0]:.2e}, grad norm {norm_value:.3f}, "
                f"{step * args.batch_size * args.seq_len / train_seconds:,.0f} tokens/s", flush=True)
            since_progress, tick = [], time.time()
        if step % args.eval_every == 0 or step == args.steps:
            train_seconds += time.time() - tick
            eval_start = time.time()
            val_loss, val_ppl = evaluate(model, val_windows, args.batch_size, device, autocast)
            eval_seconds += time.time() - eval_start
            curves["val_ppl"].append([step, val_ppl])
            log(f"step {step}: validation loss {val_loss:.4f}, perplexity {val_ppl:.2f}", flush=True)
            tick = time.time()

    tokens_seen = args.steps * args.batch_size * args.seq_len
    result = {
        "metrics": {"val_ppl": val_ppl, "val_loss": val_loss, "final_train_loss": curves["train_loss"][-1][1]},
        "curves": curves,
        "summary": {
            "device": _device_name(device), "torch": torch.__version__, "transformers": _version("transformers"),
            "size": args.size, "params": params, "tokens_seen": tokens_seen, "steps": args.steps,
            "batch": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": warmup,
            "min_lr_ratio": args.min_lr_ratio, "grad_clip": args.grad_clip, "seed": args.seed,
            "optimizer": args.optimizer, "rule": args.rule if sgg is not None else None,
            "sgg": sgg_options(args), "betas": [0.9, 0.999], "weight_decay": 0.0,
            "precision": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
            "eval_windows": len(val_windows), "eval_tokens": len(val_windows) * args.seq_len,
            "seconds": time.time() - start, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "tokens_per_s": tokens_seen / train_seconds if train_seconds > 0 else None,
            "train_loss_window": f"mean over the last {LOG_EVERY} steps", "corpus": corpus,
        },
    }
    if sgg is not None:
        result["scales"] = scales
    Path(args.result).write_text(json.dumps(result, indent=1))
    log(f"validation perplexity {val_ppl:.2f}; wrote {args.result}")
    return result


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_sgg.study.lm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    corpus = commands.add_parser("corpus", help="token files from the .py sources of an installed package")
    source = corpus.add_mutually_exclusive_group()
    source.add_argument("--package", default=None, help="a top-level installed package (default transformers)")
    source.add_argument("--source-dir", default=None, help="a folder of .py files instead of a package")
    corpus.add_argument("--output", required=True, help="folder for train.bin, val.bin, tokenizer.json, corpus.json")
    corpus.add_argument("--vocab-size", type=int, default=32000,
                        help="BPE vocabulary (the paper's T5 tokenizer: 32000)")
    corpus.add_argument("--val-every", type=int, default=50, help="one file in N goes to validation, by path hash")

    run = commands.add_parser("train", help="pretrain LLaMA from scratch on a corpus, write a study result")
    run.add_argument("--corpus", required=True, help="a folder the corpus command wrote")
    run.add_argument("--optimizer", default=None, choices=["adamw", "adamw_sgg"])
    run.add_argument("--rule", default="mda", choices=sorted(SGG_DEFAULTS), help="SGG's rule (ignored by adamw)")
    run.add_argument("--sgg", default=None, choices=["none", *sorted(SGG_DEFAULTS)],
                     help="instead of --optimizer and --rule: adamw (none), or adamw_sgg with this rule")
    run.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    run.add_argument("--steps", type=int, default=1000)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (GaLore's max_length 256)")
    run.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (GaLore's Adam baseline: 1e-3)")
    run.add_argument("--warmup-ratio", type=float, default=0.1, help="warmup steps / steps (GaLore: 1000 of 10000)")
    run.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at this times --lr")
    run.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    run.add_argument("--eval-every", type=int, default=100, help="steps between validations (and at the end)")
    run.add_argument("--eval-batches", type=int, default=16, help="validation windows = this x --batch-size")
    run.add_argument("--result", required=True, help="the result JSON (metrics, curves, summary)")
    run.add_argument("--size", default="60m", choices=sorted(SIZES))
    run.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when there is one")
    sgg = run.add_argument_group("SGG (adamw_sgg only)")
    sgg.add_argument("--n-clusters", type=int, default=3, help="K")
    sgg.add_argument("--recluster-interval", type=int, default=None, help="T, steps between re-clusterings")
    sgg.add_argument("--beta3", type=float, default=None, help="scale EMA decay (default 0.9, both rules)")
    sgg.add_argument("--mean-decay", type=float, default=None, help="mean_ratio's cluster-mean EMA (default 0.95)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "corpus":
            package = args.package if args.package or args.source_dir else "transformers"
            build_corpus(args.output, package=package, source_dir=args.source_dir, vocab_size=args.vocab_size,
                         val_every=args.val_every, log=lambda *a, **k: print(*a, flush=True))
        else:
            if (args.sgg is None) == (args.optimizer is None):
                raise LMError("give --optimizer (with --rule) or --sgg, one of them")
            if args.sgg is not None:
                args.optimizer = "adamw" if args.sgg == "none" else "adamw_sgg"
                args.rule = "mda" if args.sgg == "none" else args.sgg
            train(args, log=lambda *a, **k: print(*a, flush=True))
    except DivergenceError as error:
        print(f"{parser.prog} {args.command}: {error}", file=sys.stderr)
        return 1
    except LMError as error:
        print(f"{parser.prog} {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
