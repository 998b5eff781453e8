"""Compose LLaVA-v1.5 from its three parts on transformers' native LlavaForConditionalGeneration.

The vision tower (HF CLIP, open_clip converted to HF CLIP, or a config), the
`mlp2x_gelu` connector (LlavaMultiModalProjector: Linear, GELU, Linear) and a
Llama-architecture decoder are assembled into one HF Llava model, so every
checkpoint this project writes is a plain transformers checkpoint.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    LlamaForCausalLM,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..errors import reading
from . import tiny

TINY = "tiny"
OPEN_CLIP_PREFIX = "open_clip:"
PROJECTOR_TYPES = ("mlp2x_gelu",)
QUANTIZATIONS = (None, "8bit", "4bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPEC_FILE = "llava_sgg_model.json"


class ModelError(ValueError):
    """A model part that cannot be found or does not fit."""


@dataclass
class ModelConfig:
    """Where each part of LLaVA comes from. Paths are local folders or ids already in the HF cache."""

    vision_tower: str = "openai/clip-vit-large-patch14-336"  # HF CLIP | "open_clip:<model>[/<pretrained>]" | "tiny"
    language_model: str = "lmsys/vicuna-7b-v1.5"  # Llama-architecture causal LM | "tiny"
    gguf_file: str | None = None  # load the decoder from this GGUF file inside language_model's folder
    mm_projector: str | None = None  # stage-1 projector: mm_projector.bin (official release) or .safetensors
    mm_projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    image_token: str = "<image>"
    # SentencePiece (Vicuna, Llama-2) tokenizers: whether text right after a special token (<image>, </s>)
    # starts a new word with SentencePiece's "▁", transformers' `legacy` flag. True tokenizes as LLaVA-1.5
    # did (tokenizer_image_token encodes the text on each side of <image> on its own); None keeps the
    # tokenizer's own setting (Vicuna-v1.5's is false). Tokenizers without the flag ignore it.
    tokenizer_legacy: bool | None = True
    quantization: str | None = None  # None | "8bit" | "4bit" (nf4), for the decoder only
    torch_dtype: str = "float32"
    local_files_only: bool = True  # never reach for the hub unless asked

    def __post_init__(self):
        if self.mm_projector_type not in PROJECTOR_TYPES:
            raise ModelError(f"mm_projector_type must be one of {PROJECTOR_TYPES}, got {self.mm_projector_type!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ModelError(f"quantization must be one of none, 8bit, 4bit; got {self.quantization!r}")
        if self.torch_dtype not in DTYPES:
            raise ModelError(f"torch_dtype must be one of {', '.join(DTYPES)}; got {self.torch_dtype!r}")
        if not (self.tokenizer_legacy is None or isinstance(self.tokenizer_legacy, bool)):
            raise ModelError(f"tokenizer_legacy must be true, false or null; got {self.tokenizer_legacy!r}")


def _hub_kwargs(cfg: ModelConfig) -> dict:
    return {"local_files_only": cfg.local_files_only}


def _missing(part: str, name: str, cfg: ModelConfig, error: Exception) -> ModelError:
    where = "not a local folder and not in the Hugging Face cache" if cfg.local_files_only else "not found"
    return ModelError(f"{part} {name!r} could not be loaded: {where} "
                      f"(local_files_only={cfg.local_files_only}). ({type(error).__name__}: {error})")


def _square_processor(size: int) -> CLIPImageProcessor:
    """CLIP's processor for a tower built from config: shortest side resized to ``size``, centre crop."""
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def load_vision_tower(cfg: ModelConfig) -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    name = cfg.vision_tower
    if name == TINY:
        config = tiny.tiny_vision_config()
        return CLIPVisionModel(config), _square_processor(config.image_size)
    if name.startswith(OPEN_CLIP_PREFIX):
        from .open_clip_tower import clip_vision_from_open_clip

        return clip_vision_from_open_clip(name[len(OPEN_CLIP_PREFIX):])
    try:
        tower = CLIPVisionModel.from_pretrained(name, **_hub_kwargs(cfg))
        processor = CLIPImageProcessor.from_pretrained(name, **_hub_kwargs(cfg))
    except (OSError, ValueError) as error:
        raise _missing("vision_tower", name, cfg, error) from error
    return tower, processor


def load_language_model(cfg: ModelConfig):
    """The decoder and its tokenizer, the decoder quantized when asked."""
    tokenizer = tiny.tiny_tokenizer() if cfg.language_model == TINY else load_tokenizer(cfg)
    return load_decoder(cfg), tokenizer


def load_decoder(cfg: ModelConfig):
    """The decoder's weights (quantized when asked), without its tokenizer."""
    name = cfg.language_model
    if name == TINY:
        if cfg.quantization:
            raise ModelError("a quantized decoder is loaded from a checkpoint: save the tiny decoder first")
        return LlamaForCausalLM(tiny.tiny_text_config())
    kwargs = {**_hub_kwargs(cfg), "dtype": DTYPES[cfg.torch_dtype]}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if cfg.quantization:
        kwargs["quantization_config"] = quantization_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise _missing("language_model", name, cfg, error) from error
    if not (hasattr(model, "model") and hasattr(model, "lm_head")):
        raise ModelError(f"language_model {name!r} ({type(model).__name__}) is not a decoder with .model and .lm_head")
    return model


