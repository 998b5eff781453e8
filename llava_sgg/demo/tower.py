"""Pretraining the demo's vision tower: what a downloaded CLIP checkpoint would bring, made here.

LLaVA-v1.5 keeps its CLIP tower frozen: it relies on features that already tell objects apart. No
pretrained CLIP installs offline, and a tower trained from scratch *through* the language model
learns counting within the demo's budget but not which digit is which. So before fine-tuning, the
CLIP ViT built from config is pretrained on the training split alone: every patch token of the
layer LLaVA reads (``vision_feature_layer``) is classified as the digit whose grid cell holds the
patch's centre, or as empty, through a linear head that is then dropped.
The result is saved like any CLIP checkpoint and loaded, frozen, by the fine-tuning runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModel

from ..data.image import load_image, process_image
from .data import N_LABELS, DemoData, DemoDataConfig

__all__ = ["EMPTY", "TowerPretraining", "load_split", "patch_cells", "patch_features", "patch_labels", "pretrain_vision_tower"]

EMPTY = N_LABELS  # the class of a patch whose cell holds no digit
# The head's outputs per patch token: its digit (or empty), the digits present anywhere, its place.
DIGIT, PRESENT = slice(0, N_LABELS + 1), slice(N_LABELS + 1, 2 * N_LABELS + 1)
PLACE = slice(2 * N_LABELS + 1, None)


@dataclass(frozen=True)
class TowerPretraining:
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    feature_layer: int = -2   # the hidden state LLaVA reads (ModelConfig.vision_feature_layer)
    # Weight of a second head on every patch token: which digits the whole image holds (multi-hot),
    # so that each token also carries the scene's content, as a CLIP token carries its image's.
    presence_weight: float = 1.0
    # Weight of a third head: each patch token's own place (its index in the patch grid). CLIP's tokens
    # keep their place (its position embeddings survive into the features LLaVA reads); a tower trained
    # only to name digits may wash it out, and then no question about a place can be answered.
    position_weight: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if (self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0
                or self.presence_weight < 0 or self.position_weight < 0):
            raise ValueError(f"invalid TowerPretraining: need steps >= 1, batch_size >= 1, lr > 0, "
                             f"weight_decay >= 0, presence_weight >= 0, position_weight >= 0; got {self}")


def patch_cells(config: DemoDataConfig, image_size: int, patch_size: int) -> list[int]:
    """The grid cell (row * grid + column) of each patch centre, in the tower's row-major patch order; -1 outside.

    The scene is square and padded to a square unchanged, so the processor's resize maps canvas
    coordinates to image coordinates by ``image_size / canvas``.
    """
    per_side = image_size // patch_size
    cell_size = config.canvas // config.grid
    margin = (config.canvas - cell_size * config.grid) // 2
    cells = []
    for row in range(per_side):
        for column in range(per_side):
            y, x = ((row + 0.5) * patch_size * config.canvas / image_size - margin,
                    (column + 0.5) * patch_size * config.canvas / image_size - margin)
            inside = 0 <= y < cell_size * config.grid and 0 <= x < cell_size * config.grid
            cells.append(int(y // cell_size) * config.grid + int(x // cell_size) if inside else -1)
    return cells


def patch_labels(cells: list[int], digits: list[int], config: DemoDataConfig, image_size: int,
                 patch_size: int) -> torch.Tensor:
    """``LongTensor[n_patches]`` in the tower's row-major patch order: the digit of each patch centre's cell."""
    digit_at = dict(zip(cells, digits))
    return torch.tensor([digit_at.get(cell, EMPTY) for cell in patch_cells(config, image_size, patch_size)])


def load_split(data: DemoData, split: str, processor, config: DemoDataConfig, vision) -> tuple:
    scenes = json.loads(data.scenes_json.read_text())[split]
    pixels = torch.stack([process_image(load_image(data.image_folder / split / s["image"]), processor, "pad")
                          for s in tqdm(scenes, desc=f"tower data ({split})", leave=False)])
    labels = torch.stack([patch_labels(s["cells"], s["digits"], config, vision.image_size, vision.patch_size)
                          for s in scenes])
    return pixels, labels


def patch_features(tower, pixels, feature_layer):
    """[batch, patches, hidden]: the patch tokens LLaVA reads (CLS dropped, its "default" feature strategy)."""
    return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:]


def _patch_logits(tower, head, pixels, feature_layer):
    """[batch, patches, 11 + 10 + patches]: see DIGIT, PRESENT and PLACE."""
    return head(patch_features(tower, pixels, feature_layer))


def _presence(labels: torch.Tensor) -> torch.Tensor:
    """[batch, 10] multi-hot of the digits among each image's patch labels."""
    hot = torch.zeros(len(labels), N_LABELS + 1).scatter_(1, labels, 1.0)
    return hot[:, :N_LABELS]


