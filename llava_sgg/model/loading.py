"""Load any output folder of this project by its path alone, and fold LoRA into a full checkpoint."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration

from .builder import SPEC_FILE, ModelError, build_llava, read_spec

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return Path(path, ADAPTER_CONFIG).is_file()


KEEP = "keep"  # load_trained(quantization=KEEP): use the quantization recorded in the spec


def load_trained(path: str | os.PathLike, *, quantization: str | None = KEEP):
    """(model, processor) from a full HF Llava folder or a LoRA folder written by `llava-sgg train`.

    A LoRA folder holds the adapter, the trained connector and the spec of its
    base model (llava_sgg_model.json); the base is rebuilt from that spec.
    ``quantization`` overrides the spec's (e.g. None to merge into full precision).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {str(path)!r} does not exist")
    processor = AutoProcessor.from_pretrained(path)
    if not is_adapter_folder(path):
        return LlavaForConditionalGeneration.from_pretrained(path), processor
    if not Path(path, SPEC_FILE).is_file():
        raise ModelError(f"{path} holds a LoRA adapter but no {SPEC_FILE} naming its base model")
    from peft import PeftModel

    spec = read_spec(path)
    if quantization != KEEP:
        spec = dataclasses.replace(spec, quantization=quantization)
    base, _ = build_llava(spec)
    return PeftModel.from_pretrained(base, path), processor


def merge_lora(path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Fold a LoRA folder's adapter into its (full-precision) base and save a plain HF Llava checkpoint."""
    if not is_adapter_folder(path):
        raise ModelError(f"{path} is not a LoRA output folder (no {ADAPTER_CONFIG})")
    model, processor = load_trained(path, quantization=None)
    merged = model.merge_and_unload()
    output = Path(output)
    merged.save_pretrained(output)
    processor.save_pretrained(output)
    return output