SENTENCEPIECE_FILE = "tokenizer.model"  # what Vicuna and Llama-2 ship instead of (or beside) tokenizer.json


def load_tokenizer(cfg: ModelConfig):
    """The decoder's tokenizer, with ``cfg.tokenizer_legacy`` applied where the tokenizer has the setting."""
    name = cfg.language_model
    kwargs = _hub_kwargs(cfg) | ({"gguf_file": cfg.gguf_file} if cfg.gguf_file else {})
    if not cfg.gguf_file and _has_file(name, SENTENCEPIECE_FILE) and not _has_file(name, "tokenizer.json"):
        # transformers 5 would report a missing `tiktoken` instead, after failing to read the file.
        missing = [package for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"))
                   if not _importable(module)]
        if missing:
            raise ModelError(f"language_model {name!r} has a SentencePiece {SENTENCEPIECE_FILE} and no tokenizer.json; "
                             f"reading it needs {' and '.join(missing)}: pip install sentencepiece protobuf")
    tokenizer = _auto_tokenizer(cfg, **kwargs)
    if not hasattr(tokenizer, "legacy"):  # only SentencePiece tokenizers of the Llama family have the flag
        return tokenizer
    want = cfg.tokenizer_legacy
    if want is not None and _prefixes_after_special_tokens(tokenizer) != want:
        # transformers 4 applies `legacy` to a fast tokenizer only while converting it from tokenizer.model.
        from_slow = {"from_slow": True} if int(transformers.__version__.split(".")[0]) < 5 else {}
        tokenizer = _auto_tokenizer(cfg, legacy=want, **from_slow, **kwargs)
        if _prefixes_after_special_tokens(tokenizer) != want:
            raise ModelError(f"language_model {name!r}: its tokenizer ({type(tokenizer).__name__}) does not take "
                             f"tokenizer_legacy={want}; set model.tokenizer_legacy: null to keep its own behaviour")
    # transformers 5 does not write `legacy` to a saved tokenizer_config.json and rebuilds a reloaded Llama
    # tokenizer with legacy=False; recorded here, a saved processor tokenizes as this one does.
    tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    return tokenizer


def _auto_tokenizer(cfg: ModelConfig, **kwargs):
    try:
        return AutoTokenizer.from_pretrained(cfg.language_model, **kwargs)
    except (OSError, ValueError) as error:
        raise _missing("language_model", cfg.language_model, cfg, error) from error


def _prefixes_after_special_tokens(tokenizer) -> bool:
    """Whether a word right after a special token gets SentencePiece's "▁" prefix (transformers' legacy)."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return ids(tokenizer.eos_token + "a")[1:] == ids("a")


def _has_file(name: str, filename: str) -> bool:
    """Whether a local folder, or a repository in the HF cache, holds ``filename``."""
    if Path(name).is_dir():
        return Path(name, filename).is_file()
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, filename), str)
    except ValueError:  # not a repository id either; loading will say so
        return False


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig:
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES[cfg.torch_dtype] if cfg.torch_dtype != "float32" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def add_image_token(tokenizer, image_token: str):
    """The tokenizer as LLaVA uses it: ``image_token`` in its vocabulary, a pad token set. Returns it."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        # LLaVA v1 pads with unk (Vicuna has no pad token); else fall back to EOS.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _ensure_image_token(tokenizer, decoder, image_token: str) -> int:
    """The image token's id, the decoder's embeddings grown to the tokenizer's vocabulary."""
    add_image_token(tokenizer, image_token)
    old = decoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:
        # New rows (the image token) start at the mean of the old ones, deterministically, so a
        # LoRA base rebuilt from its spec at load time is the base that was trained.
        decoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for embedding in {decoder.get_input_embeddings(), decoder.get_output_embeddings()}:
                if embedding is not None:
                    embedding.weight[old:] = embedding.weight[:old].mean(dim=0)
    return tokenizer.convert_tokens_to_ids(image_token)


