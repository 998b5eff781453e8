"""open_clip vision towers as plain Hugging Face ``CLIPVisionModel``s.

LLaVA reads ``hidden_states[-2][:, 1:]`` of a CLIP ViT; transformers' Llava does that selection itself on an
HF ``CLIPVisionModel``. Converting open_clip's ``VisionTransformer`` weights into that class (instead of
wrapping open_clip) keeps every checkpoint a stock HF Llava checkpoint that transformers and serving engines
load without this package. Only towers whose forward the HF class reproduces exactly are accepted.

open_clip (and torchvision, which it imports) is imported inside the functions, so neither is loaded until an
open_clip tower is actually asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
from collections.abc import Mapping

import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import PILImageResampling

_SCHEMAS = ("hf-hub:", "local-dir:")
# open_clip's eval transform treats "random" as bicubic.
_RESAMPLE = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR,
             "random": PILImageResampling.BICUBIC}


def _pair(value) -> tuple[int, int]:
    if isinstance(value, numbers.Number):
        return int(value), int(value)
    value = tuple(int(v) for v in value)
    return (value[0], value[0]) if len(value) == 1 else value[-2:]


def _unsupported(name: str, why: str) -> ValueError:
    return ValueError(f"{name}: this open_clip vision tower cannot be converted to an exactly equivalent HF "
                      f"CLIPVisionModel: {why}")


# --- architecture checks -------------------------------------------------------------------------------------

def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _check_tower(visual: nn.Module, name: str) -> None:
    from open_clip.transformer import PatchDropout, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise _unsupported(name, f"it is a {type(visual).__name__}, not open_clip's VisionTransformer "
                                 "(ModifiedResNet and timm towers have no HF CLIP counterpart)")
    if getattr(visual, "attn_pool", None) is not None:
        raise _unsupported(name, "it pools with an attentional pooler")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise _unsupported(name, f"it pools with pool_type={visual.pool_type!r}; HF CLIP pools the class token")
    # final_ln_after_pool needs no check: with class-token pooling, ln_post before or after pooling gives the
    # same pooled vector, and HF applies post_layernorm to the pooled token only.
    if getattr(visual, "class_embedding", None) is None:
        raise _unsupported(name, "it has no class token")
    dropout = visual.patch_dropout
    if not (_is_identity(dropout) or (isinstance(dropout, PatchDropout) and dropout.prob == 0)):
        raise _unsupported(name, "it uses patch dropout, which changes the token count in training "
                                 "(build it with patch_dropout=0)")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        raise _unsupported(name, "it has no LayerNorm before the transformer (no_ln_pre)")
    if not isinstance(visual.ln_post, nn.LayerNorm):
        raise _unsupported(name, "its final norm is not a LayerNorm")
    image, patch = _pair(visual.image_size), _pair(visual.patch_size)
    if image[0] != image[1] or patch[0] != patch[1]:
        raise _unsupported(name, f"image size {image} / patch size {patch} are not square")
    conv = visual.conv1
    if (conv.bias is not None or _pair(conv.kernel_size) != patch or _pair(conv.stride) != patch
            or _pair(conv.padding) != (0, 0) or _pair(conv.dilation) != (1, 1) or conv.groups != 1):
        raise _unsupported(name, "its patch embedding is not a bias-free, non-overlapping patch convolution")
    grid = image[0] // patch[0]
    if tuple(visual.positional_embedding.shape) != (grid * grid + 1, conv.out_channels):
        raise _unsupported(name, f"its positional embedding {tuple(visual.positional_embedding.shape)} is not "
                                 f"one per patch plus the class token ({grid * grid + 1})")
    for index, block in enumerate(visual.transformer.resblocks):
        _check_block(block, f"block {index}", name)


def _check_block(block: nn.Module, where: str, name: str) -> None:
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    if not isinstance(block, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
        raise _unsupported(name, f"{where} is an unknown block type {type(block).__name__}")
    if not (_is_identity(block.ls_1) and _is_identity(block.ls_2)):
        raise _unsupported(name, f"{where} uses layer scale (ls_init_value)")
    if hasattr(block, "ln_1_kv"):
        raise _unsupported(name, f"{where} is a cross-attention block")
    if not (isinstance(block.ln_1, nn.LayerNorm) and isinstance(block.ln_2, nn.LayerNorm)):
        raise _unsupported(name, f"{where} has norms that are not LayerNorms")
    if set(dict(block.mlp.named_children())) - {"c_fc", "gelu", "ln", "c_proj"} or not _is_identity(
            getattr(block.mlp, "ln", None)):
        raise _unsupported(name, f"{where} has an MLP that is not Linear, activation, Linear (scale_fc adds a norm)")
    attn = block.attn
    if isinstance(attn, nn.MultiheadAttention):
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise _unsupported(name, f"{where} has attention with separate q/k/v sizes or extra key/value biases")
        return
    extras = {"qk_norm": not (_is_identity(attn.ln_q) and _is_identity(attn.ln_k)),
              "scaled_cosine_attn": attn.logit_scale is not None,
              "scale_heads": attn.head_scale is not None,
              "scale_attn_inner": not _is_identity(attn.ln_inner),
              "scale_attn": not _is_identity(block.ln_attn),
              "output dropout": attn.out_drop.p > 0}
    used = [feature for feature, on in extras.items() if on]
    if used:
        raise _unsupported(name, f"{where} has attention with {', '.join(used)}")


# --- config ----------------------------------------------------------------------------------------------------

def _hidden_act(block: nn.Module, where: str) -> str:
    from open_clip.transformer import QuickGELU

    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        # HF "gelu" is the exact erf GELU; "gelu_pytorch_tanh" is torch's own tanh approximation.
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise _unsupported(where, f"activation {type(act).__name__} has no HF equivalent here")


def _single(values: set, what: str, name: str):
    # HF CLIP has one value per model where open_clip allows one per module.
    if len(values) != 1:
        raise _unsupported(name, f"its {what} differs between modules: {sorted(values)}")
    return values.pop()


def _attention_dropout(attn: nn.Module) -> float:
    return attn.dropout if isinstance(attn, nn.MultiheadAttention) else attn.attn_drop.p


def _vision_config(visual: nn.Module, *, name: str = "open_clip") -> CLIPVisionConfig:
    """The CLIPVisionConfig matching a (checked) open_clip VisionTransformer, read from its modules."""
    blocks = list(visual.transformer.resblocks)
    norms = [visual.ln_pre, visual.ln_post] + [n for b in blocks for n in (b.ln_1, b.ln_2)]
    config = CLIPVisionConfig(
        hidden_size=visual.conv1.out_channels,
        intermediate_size=_single({b.mlp.c_fc.out_features for b in blocks}, "MLP width", name),
        num_hidden_layers=len(blocks),
        num_attention_heads=_single({b.attn.num_heads for b in blocks}, "number of heads", name),
        num_channels=visual.conv1.in_channels,
        image_size=_pair(visual.image_size)[0],
        patch_size=_pair(visual.patch_size)[0],
        hidden_act=_single({_hidden_act(b, name) for b in blocks}, "activation", name),
        layer_norm_eps=_single({n.eps for n in norms}, "LayerNorm eps", name),
        attention_dropout=_single({_attention_dropout(b.attn) for b in blocks}, "attention dropout", name),
    )
    if getattr(visual, "proj", None) is not None:
        # Unused by CLIPVisionModel; kept so the config describes the CLIP embedding size.
        config.projection_dim = visual.proj.shape[1]
    return config


# --- weights ---------------------------------------------------------------------------------------------------

def _norm_state(norm: nn.LayerNorm, prefix: str) -> dict[str, torch.Tensor]:
    # open_clip norms may be built without affine weights or bias; HF's are always affine, so use the identity.
    width = norm.normalized_shape[0]
    weight = norm.weight if norm.weight is not None else torch.ones(width)
    bias = norm.bias if norm.bias is not None else torch.zeros(width)
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}


def _linear_state(weight: torch.Tensor, bias: torch.Tensor | None, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias if bias is not None else weight.new_zeros(len(weight))}


def _block_state(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    attn = block.attn
    # Both nn.MultiheadAttention and open_clip's Attention pack the input projection as rows [q; k; v].
    weights = attn.in_proj_weight.chunk(3)
    biases = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    state = {}
    for proj, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
        state.update(_linear_state(weight, bias, f"{prefix}.self_attn.{proj}"))
    state.update(_linear_state(attn.out_proj.weight, attn.out_proj.bias, f"{prefix}.self_attn.out_proj"))
    state.update(_norm_state(block.ln_1, f"{prefix}.layer_norm1"))
    state.update(_norm_state(block.ln_2, f"{prefix}.layer_norm2"))
    state.update(_linear_state(block.mlp.c_fc.weight, block.mlp.c_fc.bias, f"{prefix}.mlp.fc1"))
    state.update(_linear_state(block.mlp.c_proj.weight, block.mlp.c_proj.bias, f"{prefix}.mlp.fc2"))
    return state


def _hf_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip VisionTransformer weights under HF CLIP vision transformer names (``proj`` has no HF place)."""
    state = {
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.position_embedding.weight": visual.positional_embedding,
    }
    state.update(_norm_state(visual.ln_pre, "pre_layrnorm"))
    for index, block in enumerate(visual.transformer.resblocks):
        state.update(_block_state(block, f"encoder.layers.{index}"))
    state.update(_norm_state(visual.ln_post, "post_layernorm"))
    return {key: value.detach() for key, value in state.items()}