@torch.no_grad()
def _accuracy(tower, head, pixels, labels, feature_layer, batch_size=256) -> tuple[float, float, float]:
    """(patch digit accuracy, per-token presence accuracy over the 10 digits, patch place accuracy)."""
    correct = present = placed = 0
    places = torch.arange(labels.shape[1])
    for start in range(0, len(pixels), batch_size):
        logits = _patch_logits(tower, head, pixels[start:start + batch_size], feature_layer)
        batch = labels[start:start + batch_size]
        correct += (logits[..., DIGIT].argmax(-1) == batch).sum().item()
        truth = _presence(batch)[:, None].expand(-1, batch.shape[1], -1)
        present += ((logits[..., PRESENT] > 0).float() == truth).sum().item()
        placed += (logits[..., PLACE].argmax(-1) == places).sum().item()
    return correct / labels.numel(), present / (labels.numel() * N_LABELS), placed / labels.numel()


def pretrain_vision_tower(initial: Path, data: DemoData, data_config: DemoDataConfig, cache: Path,
                          recipe: TowerPretraining = TowerPretraining()) -> tuple[Path, dict]:
    """Pretrain the tower saved at ``initial`` on ``data``'s training scenes; (folder, patch accuracies).

    Cached under ``cache`` by the initial tower, the data build and the recipe, so both fine-tuning runs
    (and later demos) start from the same file.
    """
    key = json.dumps({"initial": initial.name, "data": data.root.name, "recipe": asdict(recipe)}, sort_keys=True)
    folder = cache / f"{initial.name}-digits-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    report_path = folder / "pretraining.json"
    if report_path.is_file() and (folder / "config.json").is_file():
        return folder, json.loads(report_path.read_text())

    processor = CLIPImageProcessor.from_pretrained(initial)
    tower = CLIPVisionModel.from_pretrained(initial)
    vision = tower.config
    train_pixels, train_labels = load_split(data, "train", processor, data_config, vision)
    eval_pixels, eval_labels = load_split(data, "eval", processor, data_config, vision)

    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    n_patches = (vision.image_size // vision.patch_size) ** 2
    head = torch.nn.Linear(vision.hidden_size, PLACE.start + n_patches)
    places = torch.arange(n_patches).repeat(recipe.batch_size)
    parameters = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=0.1)
    tower.train()
    bar = tqdm(range(recipe.steps), desc="pretraining vision tower")
    for _ in bar:
        batch = torch.randint(len(train_pixels), (recipe.batch_size,), generator=generator)
        logits = _patch_logits(tower, head, train_pixels[batch], recipe.feature_layer)
        labels = train_labels[batch]
        loss = torch.nn.functional.cross_entropy(logits[..., DIGIT].flatten(0, 1), labels.flatten())
        if recipe.presence_weight:
            present = _presence(labels)[:, None].expand(-1, labels.shape[1], -1)
            loss = loss + recipe.presence_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                logits[..., PRESENT], present)
        if recipe.position_weight:
            loss = loss + recipe.position_weight * torch.nn.functional.cross_entropy(
                logits[..., PLACE].flatten(0, 1), places)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.eval()
    report = {"final_loss": loss.item(), "recipe": asdict(recipe)}
    for split, pixels, labels in (("train", train_pixels, train_labels), ("eval", eval_pixels, eval_labels)):
        patch, presence, place = _accuracy(tower, head, pixels, labels, recipe.feature_layer)
        report[f"{split}_patch_accuracy"], report[f"{split}_presence_accuracy"] = patch, presence
        if recipe.position_weight:
            report[f"{split}_place_accuracy"] = place
    tower.save_pretrained(folder)
    processor.save_pretrained(folder)
    report_path.write_text(json.dumps(report, indent=1))  # written last: marks a complete folder
    return folder, report
