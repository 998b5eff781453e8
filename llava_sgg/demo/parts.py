"""The demo's model parts: the vision tower built from config and the decoder (tiny, or SmolLM2 trimmed)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel


def vision_tower(cache: Path, vision: dict, seed: int) -> Path:
    """A CLIP ViT from config, initialised once (seeded) and saved, so both runs start from it."""
    name = "clip-vit-" + "-".join(f"{k[:3]}{v}" for k, v in sorted(vision.items())) + f"-seed{seed}"
    folder = cache / name
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        config = CLIPVisionConfig(**vision)
        CLIPVisionModel(config).save_pretrained(folder)
        size = config.image_size
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def demo_texts(data, eos: str, image_token: str = "<image>") -> list[str]:
    """Every text the demo feeds the decoder: training conversations (both stages) and evaluation prompts.

    Rendered as the pipeline renders them, with the image placeholder cut out (it becomes an added
    token, outside the BPE vocabulary). ``eos`` is the decoder's end-of-answer token.
    """
    from ..data import load_llava_json, move_image_to_front, render_conversation
    from ..evaluation.generate import mmbench_prompts, prompt_text, question_prompts

    texts = []
    for path, template in ((data.train_json, "vicuna_v1"), (data.pretrain_json, "plain")):
        for sample in load_llava_json(path, image_token=image_token):
            turns = move_image_to_front(sample.turns, image_token)
            texts.append(render_conversation(turns, eos=eos, template=template, image_token=image_token).text)
    prompts = [p for files in (data.pope, data.gqa, data.mme)
               for p in question_prompts(files.question_file, files.image_folder)]
    prompts += mmbench_prompts(data.mmbench.question_file, rotate_options=True)
    texts += [prompt_text(p, image_token=image_token, template="vicuna_v1", eos=eos) for p in prompts]
    return [piece for text in texts for piece in text.split(image_token) if piece]


def decoder(cache: Path, layers: int | None, data=None) -> Path:
    """The decoder's folder: tiny from config (``layers`` 0), or SmolLM2's first ``layers`` (None: all),
    its vocabulary trimmed to what ``data``'s texts use when ``data`` is given."""
    if layers == 0:
        from transformers import LlamaForCausalLM

        from ..model.tiny import tiny_text_config, tiny_tokenizer

        folder = cache / "tiny-llama"
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            LlamaForCausalLM(tiny_text_config()).save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
        return folder
    from transformers import AutoTokenizer

    from ..model.vocabulary import trim_vocabulary
    from .smollm import smollm2_checkpoint

    source = smollm2_checkpoint(cache, num_layers=layers)
    if data is None:
        return source
    return trim_vocabulary(source, demo_texts(data, AutoTokenizer.from_pretrained(source).eos_token), cache)
