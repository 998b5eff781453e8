"""open_clip -> HF CLIPVisionModel conversion, on tiny randomly initialised open_clip models (no downloads)."""

import json
import re

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from PIL import Image  # noqa: E402
from transformers import CLIPVisionModel  # noqa: E402
from transformers.image_utils import PILImageResampling  # noqa: E402

from llava_sgg.model.open_clip_tower import (  # noqa: E402
    clip_vision_from_open_clip,
    convert_open_clip_visual,
    open_clip_image_processor,
    open_clip_preprocessing,
)

PREFIX = "llava-sgg-test-"
TINY = PREFIX + "vit"
VISION = {"image_size": 56, "patch_size": 14, "width": 32, "layers": 3, "head_width": 16, "mlp_ratio": 2.0}
TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
# name suffix -> (top-level overrides, vision_cfg overrides)
VARIANTS = {
    "vit": ({}, {}),
    "vit-quickgelu": ({"quick_gelu": True}, {}),
    "vit-tanh": ({}, {"act_kwargs": {"approximate": "tanh"}}),
    "vit-eps6": ({}, {"norm_kwargs": {"eps": 1e-6}}),
    "vit-custom-block": ({}, {"block_type": "custom"}),
    "vit-final-ln-after-pool": ({}, {"final_ln_after_pool": True}),
    "vit-patch-dropout": ({}, {"patch_dropout": 0.5}),
    "vit-ls": ({}, {"ls_init_value": 0.1}),
    "vit-attn-pool": ({}, {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}),
    "vit-no-ln-pre": ({}, {"no_ln_pre": True}),
    "vit-avg-pool": ({}, {"pool_type": "avg"}),
    "vit-qk-norm": ({}, {"qk_norm": True}),
    "vit-non-square": ({}, {"image_size": [56, 42]}),
    "resnet": ({}, {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 64}),
    "timm": ({}, {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "linear",
                  "image_size": 32}),
}
UNSUPPORTED = {
    "vit-ls": "layer scale",
    "vit-attn-pool": "attentional pooler",
    "vit-no-ln-pre": "no_ln_pre",
    "vit-avg-pool": "pool_type='avg'",
    "vit-qk-norm": "qk_norm",
    "vit-non-square": "not square",
    "resnet": "ModifiedResNet",
    "timm": "TimmModel",
}
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for suffix, (top, vision) in VARIANTS.items():
        config = {"embed_dim": 16, **top, "vision_cfg": {**VISION, **vision}, "text_cfg": TEXT}
        (folder / f"{PREFIX}{suffix}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def perturbed(name: str, seed: int = 0):
    """A tiny open_clip model whose every weight is random (open_clip starts norms at 1/0 and qkv biases at 0)."""
    model = open_clip.create_model(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def images(n: int = 2, size: int = 56, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def open_clip_activations(visual, pixels):
    """open_clip's own ln_pre output, every block's output (batch first) and ln_post output."""
    batch_first = visual.transformer.batch_first
    seen = {"blocks": []}

    def block_hook(module, args, output):
        seen["blocks"].append(output if batch_first else output.transpose(0, 1))

    hooks = [visual.ln_pre.register_forward_hook(lambda m, a, out: seen.__setitem__("ln_pre", out)),
             visual.ln_post.register_forward_hook(lambda m, a, out: seen.__setitem__("ln_post", out))]
    hooks += [block.register_forward_hook(block_hook) for block in visual.transformer.resblocks]
    try:
        with torch.no_grad():
            seen["features"] = visual(pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def make_seq_first(visual):
    """Run open_clip's stack sequence-first (L, N, D), as older open_clip releases did."""
    visual.transformer.batch_first = False
    for block in visual.transformer.resblocks:
        block.attn.batch_first = False


@pytest.mark.parametrize("suffix, hidden_act, seq_first", [
    ("vit", "gelu", False),
    ("vit-quickgelu", "quick_gelu", False),
    ("vit-quickgelu", "quick_gelu", True),
    ("vit-tanh", "gelu_pytorch_tanh", False),
    ("vit-eps6", "gelu", False),
    ("vit-custom-block", "gelu", False),
    ("vit-final-ln-after-pool", "gelu", False),
])
def test_converted_tower_matches_open_clip(suffix, hidden_act, seq_first):
    model = perturbed(PREFIX + suffix)
    visual = model.visual
    if seq_first:
        make_seq_first(visual)
    pixels = images()
    ref = open_clip_activations(visual, pixels)
    tower = convert_open_clip_visual(visual, name=suffix)

    config = tower.config
    assert config.hidden_act == hidden_act
    assert config.layer_norm_eps == (1e-6 if suffix == "vit-eps6" else 1e-5)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.image_size, config.patch_size) == (32, 3, 2, 64, 56, 14)
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)

    # What LLaVA feeds its projector: layer -2 without the class token.
    torch.testing.assert_close(out.hidden_states[-2][:, 1:], ref["blocks"][-2][:, 1:], **TIGHT)
    assert len(out.hidden_states) == len(ref["blocks"]) + 1
    torch.testing.assert_close(out.hidden_states[0], ref["ln_pre"], **TIGHT)
    for hf_state, block_out in zip(out.hidden_states[1:], ref["blocks"]):
        torch.testing.assert_close(hf_state, block_out, **TIGHT)
    torch.testing.assert_close(out.last_hidden_state, ref["blocks"][-1], **TIGHT)
    pooled_ln = ref["ln_post"] if suffix == "vit-final-ln-after-pool" else ref["ln_post"][:, 0]
    torch.testing.assert_close(out.pooler_output, pooled_ln, **TIGHT)
    torch.testing.assert_close(out.pooler_output @ visual.proj, ref["features"], **TIGHT)


def test_save_and_reload_round_trip(tmp_path):
    tower = convert_open_clip_visual(perturbed(PREFIX + "vit-quickgelu").visual)
    tower.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = CLIPVisionModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_act == "quick_gelu"
    pixels = images()
    with torch.no_grad():
        before = tower(pixel_values=pixels, output_hidden_states=True)
        after = reloaded(pixel_values=pixels, output_hidden_states=True)
    for a, b in zip(before.hidden_states, after.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(before.pooler_output, after.pooler_output, rtol=0, atol=0)


def smooth_image(width: int = 80, height: int = 64) -> Image.Image:
    # A smooth picture keeps PIL's and torchvision's bicubic kernels within a few grey levels of each other.
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    rgb = torch.stack([x, y, (x + y) / 2 + 0.2 * torch.sin(8 * x)], dim=-1).clamp(0, 1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


def test_image_processor_matches_open_clip_preprocess():
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    processor = open_clip_image_processor(model)
    assert processor.image_mean == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    assert processor.image_std == pytest.approx(list(open_clip.OPENAI_DATASET_STD))
    assert processor.size["shortest_edge"] == 56
    assert (processor.crop_size["height"], processor.crop_size["width"]) == (56, 56)
    assert processor.do_center_crop and processor.resample == PILImageResampling.BICUBIC

    image = smooth_image()
    ours = processor(images=image, return_tensors="pt")["pixel_values"][0]
    theirs = preprocess(image)
    assert ours.shape == theirs.shape == (3, 56, 56)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.03)  # ~2 grey levels after normalising


def test_image_processor_from_config_squash_and_bilinear():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = {"size": 56, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bilinear",
           "resize_mode": "squash"}
    processor = open_clip_image_processor(cfg)
    assert processor.image_mean == pytest.approx([0.5, 0.4, 0.3])
    assert processor.image_std == pytest.approx([0.2, 0.25, 0.3])
    assert processor.resample == PILImageResampling.BILINEAR and not processor.do_center_crop
    image = smooth_image()
    ours = processor(images=image, return_tensors="pt")["pixel_values"][0]
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(image)
    assert ours.shape == theirs.shape == (3, 56, 56)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.03)

    with pytest.raises(ValueError, match="resize_mode 'longest'"):
        open_clip_image_processor({**cfg, "resize_mode": "longest"}, name="padded")


def test_clip_vision_from_open_clip_random_init():
    tower, processor = clip_vision_from_open_clip(TINY)
    assert isinstance(tower, CLIPVisionModel) and not tower.training
    assert (tower.config.hidden_size, tower.config.num_hidden_layers, tower.config.image_size,
            tower.config.patch_size, tower.config.hidden_act) == (32, 3, 56, 14, "gelu")
    assert processor.crop_size["height"] == 56
    with torch.no_grad():
        out = tower(pixel_values=images(1), output_hidden_states=True)
    assert out.hidden_states[-2][:, 1:].shape == (1, 16, 32)


def test_clip_vision_from_open_clip_loads_local_weights(tmp_path):
    from safetensors.torch import save_file

    model = perturbed(TINY, seed=3)
    path = tmp_path / "tiny_weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    tower, _ = clip_vision_from_open_clip(f"{TINY}/{path}")
    expected = convert_open_clip_visual(model.visual).state_dict()
    for key, value in tower.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_clip_vision_from_open_clip_resolves_a_cached_tag(tmp_path, monkeypatch):
    """A pretrained tag is read from the local HF cache, with the tag's activation and preprocessing."""
    import huggingface_hub.constants as hub
    from safetensors.torch import save_file

    # Trained "with QuickGELU" on a plain-GELU model name, like ViT-L-14-336/openai.
    tag = {"hf_hub": "llava-sgg/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
           "interpolation": "bicubic", "resize_mode": "shortest", "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"cached": tag})
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    commit = "0" * 40
    repo = tmp_path / "models--llava-sgg--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    model = perturbed(TINY, seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / commit / "open_clip_model.safetensors"))

    tower, processor = clip_vision_from_open_clip(f"{TINY}/cached")
    assert open_clip_preprocessing(f"{TINY}/cached")[0].to_dict() == processor.to_dict()  # the tag's mean, std
    assert tower.config.hidden_act == "quick_gelu"
    assert processor.image_mean == pytest.approx([0.5] * 3) and processor.image_std == pytest.approx([0.25] * 3)
    expected = convert_open_clip_visual(model.visual).state_dict()
    for key, value in tower.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_preprocessing_is_read_without_building_the_tower():
    """What a run tokenizes its data with before any weights load: the built tower's processor and token count."""
    from llava_sgg.model.builder import ModelConfig, load_preprocessing

    tower, built = clip_vision_from_open_clip(TINY)
    processor, config = open_clip_preprocessing(TINY)
    assert processor.to_dict() == built.to_dict()
    assert (config.image_size, config.patch_size) == (tower.config.image_size, tower.config.patch_size)
    llava, num_image_tokens = load_preprocessing(ModelConfig(vision_tower=f"open_clip:{TINY}", language_model="tiny"))
    assert num_image_tokens == 16 and llava.image_processor.to_dict() == built.to_dict()
    for suffix in ("resnet", "timm"):
        with pytest.raises(ValueError, match=re.escape(f"open_clip:{PREFIX}{suffix}") + ".*" + UNSUPPORTED[suffix]):
            open_clip_preprocessing(PREFIX + suffix)


def test_patch_dropout_is_rejected_but_disabled_from_a_spec():
    name = PREFIX + "vit-patch-dropout"
    with pytest.raises(ValueError, match=re.escape(name) + ".*patch dropout"):
        convert_open_clip_visual(open_clip.create_model(name).visual, name=name)
    tower, _ = clip_vision_from_open_clip(name)  # built for inference, where patch dropout is the identity
    assert tower.config.num_hidden_layers == 3


def test_bad_specs_name_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no-such-model-xyz"):
        clip_vision_from_open_clip("no-such-model-xyz")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(f"open_clip:{TINY}/{missing}")):
        clip_vision_from_open_clip(f"{TINY}/{missing}")
    with pytest.raises(ValueError, match="hf-hub:org/repo"):
        clip_vision_from_open_clip("hf-hub:org/repo")

    import huggingface_hub.constants as hub

    # An empty cache: a real tag must fail as "not cached", never fall through to a download.
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    offline_before = hub.HF_HUB_OFFLINE
    with pytest.raises(FileNotFoundError, match=r"open_clip:ViT-B-32/openai.*not in the local Hugging Face cache"):
        clip_vision_from_open_clip("ViT-B-32/openai")
    assert hub.HF_HUB_OFFLINE == offline_before


@pytest.mark.parametrize("suffix", sorted(UNSUPPORTED))
def test_unsupported_towers_raise_naming_the_model(suffix):
    name = PREFIX + suffix
    with pytest.raises(ValueError, match=re.escape(f"open_clip:{name}") + ".*" + re.escape(UNSUPPORTED[suffix])):
        clip_vision_from_open_clip(name)


def test_mixed_layer_norm_eps_is_rejected():
    visual = open_clip.create_model(TINY).visual
    visual.ln_post.eps = 1e-3
    with pytest.raises(ValueError, match="mixed-eps.*LayerNorm eps"):
        convert_open_clip_visual(visual, name="mixed-eps")