def convert_open_clip_visual(visual: nn.Module, *, name: str = "open_clip") -> CLIPVisionModel:
    """Build a CLIPVisionModel whose forward equals open_clip's VisionTransformer ``visual`` (weights copied).

    ``hidden_states[i]`` is open_clip's activation after ``ln_pre`` (i=0) or after block i-1, and
    ``pooler_output`` is ``ln_post`` of the class token (before ``proj``). Raises ValueError naming ``name``
    for towers the HF class cannot reproduce.
    """
    _check_tower(visual, name)
    config = _vision_config(visual, name=name)
    model = CLIPVisionModel(config)
    # transformers 4 nests the transformer under .vision_model, 5 does not; the names below it are the same.
    # A partial match would leave random weights behind silently, so every key must be mapped.
    getattr(model, "vision_model", model).load_state_dict(_hf_state_dict(visual), strict=True)
    reference = visual.conv1.weight
    return model.to(device=reference.device, dtype=reference.dtype).eval()


# --- image processor -------------------------------------------------------------------------------------------

def _as_preprocess_dict(source) -> dict:
    from open_clip import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if isinstance(source, PreprocessCfg):
        return dataclasses.asdict(source)
    if isinstance(source, nn.Module):
        source = get_model_preprocess_cfg(source)
    if isinstance(source, Mapping):
        # Fill what a partial or legacy config leaves out with open_clip's own defaults.
        return merge_preprocess_dict(PreprocessCfg(), dict(source))
    raise TypeError(f"expected an open_clip model, PreprocessCfg or dict, got {type(source).__name__}")


