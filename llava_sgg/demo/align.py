"""Aligning the demo's connector to the decoder's word embeddings before stage 1.

LLaVA's stage 1 trains the connector on 558K captions until CLIP's tokens read to the decoder like
words. The demo cannot afford that many steps, and its captions teach it slowly: after them the
decoder needs about 1000 fine-tuning steps before it matches a digit named in a question against
the image tokens, several times what it needs given the scene written as text. So the connector
starts from a direct alignment: each patch token of the frozen tower is regressed onto
the sum of the decoder's input embeddings of the words that describe the patch, its digit (nothing
for an empty cell) and its place ("5" + " top" + " left"). The supervision is the per-patch labels
the tower was pretrained on; what changes is only that the connector learns it in the decoder's own
word space, so "Is there a 5" and "What digit is in the top left?" find their image tokens by the
same token match as in text. The captions stage then starts from this connector.

This is a few hundred mini-batch steps of a two-layer MLP on cached tower features (cheap on a
CPU), written by hand because it is a plain regression with no library counterpart in the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..model.builder import MM_PROJECTOR_FILE, PROJECTOR_OPTIONS, save_mm_projector
from .data import POSITION_NAMES, DemoData, DemoDataConfig
from .tower import EMPTY, load_split, patch_cells, patch_features

__all__ = ["ConnectorAlignment", "align_connector", "patch_targets", "word_embedding"]


@dataclass(frozen=True)
class ConnectorAlignment:
    steps: int = 400
    batch_size: int = 512  # patch tokens per step
    lr: float = 3e-3
    place_weight: float = 1.0  # weight of the place words (" top" + " left") against the digit's word
    feature_layer: int = -2  # the hidden state LLaVA reads (ModelConfig.vision_feature_layer)
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.place_weight < 0:
            raise ValueError(f"invalid ConnectorAlignment: need steps >= 1, batch_size >= 1, lr > 0 and place_weight >= 0; got {self}")


def _input_embeddings(language_model: Path) -> torch.Tensor:
    """The decoder's input embedding matrix, read from its safetensors shards without loading the model."""
    for shard in sorted(language_model.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.endswith("embed_tokens.weight"):
                    return f.get_tensor(key).float()
    raise FileNotFoundError(f"{language_model}: no embed_tokens.weight in its *.safetensors files")


def word_embedding(text: str, tokenizer, embeddings: torch.Tensor) -> torch.Tensor:
    """Sum of the input embeddings of ``text``'s tokens (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return embeddings[torch.tensor(ids)].sum(0)


def patch_targets(labels: torch.Tensor, cells: list[int], config: DemoDataConfig, tokenizer,
                  embeddings: torch.Tensor, place_weight: float = 1.0) -> torch.Tensor:
    """[scenes, patches, hidden]: per patch, the embedding of its digit's word (none if empty) plus its place's words.

    ``labels`` are the tower's per-patch digit labels (EMPTY for no digit); ``cells`` each patch's grid cell
    (-1 outside the grid: no place words).
    """
    rows, columns = POSITION_NAMES[config.grid]
    place = torch.stack([torch.zeros(embeddings.shape[1]) if cell < 0 else
                         word_embedding(f" {rows[cell // config.grid]}", tokenizer, embeddings)
                         + word_embedding(f" {columns[cell % config.grid]}", tokenizer, embeddings)
                         for cell in cells])
    # The digit is written as in the questions ("a 5"): its own token after a space token.
    digit = torch.stack([word_embedding(str(d), tokenizer, embeddings) for d in range(EMPTY)]
                        + [torch.zeros(embeddings.shape[1])])
    return digit[labels] + place_weight * place[None]


@torch.no_grad()
def _features(tower, pixels: torch.Tensor, layer: int, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([patch_features(tower, pixels[i:i + batch_size], layer)
                      for i in range(0, len(pixels), batch_size)])


def _nearest_accuracy(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of patches whose prediction is nearest (cosine) to its own target among the distinct targets."""
    table, index = torch.unique(targets.flatten(0, 1), dim=0, return_inverse=True)
    cosine = torch.nn.functional.normalize(predicted.flatten(0, 1), dim=-1) @ \
        torch.nn.functional.normalize(table, dim=-1).T
    return (cosine.argmax(-1) == index).float().mean().item()


def align_connector(vision: Path, language_model: Path, data: DemoData, data_config: DemoDataConfig, cache: Path,
                    recipe: ConnectorAlignment = ConnectorAlignment()) -> tuple[Path, dict]:
    """Fit a ``mlp2x_gelu`` connector from ``vision``'s patch tokens to ``language_model``'s word embeddings.

    Returns (mm_projector.safetensors, report); cached under ``cache`` by the tower, decoder, data and recipe.
    """
    key = json.dumps({"vision": vision.name, "decoder": language_model.name, "data": data.root.name,
                      "recipe": asdict(recipe)}, sort_keys=True)
    folder = cache / f"aligned-connector-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    report_path = folder / "alignment.json"
    if report_path.is_file() and (folder / MM_PROJECTOR_FILE).is_file():
        return folder / MM_PROJECTOR_FILE, json.loads(report_path.read_text())

    processor = CLIPImageProcessor.from_pretrained(vision)
    tower = CLIPVisionModel.from_pretrained(vision).eval()
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    embeddings = _input_embeddings(language_model)
    cells = patch_cells(data_config, tower.config.image_size, tower.config.patch_size)
    splits = {}
    for split in ("train", "eval"):
        pixels, labels = load_split(data, split, processor, data_config, tower.config)
        splits[split] = (_features(tower, pixels, recipe.feature_layer),
                         patch_targets(labels, cells, data_config, tokenizer, embeddings, recipe.place_weight))

    config = LlavaConfig(vision_config=tower.config.to_dict(),
                         text_config=AutoConfig.from_pretrained(language_model).to_dict(), **PROJECTOR_OPTIONS)
    torch.manual_seed(recipe.seed)
    projector = LlavaMultiModalProjector(config)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=0.1)
    features, targets = (t.flatten(0, 1) for t in splits["train"])
    scale = targets.pow(2).mean()  # the loss is the error relative to the targets' power
    generator = torch.Generator().manual_seed(recipe.seed)
    bar = tqdm(range(recipe.steps), desc="aligning connector to word embeddings")
    for _ in bar:
        batch = torch.randint(len(features), (recipe.batch_size,), generator=generator)
        loss = (projector(features[batch]) - targets[batch]).pow(2).mean() / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    report = {"recipe": asdict(recipe)}
    with torch.no_grad():
        for split, (x, y) in splits.items():
            predicted = projector(x)
            report[f"{split}_relative_error"] = ((predicted - y).pow(2).mean() / y.pow(2).mean()).item()
            report[f"{split}_nearest_accuracy"] = _nearest_accuracy(predicted, y)
    save_mm_projector(projector, folder)
    report_path.write_text(json.dumps(report, indent=1))  # written last: marks a complete folder
    return folder / MM_PROJECTOR_FILE, report
