"""`llava-sgg bench pipeline`: the stock transformers + peft loop and `llava-sgg train`, on the same samples.

One process, one device. The benchmark writes a synthetic LLaVA dataset to disk (real JPEG files, a
LLaVA-format JSON of ``<image>`` conversations) and the model parts' configuration files (a CLIP
tower's config and image processor, a Llama decoder's config and tokenizer), then times:

- **stock**: ``LlavaForConditionalGeneration`` with peft LoRA on every decoder Linear (the connector
  trained fully, peft's ``modules_to_save``) or full fine-tuning, trainable weights held in fp32 and
  bf16 autocast on CUDA, ``torch.optim.AdamW(fused=True)`` on CUDA (plain on a CPU), the model's own
  loss, gradient checkpointing as configured, in a plain loop (forward, backward, step, zero_grad).
  Its batches are ready tensors: the same samples as the other rows, tokenized by this project's
  dataset, padded by transformers' ``DataCollatorForSeq2Seq`` (right padding to the longest sample
  of the batch, ``attention_mask``), images decoded and stacked beforehand.
- **llava-sgg padded / packed**: ``build_trainer`` on a run config pointing at those files (this
  project's dataset, collator, modality-length sampler and Trainer), ``data.packing`` false and
  true, JPEGs decoded by ``--workers`` dataloader workers, one pair of rows per ``--optimizers`` name.

Every row trains the same batches in the same order: the stock loop gets the samples in the order
the llava-sgg rows' sampler draws them (same seed), and the rows' per-step token counts are
recorded and compared. Weights are random, built from the configuration files on the device (the
same seed gives every row the same initial weights): a 7B decoder written to disk and read back
would time the disk, not the pipeline; everything after loading is the code a run executes.

A step of the llava-sgg rows is the time between the ends of two consecutive optimizer steps
(a TrainerCallback's ``on_step_end``, after ``torch.cuda.synchronize``): it includes fetching the
batch, the previous step's logging and anything else the Trainer does per step. A stock step is
timed around the loop body, synchronized on both sides. Each row reports the median step over
``--steps`` timed steps after ``--warmup`` untimed ones, and real tokens per second: the non-pad
tokens of the timed steps (image tokens included, as the model sees them) over their total time.

Length distributions (``--lengths``), seeded, the same samples for every row:

- ``uniform``: every sample has an image and 300 text tokens (template, question and answer),
  876 tokens in all with LLaVA-1.5's 576 image tokens, as the issue's stock measurement.
- ``mix``: LLaVA-mix-665k-like. Each sample is drawn from one of four kinds: short single-turn
  VQA with an image (45%; 10-60 conversation tokens: VQAv2, GQA, OCR-VQA, TextCaps), a medium
  conversation about an image (25%; 1-3 turns, 100-400 tokens: LLaVA-Instruct detail and
  reasoning), a long multi-turn conversation about an image (10%; 3-8 turns, 400-1200 tokens:
  LLaVA-Instruct conversations) and a text-only conversation (20%; 1-6 turns, 100-1200 tokens:
  ShareGPT). So 80% of the samples have an image. Conversation tokens are drawn uniformly in
  each range; the template (system prompt, roles, EOS) comes on top, the image tokens on top of
  that. The JSON reports the resulting distribution.

Model FLOPs (``FLOPS_FORMULA``), the same for every row, so their MFUs compare as their throughputs
do; MFU is model FLOPs per second over ``--peak-tflops`` (dense bf16; by default 989 for an H100
SXM or H200, none on a CPU).
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from .bench import _fmt, _sync, _write, environment, llava_7b_config

SIZES = ("tiny", "1b", "3b", "7b")
MODES = ("lora", "full")
LENGTHS = ("uniform", "mix")
UNIFORM_TEXT_TOKENS = 300  # + 576 image tokens = 876, the stock measurement
MODEL_MAX_LENGTH = 2048  # LLaVA-1.5's; the longest mix sample (1200 words, 8 turns, an image) stays below it
LR = 2e-4  # LLaVA-1.5's LoRA learning rate; the step's time does not depend on it
LORA_DROPOUT = 0.05  # LLaVA-1.5's

# kind: (share, with an image, turns (min, max), conversation tokens (min, max)); see the module docstring.
MIX = {
    "short_vqa": (0.45, True, (1, 1), (10, 60)),
    "conversation": (0.25, True, (1, 3), (100, 400)),
    "long_multi_turn": (0.10, True, (3, 8), (400, 1200)),
    "text_only": (0.20, False, (1, 6), (100, 1200)),
}

# Dense bf16 peak of the GPUs this benchmark is run on, by a part of the device's name (first match wins).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))

FLOPS_FORMULA = (
    "per sample of L tokens (image tokens included): decoder 6*N_dec*L (full) or 4*N_dec*L + 6*N_lora*L "
    "(lora: frozen weights forward and input gradients, adapters forward and both gradients); attention "
    "12*layers*hidden*L^2; per image: connector 4*N_conn*image_tokens (forward and weight gradients; the "
    "tower before it is frozen), vision tower 2*N_tower*(patches+1) (forward only). N_dec: the decoder's and "
    "LM head's matrices, embeddings excluded. Recomputation under gradient checkpointing is not counted.")

# Single-token words (with a leading space) for any tokenizer: conversations are strings of them, so a
# conversation's token count is what was asked for, and `uniform` can hit its length exactly.
CANDIDATE_WORDS = ("a an and are the is in of one or two six there to digit what image how many left "
                   "right yes no it this that on with for as at by from be was which color people").split()


def part_configs(size: str):
    """(CLIP vision config, Llama decoder config) of ``size``.

    tiny and 7b are `bench train`'s (LLaVA-v1.5-7B: CLIP ViT-L/14-336, 576 image tokens, a 32-layer
    4096-wide Vicuna-7B decoder). 1b is the LLaMA-1B of GaLore and the SGG paper (`bench optim`'s),
    3b OpenLLaMA-3B's shapes, both behind the same tower: decoders whose full fine-tuning with fp32
    masters and AdamW (16 bytes a parameter) fits one 80 GB GPU, where 7B's does not.
    """
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if size in ("tiny", "7b"):
        config = llava_7b_config(tiny=size == "tiny")
        return config.vision_config, config.text_config
    shapes = {"1b": {"hidden_size": 2048, "intermediate_size": 5461, "num_hidden_layers": 24},
              "3b": {"hidden_size": 3200, "intermediate_size": 8640, "num_hidden_layers": 26}}[size]
    return llava_7b_config().vision_config, LlamaConfig(**shapes, num_attention_heads=32, num_key_value_heads=32,
                                                        vocab_size=32064, max_position_embeddings=4096)


def write_parts(folder: Path, size: str) -> dict:
    """The parts' files a run reads before its weights (tower: config, image processor; decoder: config,
    tokenizer); returns the run config's model section. The tokenizer is the tiny one at every size:
    the decoder keeps its own vocabulary (32064 at 1b-7b), so the embedding and LM head cost what they do."""
    from transformers import CLIPImageProcessor

    from .model.tiny import tiny_tokenizer

    vision_config, text_config = part_configs(size)
    vision, decoder = folder / "vision", folder / "decoder"
    vision_config.save_pretrained(vision)
    side = vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(vision)
    text_config.save_pretrained(decoder)
    tiny_tokenizer().save_pretrained(decoder)
    return {"vision_tower": str(vision), "language_model": str(decoder), "mm_projector": None}


@contextlib.contextmanager
def random_weights(device: torch.device):
    """Inside, the model builder makes the tower and decoder from their config files with random weights,
    on ``device`` and in the run's dtype, instead of reading weights from disk (see the module docstring).
    The rest of the build (the connector, the image token, LoRA, fp32 masters) is the run's own code."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from .model import builder

    @contextlib.contextmanager
    def building(dtype_name: str):
        default = torch.get_default_dtype()
        torch.set_default_dtype(builder.DTYPES[dtype_name])
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(default)

    def vision_tower(cfg):
        with building(cfg.torch_dtype):
            tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(cfg.vision_tower))
        return tower, CLIPImageProcessor.from_pretrained(cfg.vision_tower)

    def decoder(cfg):
        with building(cfg.torch_dtype):
            return LlamaForCausalLM(LlamaConfig.from_pretrained(cfg.language_model))

    saved = builder.load_vision_tower, builder.load_decoder
    builder.load_vision_tower, builder.load_decoder = vision_tower, decoder
    try:
        yield
    finally:
        builder.load_vision_tower, builder.load_decoder = saved