def _three(value) -> list[float]:
    return [float(value)] * 3 if isinstance(value, numbers.Number) else [float(v) for v in value]


def open_clip_image_processor(preprocess_cfg_or_model, *, name: str = "open_clip") -> CLIPImageProcessor:
    """Image processor with open_clip's mean/std and input size (resize shortest side + center crop).

    Accepts an open_clip model (or its ``.visual``), a ``PreprocessCfg`` or a dict. open_clip's "squash"
    resize maps to a plain resize; "longest" (resize then pad) has no CLIPImageProcessor form and raises.
    """
    cfg = _as_preprocess_dict(preprocess_cfg_or_model)
    height, width = _pair(cfg["size"])
    if height != width:
        raise ValueError(f"{name}: non-square input size {(height, width)} is not supported")
    resample = _RESAMPLE.get(cfg["interpolation"])
    if resample is None:
        raise ValueError(f"{name}: unknown open_clip interpolation {cfg['interpolation']!r}")
    if cfg["resize_mode"] == "shortest":
        size, center_crop = {"shortest_edge": height}, True
    elif cfg["resize_mode"] == "squash":
        size, center_crop = {"height": height, "width": width}, False
    else:
        raise ValueError(f"{name}: open_clip resize_mode {cfg['resize_mode']!r} (resize then pad) has no "
                         "CLIPImageProcessor equivalent")
    return CLIPImageProcessor(size=size, crop_size={"height": height, "width": width}, do_center_crop=center_crop,
                              resample=resample, image_mean=_three(cfg["mean"]), image_std=_three(cfg["std"]))


# --- from a spec -----------------------------------------------------------------------------------------------

def _parse_spec(spec: str) -> tuple[str, str | None]:
    # Split at the first "/": open_clip model names have none, a weights path may have many.
    if spec.startswith(_SCHEMAS):
        raise ValueError(f"open_clip:{spec}: hub and directory schemas are not supported; use "
                         "'<model>/<pretrained tag>' or '<model>/<path to a weights file>'")
    model_name, _, pretrained = spec.partition("/")
    if not model_name:
        raise ValueError(f"open_clip:{spec}: no model name; expected '<model>' or '<model>/<pretrained>'")
    return model_name, pretrained or None