def load_mm_projector(projector: LlavaMultiModalProjector, path: str | os.PathLike) -> None:
    """Load LLaVA's stage-1 projector (keys model.mm_projector.{0,2}.{weight,bias}) into the connector."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"mm_projector file {str(path)!r} does not exist")
    with reading(path):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        short = key.split("mm_projector.")[-1]  # accept model.mm_projector.0.weight and mm_projector.0.weight
        index, _, leaf = short.partition(".")
        target = {"0": "linear_1", "2": "linear_2"}.get(index)
        if "mm_projector." not in key or target is None:
            raise ModelError(f"{path}: unexpected key {key!r}; expected model.mm_projector.{{0,2}}.{{weight,bias}}")
        renamed[f"{target}.{leaf}"] = value
    expected = {name: p.shape for name, p in projector.state_dict().items()}
    if set(renamed) != set(expected):
        raise ModelError(f"{path}: keys {sorted(renamed)} do not match the connector's {sorted(expected)}")
    for name, value in renamed.items():
        if value.shape != expected[name]:
            raise ModelError(f"{path}: {name} has shape {tuple(value.shape)}, the connector needs "
                             f"{tuple(expected[name])} (vision or decoder size differs from the projector's)")
    projector.load_state_dict({k: v.to(projector.linear_1.weight.dtype) for k, v in renamed.items()})


MM_PROJECTOR_FILE = "mm_projector.safetensors"
# LLaVA-v1.5's mlp2x_gelu connector, as LlavaConfig options (every connector built here uses them).
PROJECTOR_OPTIONS = {"projector_hidden_act": "gelu", "multimodal_projector_bias": True}


def save_mm_projector(projector: LlavaMultiModalProjector, folder: str | os.PathLike) -> Path:
    """Write the connector as stage 1's output, official key layout, safetensors; ``load_mm_projector`` reads it."""
    from safetensors.torch import save_file

    names = {"linear_1": "0", "linear_2": "2"}
    state = {f"model.mm_projector.{names[k.split('.')[0]]}.{k.split('.')[1]}": v.detach().cpu().contiguous()
             for k, v in projector.state_dict().items()}
    path = Path(folder) / MM_PROJECTOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def load_preprocessing(cfg: ModelConfig) -> tuple[LlavaProcessor, int]:
    """(the processor a model built from ``cfg`` uses, the number of image tokens), read without weights.

    The tokenizer has the image token and a pad token (:func:`add_image_token`); the image processor and
    the token count ((image_size // patch_size) ** 2) come from the vision tower's config files (for an
    open_clip tower, its model and pretrained-tag configs). A run checks and tokenizes its whole data
    file with these before any weights load, then hands the processor to :func:`build_llava`.
    """
    image_processor, vision_config = _vision_preprocessing(cfg)
    tokenizer = add_image_token(tiny.tiny_tokenizer() if cfg.language_model == TINY else load_tokenizer(cfg),
                                cfg.image_token)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                               image_token=cfg.image_token, num_additional_image_tokens=1)
    return processor, (vision_config.image_size // vision_config.patch_size) ** 2


def _vision_preprocessing(cfg: ModelConfig) -> tuple[CLIPImageProcessor, CLIPVisionConfig]:
    """The tower's image processor and its config (image and patch size at least), without its weights."""
    name = cfg.vision_tower
    if name == TINY:
        config = tiny.tiny_vision_config()
        return _square_processor(config.image_size), config
    if name.startswith(OPEN_CLIP_PREFIX):
        from .open_clip_tower import open_clip_preprocessing

        return open_clip_preprocessing(name[len(OPEN_CLIP_PREFIX):])
    try:
        # A full CLIP folder's config.json holds the vision config as a part; from_pretrained takes it out.
        config = CLIPVisionConfig.from_pretrained(name, **_hub_kwargs(cfg))
        processor = CLIPImageProcessor.from_pretrained(name, **_hub_kwargs(cfg))
    except (OSError, ValueError) as error:
        raise _missing("vision_tower", name, cfg, error) from error
    return processor, config


def build_llava(cfg: ModelConfig, processor: LlavaProcessor | None = None):
    """Assemble (model, processor). The vision tower is frozen; connector and decoder are trainable.

    ``processor``: the one :func:`load_preprocessing` gave for ``cfg`` (a run tokenizes its data with it
    before the weights load); by default it is loaded here.
    """
    if processor is None:
        processor, _ = load_preprocessing(cfg)
    tower, _ = load_vision_tower(cfg)
    decoder = load_decoder(cfg)
    tokenizer = processor.tokenizer
    image_token_id = _ensure_image_token(tokenizer, decoder, cfg.image_token)
    vision_config = tower.config
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=decoder.config.to_dict(), image_token_id=image_token_id,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default",  # drop CLS, as LLaVA's "patch" features
        image_seq_length=num_patches, **PROJECTOR_OPTIONS,
        tie_word_embeddings=getattr(decoder.config, "tie_word_embeddings", False),
    )
    dtype = DTYPES[cfg.torch_dtype]
    # Build the shell without allocating, then put the loaded parts in (composition, not a fork).
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower.to(dtype).requires_grad_(False)
    model.model.language_model = decoder.model
    model.lm_head = decoder.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    if getattr(decoder, "hf_quantizer", None) is not None:
        model.hf_quantizer = decoder.hf_quantizer
        model.is_quantized = True
        model.config.quantization_config = decoder.config.quantization_config
    if cfg.mm_projector:
        load_mm_projector(model.model.multi_modal_projector, cfg.mm_projector)
    return model, processor


def save_spec(cfg: ModelConfig, folder: str | os.PathLike) -> None:
    Path(folder, SPEC_FILE).write_text(json.dumps(asdict(cfg), indent=1))


def read_spec(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder, SPEC_FILE)
    with reading(path):
        data = json.loads(path.read_text())
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in known})