# ------------------------------------------------------------------ the synthetic dataset
@dataclass(frozen=True)
class Planned:
    """One sample to write: its kind, whether it has an image, its turns and conversation tokens."""

    kind: str
    image: bool
    turns: int
    tokens: int


def plan_samples(lengths: str, n: int, seed: int) -> list[Planned]:
    """``n`` samples of the ``lengths`` distribution (module docstring), the same for a given seed."""
    if lengths == "uniform":
        return [Planned("uniform", True, 1, UNIFORM_TEXT_TOKENS)] * n
    if lengths != "mix":
        raise ValueError(f"unknown lengths {lengths!r}; choose one of {', '.join(LENGTHS)}")
    rng = np.random.default_rng(seed)
    kinds = list(MIX)
    shares = [MIX[k][0] for k in kinds]
    out = []
    for index in rng.choice(len(kinds), size=n, p=shares):
        kind = kinds[index]
        _, image, (t0, t1), (n0, n1) = MIX[kind]
        out.append(Planned(kind, image, int(rng.integers(t0, t1 + 1)), int(rng.integers(n0, n1 + 1))))
    return out


def one_token_words(tokenizer) -> list[str]:
    words = [w for w in CANDIDATE_WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < 4:
        raise ValueError(f"the tokenizer encodes fewer than 4 of {CANDIDATE_WORDS} as one token each")
    return words


def _turns(plan: Planned, words: list[str], rng, tokens: int) -> list[tuple[str, str]]:
    """``plan.turns`` (question, answer) pairs of ``tokens`` words in all, about a third in the questions."""
    def say(k: int) -> str:
        return " ".join(rng.choice(words, size=max(1, k)))

    per_turn = [tokens // plan.turns + (k < tokens % plan.turns) for k in range(plan.turns)]
    out = []
    for n in per_turn:
        asked = max(1, min(n - 1, round(n / 3)))
        out.append((say(asked), say(n - asked)))
    if plan.image:
        out[0] = ("<image>\n" + out[0][0], out[0][1])
    return out


def _encoded_length(turns, tokenizer, image_tokens: int) -> int:
    from .data.tokenization import encode_conversation, move_image_to_front

    image = "<image>" in turns[0][0]
    return len(encode_conversation(move_image_to_front(turns) if image else turns, tokenizer,
                                   model_max_length=MODEL_MAX_LENGTH, num_image_tokens=image_tokens).input_ids)


def _write_jpeg(path: Path, rng, size: tuple[int, int]) -> None:
    """A photo-like JPEG: smooth colour gradients, a few flat shapes, mild noise (so it compresses as photos do)."""
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    pixels = np.stack([(a * x / w + b * y / h + c) % 256 for a, b, c in rng.uniform(0, 255, (3, 3))], axis=-1)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        pixels[y0:y0 + int(rng.integers(1, h // 2 + 2)), x0:x0 + int(rng.integers(1, w // 2 + 2))] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


COCO_LIKE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 640))


def write_dataset(folder: Path, plans: list[Planned], tokenizer, image_tokens: int, seed: int,
                  image_scale: float = 1.0) -> tuple[dict, dict]:
    """Write ``plans`` as LLaVA JSON with one JPEG per image sample; returns (the run config's data
    section, the distribution's statistics as the model sees it: tokens per sample, image tokens included)."""
    rng = np.random.default_rng(seed + 1)
    words = one_token_words(tokenizer)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    samples, totals = [], []
    for i, plan in enumerate(plans):
        turns = _turns(plan, words, rng, plan.tokens)
        length = _encoded_length(turns, tokenizer, image_tokens)
        if plan.kind == "uniform":
            # The answer's words are one token each (each after a space): the last answer grows or
            # shrinks by the difference, which covers the template's tokens and the question's first word.
            want = UNIFORM_TEXT_TOKENS + image_tokens
            question, answer = turns[-1]
            answer = answer.split()
            answer = answer[:len(answer) + want - length] + list(rng.choice(words, size=max(0, want - length)))
            turns[-1] = (question, " ".join(answer))
            length = _encoded_length(turns, tokenizer, image_tokens)
            if length != want:
                raise ValueError(f"uniform sample {i}: {length} tokens, not {want}")
        sample = {"id": f"bench-{i:06d}", "conversations": [
            message for human, gpt in turns for message in ({"from": "human", "value": human},
                                                            {"from": "gpt", "value": gpt})]}
        if plan.image:
            w, h = COCO_LIKE_SIZES[int(rng.integers(len(COCO_LIKE_SIZES)))]
            name = f"{i:06d}.jpg"
            _write_jpeg(images / name, rng, (max(16, round(w * image_scale)), max(16, round(h * image_scale))))
            sample["image"] = name
        samples.append(sample)
        totals.append(length)
    path = folder / "train.json"
    path.write_text(json.dumps(samples))
    return {"data_path": str(path), "image_folder": str(images)}, length_stats(plans, totals, image_tokens)


def _summary(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {}
    return {"min": int(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90)), "max": int(a.max())}


def length_stats(plans: list[Planned], totals: list[int], image_tokens: int) -> dict:
    images = [p.image for p in plans]
    text = [t - image_tokens * p.image for p, t in zip(plans, totals)]
    stats = {"samples": len(plans), "with_image_share": sum(images) / len(plans), "image_tokens": image_tokens,
             "kinds": dict(Counter(p.kind for p in plans)), "tokens": _summary(totals), "text_tokens": _summary(text)}
    if any(p.kind != "uniform" for p in plans):  # the words drawn, before the template adds its own tokens
        stats["conversation_tokens"] = _summary([p.tokens for p in plans])
    return stats


# ------------------------------------------------------------------ measuring
def _reset_memory(device: torch.device) -> None:
    """Free the previous row's model (cycles through Trainer, accelerate and peft hold it) and restart the peak."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for part, tflops in PEAK_TFLOPS if part in name), None)


@dataclass(frozen=True)
class FlopCounts:
    """The parameter counts FLOPS_FORMULA needs, read off a built (and LoRA-wrapped) model."""

    decoder: int
    lora: int
    connector: int
    tower: int
    layers: int
    hidden: int
    patches: int
    image_tokens: int
    full: bool

    @classmethod
    def of(cls, model, mode: str, image_tokens: int) -> FlopCounts:
        def count(keep) -> int:
            return sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and keep(n, p))

        text, vision = model.config.text_config, model.config.vision_config  # a PeftModel forwards .config
        return cls(
            decoder=count(lambda n, p: ("language_model" in n or "lm_head" in n) and "embed_tokens" not in n
                          and "lora_" not in n),
            lora=count(lambda n, p: "lora_" in n),
            # peft keeps the connector twice (original_module and the trained modules_to_save copy)
            connector=count(lambda n, p: "multi_modal_projector" in n and p.requires_grad),
            tower=count(lambda n, p: "vision_tower" in n),
            layers=text.num_hidden_layers, hidden=text.hidden_size,
            patches=(vision.image_size // vision.patch_size) ** 2, image_tokens=image_tokens, full=mode == "full")

    def batch(self, lengths: list[int], images: int) -> float:
        per_token = 6 * self.decoder if self.full else 4 * self.decoder + 6 * self.lora
        tokens = sum(lengths)
        attention = 12 * self.layers * self.hidden * sum(n * n for n in lengths)
        per_image = 4 * self.connector * self.image_tokens + 2 * self.tower * (self.patches + 1)
        return per_token * tokens + attention + per_image * images


class StepTimer(TrainerCallback):
    """Synchronized host time at each step's begin and end; and no checkpoint at the end (Trainer writes
    one when max_steps is reached; a benchmark has no use for it)."""

    def __init__(self, device: torch.device):
        self.device, self.begins, self.ends = device, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        self.begins.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.ends.append(time.perf_counter())
        control.should_save = False


def _row(name: str, optimizer: str, packing: bool | None, step_times: list[float], real: list[int],
         padded: list[int], flops: list[float], peak_tflops: float | None, peak_gib: float | None,
         losses: list[float], in_step: list[float] | None = None) -> dict:
    total_time = sum(step_times)
    row = {"row": name, "optimizer": optimizer, "packing": packing,
           "step_s": statistics.median(step_times), "step_s_mean": statistics.mean(step_times),
           "step_s_spread": [min(step_times), max(step_times)],
           "step_times_s": step_times, "real_tokens": sum(real), "padded_tokens": sum(padded),
           "real_tokens_per_step": real, "padded_tokens_per_step": padded,
           "real_tokens_per_s": sum(real) / total_time, "padded_tokens_per_s": sum(padded) / total_time,
           "padding_share": 1 - sum(real) / sum(padded), "model_tflops_per_s": sum(flops) / total_time / 1e12,
           "mfu": sum(flops) / total_time / (peak_tflops * 1e12) if peak_tflops else None,
           "peak_memory_gib": peak_gib, "first_loss": losses[0], "losses": losses}
    if in_step is not None:
        row["in_step_s"] = statistics.median(in_step)  # on_step_begin to on_step_end: no batch fetch
    return row


# ------------------------------------------------------------------ the rows
def run_llava_sgg(cfg, device: torch.device, warmup: int, on_built=None) -> dict:
    """Train ``cfg`` with build_trainer for warm-up + timed steps; per-step times, token counts and losses.

    ``on_built(trainer)`` runs after the build and before training (the stock row's batches are taken there).
    """
    from transformers.trainer_callback import DefaultFlowCallback, ProgressCallback

    from .train.auto_checkpoint import CheckpointFromMemory
    from .train.run import build_trainer

    _reset_memory(device)
    # Each row compiles afresh, as in a process of its own: torch.compile's caches outlive a row, and every
    # row adds graphs (its shapes, its dtype); past dynamo's recompile limit flex_attention runs unfused and
    # holds the whole score matrix, as `bench loss`'s fp32 rows at 7B did until they ran out of memory.
    torch._dynamo.reset()
    with random_weights(device):
        trainer, _ = build_trainer(cfg)
    if on_built is not None:
        on_built(trainer)
    trainer.remove_callback(ProgressCallback)
    timer = StepTimer(device)
    # Right after DefaultFlowCallback, which decides the final save: called later, the save would already
    # have been acted on (the divergence guard checks every trained weight before a save).
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(next(i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)) + 1, timer)
    real, padded, losses = [], [], []

    def count_tokens(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        real.append(ids.numel() if mask is None else mask.sum())  # a tensor: read after training, no sync here
        padded.append(ids.numel())

    compute_loss = trainer.compute_loss

    def recording_loss(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = recording_loss
    hook = trainer.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    try:
        trainer.train()
    finally:
        hook.remove()
    steps = len(timer.ends)
    ends, begins = timer.ends, timer.begins
    auto = next((c for c in callbacks if isinstance(c, CheckpointFromMemory)), None)
    return {"step_times": [ends[i] - ends[i - 1] for i in range(warmup, steps)],
            "in_step": [ends[i] - begins[i] for i in range(warmup, steps)],
            "real": [int(n) for n in real[warmup:]], "padded": padded[warmup:],
            "losses": [float(x) for x in losses], "peak_gib": _peak_gib(device),
            "auto_checkpoint": None if auto is None else auto.report()}


def stock_batches(dataset, order: list[int], batch_size: int, tokenizer, pin: bool) -> list[dict]:
    """``dataset``'s samples in ``order``, batched and padded as transformers' collators pad them."""
    from transformers import DataCollatorForSeq2Seq

    from .data import IGNORE_INDEX

    if tokenizer.padding_side != "right":
        raise ValueError(f"the tokenizer pads on the {tokenizer.padding_side}; LLaVA's collators pad on the right")
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                      return_tensors="pt")
    batches = []
    for start in range(0, len(order), batch_size):
        items = [dataset[i] for i in order[start:start + batch_size]]
        batch = dict(collator([{"input_ids": x["input_ids"].tolist(), "labels": x["labels"].tolist()} for x in items]))
        images = [x["pixel_values"] for x in items if "pixel_values" in x]
        if images:
            batch["pixel_values"] = torch.stack(images)
        batches.append({k: v.pin_memory() if pin else v for k, v in batch.items()})
    return batches


def build_stock_model(cfg, processor, device: torch.device):
    """LlavaForConditionalGeneration from the same files and seed as the run's, LoRA'd with peft as users do."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from .model.builder import build_llava
    from .train.run import decoder_linear_names, hold_trainable_in_float32
    from .train.trainer import PROJECTOR

    t = cfg.train
    set_seed(t.seed)
    with random_weights(device):
        model, _ = build_llava(cfg.model, processor)  # the tower frozen, as in every LLaVA-1.5 recipe
    if t.mode == "lora":
        model = get_peft_model(model, LoraConfig(
            r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
            target_modules=decoder_linear_names(model), modules_to_save=[PROJECTOR], task_type="CAUSAL_LM"))
    hold_trainable_in_float32(model)  # fp32 masters in both paths: the rows differ in the loop, not the precision
    model.to(device)
    if t.gradient_checkpointing:
        # transformers 5 renamed it; the stock loop calls what the installed version documents
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if t.mode == "lora":
            model.enable_input_require_grads()
    model.train()
    return model


def run_stock(cfg, processor, batches: list[dict], device: torch.device, warmup: int) -> dict:
    """The plain loop over ready batches: forward (the model's own loss), backward, fused AdamW, zero_grad."""
    _reset_memory(device)
    model = build_stock_model(cfg, processor, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0, fused=True if cuda else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
    times, losses = [], []
    for batch in batches:
        _sync(device)
        start = time.perf_counter()
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.detach())
    real = [int(b["attention_mask"].sum()) for b in batches]
    padded = [b["input_ids"].numel() for b in batches]
    return {"step_times": times[warmup:], "real": real[warmup:], "padded": padded[warmup:],
            "losses": [float(x) for x in losses], "peak_gib": _peak_gib(device), "model": model}


def run_config(model: dict, data: dict, output: Path, *, mode: str, packing: bool, optimizer: str, batch: int,
               max_steps: int, gradient_checkpointing: bool, workers: int, attn: str, lora_r: int,
               lora_alpha: int, seed: int, cuda: bool, compile: bool = False, checkpoint_layers: int | str | None = None,
               liger: bool = False, bf16: bool | None = None, lora_dropout: float = LORA_DROPOUT,
               lean_lora_dropout: bool = False):
    """The run config of a llava-sgg row; ``bf16`` (default: on CUDA) picks bf16 weights and compute or fp32."""
    from .train.config import build_run_config

    bf16 = cuda if bf16 is None else bf16
    return build_run_config({
        "model": {**model, "torch_dtype": "bfloat16" if bf16 else "float32"},
        "data": {**data, "model_max_length": MODEL_MAX_LENGTH, "packing": packing},
        "train": {"output_dir": str(output), "mode": mode, "max_steps": max_steps,
                  "per_device_train_batch_size": batch, "bf16": bf16,
                  "gradient_checkpointing": gradient_checkpointing, "attn_implementation": attn,
                  "compile": compile, "checkpoint_layers": checkpoint_layers, "liger": liger,
                  "lean_lora_dropout": lean_lora_dropout,
                  "dataloader_num_workers": workers, "lora_r": lora_r, "lora_alpha": lora_alpha,
                  "lora_dropout": lora_dropout,
                  # constant lr, no warm-up: as the stock loop (the schedule costs nothing either way)
                  "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "save_steps": 10**9, "seed": seed},
        "optimizer": {"name": optimizer, "lr": LR},
    }, origin="bench pipeline")


def model_parts_and_samples(root: Path, size: str, lengths: str, n: int, seed: int):
    """The parts' files and ``n`` samples on disk under ``root``: (model section, data section, the length
    distribution, (processor, image tokens))."""
    from .model.builder import ModelConfig, load_preprocessing

    model_section = write_parts(root / "parts", size)
    processor, image_tokens = load_preprocessing(ModelConfig(**model_section))
    data_section, distribution = write_dataset(root / "data", plan_samples(lengths, n, seed), processor.tokenizer,
                                               image_tokens, seed, image_scale=0.2 if size == "tiny" else 1.0)
    return model_section, data_section, distribution, (processor, image_tokens)


def _batch_flops(counts: FlopCounts, batch: dict, image_token_id: int) -> float:
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1).tolist()
    images = int(((batch["input_ids"] == image_token_id) & (mask == 1)).any(dim=1).sum())
    return counts.batch(lengths, images)


def run_pipeline(*, size: str = "7b", mode: str = "lora", lengths: str = "mix", batch: int = 16, steps: int = 10,
                 warmup: int = 3, gradient_checkpointing: bool = True, workers: int = 4, attn: str = "sdpa",
                 optimizers: list[str] = ("adamw",), peak_tflops: float | None = None, lora_r: int | None = None,
                 lora_alpha: int | None = None, seed: int = 0, output: Path = Path("runs/bench"),
                 device: str | None = None, compile: bool = False, checkpoint_layers: int | str | None = None,
                 liger: bool = False, lean_lora_dropout: bool = False) -> dict:
    """The stock loop and llava-sgg's padded and packed rows on the same samples; prints a table, writes JSON."""
    from .optim.factory import OPTIMIZER_NAMES

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    unknown = [name for name in optimizers if name not in OPTIMIZER_NAMES]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZER_NAMES)}")
    if steps < 1 or warmup < 1 or batch < 1 or workers < 0:
        raise ValueError("--steps, --warmup and --batch must be >= 1 (a step is timed from the end of the one "
                         "before it), --workers >= 0")
    if not cuda and attn not in ("sdpa", "eager"):
        raise ValueError(f"--attn {attn} on a CPU: use sdpa or eager (flex_attention's backward does not run on a "
                         "CPU, flash attention needs a GPU)")
    if cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("this benchmark trains in bf16 on a GPU; this one has no bf16")
    if lean_lora_dropout and mode != "lora":
        raise ValueError("--lean-lora-dropout changes LoRA's dropout: use it with --mode lora")
    lora_r = lora_r or (8 if size == "tiny" else 128)
    lora_alpha = lora_alpha or 2 * lora_r
    peak_tflops = peak_tflops if peak_tflops is not None else default_peak_tflops(device)
    args = {"size": size, "mode": mode, "lengths": lengths, "batch": batch, "steps": steps, "warmup": warmup,
            "gradient_checkpointing": gradient_checkpointing, "checkpoint_layers": checkpoint_layers,
            "compile": compile, "liger": liger, "lean_lora_dropout": lean_lora_dropout, "workers": workers,
            "attn": attn,
            "optimizers": list(optimizers), "lora_r": lora_r if mode == "lora" else None,
            "lora_alpha": lora_alpha if mode == "lora" else None, "lora_dropout": LORA_DROPOUT if mode == "lora" else None,
            "lr": LR, "seed": seed, "peak_tflops": peak_tflops}
    env = environment(device)
    import peft
    import transformers

    env.update({"transformers": transformers.__version__, "peft": peft.__version__,
                "cuda": torch.version.cuda if cuda else None})

    with tempfile.TemporaryDirectory(prefix="llava-sgg-bench-pipeline-") as tmp:
        root = Path(tmp)
        model_section, data_section, distribution, (processor, image_tokens) = model_parts_and_samples(
            root, size, lengths, (warmup + steps) * batch, seed)

        def config(packing: bool, optimizer: str):
            return run_config(model_section, data_section, root / f"run-{optimizer}-{packing}", mode=mode,
                              packing=packing, optimizer=optimizer, batch=batch, max_steps=warmup + steps,
                              gradient_checkpointing=gradient_checkpointing, workers=workers, attn=attn,
                              lora_r=lora_r, lora_alpha=lora_alpha, seed=seed, cuda=cuda, compile=compile,
                              checkpoint_layers=checkpoint_layers, liger=liger, lean_lora_dropout=lean_lora_dropout)

        taken = {}

        def take_batches(trainer):
            # The stock loop trains what this sampler draws, in its order; decoded here, before any timing.
            order = list(trainer._get_train_sampler(trainer.train_dataset))
            taken["batches"] = stock_batches(trainer.train_dataset, order, batch, processor.tokenizer, pin=cuda)

        results = []
        for optimizer in optimizers:
            for packing in (False, True):
                first = not taken
                measured = run_llava_sgg(config(packing, optimizer), device, warmup,
                                         on_built=take_batches if first else None)
                results.append((f"llava-sgg {'packed' if packing else 'padded'}", optimizer, packing, measured))
        stock = run_stock(config(False, "adamw"), processor, taken["batches"], device, warmup)
        counts = FlopCounts.of(stock.pop("model"), mode, image_tokens)

    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    flops = [_batch_flops(counts, b, image_token_id) for b in taken["batches"][warmup:]]
    rows = [_row("stock", "adamw (torch, fused on CUDA)", None, stock["step_times"], stock["real"], stock["padded"],
                 flops, peak_tflops, stock["peak_gib"], stock["losses"])]
    for name, optimizer, packing, m in results:
        rows.append(_row(name, optimizer, packing, m["step_times"], m["real"], m["padded"], flops, peak_tflops,
                         m["peak_gib"], m["losses"], m["in_step"]))
        if m["auto_checkpoint"] is not None:  # checkpoint_layers auto: what it chose, and why
            rows[-1]["recomputed_layers"] = m["auto_checkpoint"]["recomputed_layers"]
            rows[-1]["auto_checkpoint"] = m["auto_checkpoint"]
    for r in rows:
        r["x_stock"] = r["real_tokens_per_s"] / rows[0]["real_tokens_per_s"]
    # x_stock compares the same work only if every row trained the same batches: their token counts say so.
    same_batches = all(r["real_tokens_per_step"] == rows[0]["real_tokens_per_step"] for r in rows)
    report = {"environment": env, "args": args, "lengths": distribution, "image_tokens": image_tokens,
              "parameters": {"decoder_matrices": counts.decoder, "lora": counts.lora, "connector": counts.connector,
                             "vision_tower": counts.tower},
              "flops_formula": FLOPS_FORMULA, "peak_tflops": peak_tflops,
              "peak_memory": ("torch.cuda.max_memory_allocated over each row (reset before its build)" if cuda else
                              "not measured per row on a CPU; process_rss_peak_gib is the process's lifetime "
                              "peak resident memory (resource.getrusage), all rows together"),
              "process_rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "step_timing": ("llava-sgg rows: between consecutive on_step_end callbacks (batch fetch, logging and "
                              "the step; in_step_s: on_step_begin to on_step_end); stock: around the loop body; "
                              "synchronized on CUDA"),
              "same_batches": same_batches, "loss_check": loss_check(rows, cuda), "rows": rows}
    _print(report, counts, device)
    # The llava-sgg rows' levers (and a batch other than the default 16) name the file, so runs that vary
    # them side by side keep every report.
    levers = ("" if attn == "sdpa" else f"-{attn}") + ("-compile" if compile else "") + ("-liger" if liger else "") \
        + ("-leandropout" if lean_lora_dropout else "") \
        + ("" if checkpoint_layers is None else f"-ck{checkpoint_layers}") + ("" if batch == 16 else f"-b{batch}")
    _write(output / f"pipeline-{size}-{mode}-{lengths}{levers}-{device.type}.json", report)
    return report


def loss_check(rows: list[dict], bf16: bool) -> dict:
    """The first step's loss of each padded row against its packed row (same first batch, same weights)."""
    tolerance = 1e-2 if bf16 else 1e-5  # bf16 compute: its noise; fp32: summation order only
    stock = rows[0]["first_loss"]
    pairs = []
    for padded in rows[1:]:
        if padded["packing"] is not False:
            continue
        packed = next(r for r in rows if r["packing"] and r["optimizer"] == padded["optimizer"])
        a, b = padded["first_loss"], packed["first_loss"]
        rel = abs(a - b) / max(abs(a), 1e-12)
        pairs.append({"optimizer": padded["optimizer"], "padded": a, "packed": b, "relative_difference": rel,
                      "passed": rel <= tolerance, "stock": stock,
                      "stock_relative_difference": abs(stock - a) / max(abs(a), 1e-12)})
    return {"tolerance": tolerance, "passed": all(p["passed"] for p in pairs), "pairs": pairs,
            "note": "stock's first loss is shown for reference: same weights, same batch, the model's own loss"}


def _print(report: dict, counts: FlopCounts, device: torch.device) -> None:
    a, d, env = report["args"], report["lengths"], report["environment"]
    trained = (f"LoRA r={a['lora_r']} ({counts.lora / 1e6:.3g}M adapters)" if a["mode"] == "lora"
               else f"full ({counts.decoder / 1e6:.3g}M decoder matrices)")
    checkpointing = "gradient checkpointing" if a["gradient_checkpointing"] else "no gradient checkpointing"
    if a["gradient_checkpointing"] and a.get("checkpoint_layers") == "auto":
        low = min(r["recomputed_layers"][0] for r in report["rows"] if "recomputed_layers" in r)
        high = max(r["recomputed_layers"][1] for r in report["rows"] if "recomputed_layers" in r)
        checkpointing += f" (llava-sgg rows: auto, recomputing {low}{'' if low == high else f'-{high}'} decoder " \
                         "layers a batch)"
    elif a["gradient_checkpointing"] and a.get("checkpoint_layers") is not None:
        checkpointing += f" (llava-sgg rows: the first {a['checkpoint_layers']} decoder layers)"
    if a.get("compile"):
        checkpointing += ", llava-sgg rows compiled"
    if a.get("lean_lora_dropout"):
        checkpointing += ", llava-sgg rows with lean LoRA dropout"
    if a.get("liger"):
        checkpointing += ", llava-sgg rows with Liger's kernels"
    print(f"llava-sgg bench pipeline: {a['size']} shapes, {trained}, {a['lengths']} lengths "
          f"({d['samples']} samples, {d['tokens']['min']}-{d['tokens']['max']} tokens, mean {d['tokens']['mean']:.0f}), "
          f"batch {a['batch']}, {checkpointing}, "
          f"attn {a['attn']}, {a['workers']} workers, on {env['device']}; median of {a['steps']} steps after "
          f"{a['warmup']}")
    # tokens/s is the timed steps' tokens over their summed time: with lengths that vary, the mean step governs it
    print(f"{'row':<32}{'step s':>9}{'mean s':>9}{'real tok/s':>12}{'x stock':>9}{'padding':>9}{'MFU':>8}"
          f"{'peak GiB':>10}")
    for r in report["rows"]:
        name = r["row"] if r["packing"] is None or a["optimizers"] == ["adamw"] else f"{r['row']} {r['optimizer']}"
        mfu = f"{r['mfu'] * 100:>7.1f}%" if r["mfu"] is not None else f"{'-':>8}"
        print(f"{name:<32}{r['step_s']:>9.4f}{r['step_s_mean']:>9.4f}{r['real_tokens_per_s']:>12.0f}{r['x_stock']:>9.3f}"
              f"{r['padding_share'] * 100:>8.1f}%{mfu}{_fmt(r['peak_memory_gib'], 10, 2)}")
    check = report["loss_check"]
    for p in check["pairs"]:
        print(f"first-step loss ({p['optimizer']}): padded {p['padded']:.6f}, packed {p['packed']:.6f}, "
              f"relative difference {p['relative_difference']:.1e} (tolerance {check['tolerance']:.0e}): "
              f"{'equal' if p['passed'] else 'NOT EQUAL'}; stock {p['stock']:.6f}")
    if not report["same_batches"]:
        print("WARNING: the rows' real tokens per step differ: they did not train the same batches")
    if device.type != "cuda":
        print(f"peak memory: not per row on a CPU; process peak RSS {report['process_rss_peak_gib']:.2f} GiB")