@contextlib.contextmanager
def _hub_offline():
    """Make every Hugging Face Hub request fail instead of downloading.

    huggingface_hub (and transformers through it) reads this flag on each request, so setting it here covers
    open_clip's weight lookup and any HF text tower config alike. Not thread-safe, like any global switch.
    """
    import huggingface_hub.constants as hub

    previous, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def _pretrained_source(spec: str, model_name: str, pretrained: str) -> tuple[str, dict]:
    """(what to pass open_clip as ``pretrained``, the tag's config or {}), failing early if nothing is local."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise FileNotFoundError(f"open_clip:{spec}: {pretrained!r} is neither an open_clip pretrained tag of "
                                    f"{model_name!r} (tags: {', '.join(tags) or 'none'}) nor an existing file")
        return path, {}
    if not (tag_cfg.get("hf_hub") or tag_cfg.get("file")):
        # open_clip fetches URL-only tags with urllib, outside any offline switch.
        raise FileNotFoundError(f"open_clip:{spec}: tag {pretrained!r} is only downloadable by URL; download "
                                f"{tag_cfg.get('url')} yourself and pass its path instead of the tag")
    with _hub_offline():
        try:
            open_clip.download_pretrained(tag_cfg)
        except Exception as error:  # huggingface_hub raises several types for "not cached"
            raise FileNotFoundError(
                f"open_clip:{spec}: weights for tag {pretrained!r} ({tag_cfg.get('hf_hub') or tag_cfg['file']}) "
                f"are not in the local Hugging Face cache and downloads are disabled; put them there first or "
                f"pass a local weights file ({type(error).__name__}: {error})") from error
    return pretrained, tag_cfg


def clip_vision_from_open_clip(spec: str) -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """spec: '<model>' or '<model>/<pretrained>' (the part after 'open_clip:'); <pretrained> is an open_clip
    pretrained tag (resolved by open_clip from the local HF cache) or a path to a local weights file.

    Nothing is downloaded. Without <pretrained> the tower is randomly initialised (useful for tests only).
    """
    import open_clip

    model_name, pretrained = _parse_spec(spec)
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"open_clip:{spec}: unknown open_clip model {model_name!r} (see open_clip.list_models())")
    source, tag_cfg = _pretrained_source(spec, model_name, pretrained) if pretrained else (None, {})
    with _hub_offline():
        try:
            model = open_clip.create_model(
                model_name, pretrained=source, weights_only=True,
                # The tag's weights were trained with QuickGELU; open_clip only warns on a plain-GELU model
                # name, which would yield a tower whose features differ from the checkpoint's.
                force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
                # Patch dropout is a pretraining regulariser (identity at eval); LLaVA needs every patch token.
                force_patch_dropout=0.0,
                pretrained_image=False, pretrained_text=False)
        except (RuntimeError, OSError) as error:
            raise RuntimeError(f"open_clip:{spec}: open_clip could not build the model offline "
                               f"({type(error).__name__}: {error})") from error
    name = f"open_clip:{spec}"
    tower = convert_open_clip_visual(model.visual, name=name)
    return tower, open_clip_image_processor(model, name=name)


def open_clip_preprocessing(spec: str) -> tuple[CLIPImageProcessor, CLIPVisionConfig]:
    """What :func:`clip_vision_from_open_clip` gives besides the weights, from open_clip's configs alone.

    The image processor (open_clip's default preprocessing, the pretrained tag's on top, the model's input
    size, as ``open_clip.create_model`` sets it) and a config holding the tower's image and patch size. The
    weights are not read, but a tag's or file's presence is checked, so a run can check its data first.
    """
    import open_clip
    from open_clip.model import CLIPVisionCfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    model_name, pretrained = _parse_spec(spec)
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"open_clip:{spec}: unknown open_clip model {model_name!r} (see open_clip.list_models())")
    _, tag_cfg = _pretrained_source(spec, model_name, pretrained) if pretrained else (None, {})
    name = f"open_clip:{spec}"
    vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
    if vision.timm_model_name:
        raise _unsupported(name, "it is a TimmModel, not open_clip's VisionTransformer")
    if not isinstance(vision.layers, int):
        raise _unsupported(name, "it is a ModifiedResNet, not open_clip's VisionTransformer")
    preprocess = merge_preprocess_dict(PreprocessCfg(), tag_cfg)
    preprocess["size"] = vision.image_size
    processor = open_clip_image_processor(preprocess, name=name)
    return processor, CLIPVisionConfig(image_size=_pair(vision.image_size)[0], patch_size=_pair(vision.patch_size)[0])
