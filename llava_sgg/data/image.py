"""Image loading and LLaVA-1.5's aspect-ratio handling in front of an HF CLIP image processor."""

from __future__ import annotations

import os

from PIL import Image

__all__ = ["IMAGE_ASPECT_RATIOS", "expand2square", "image_problem", "load_image", "process_image"]

# pad: LLaVA-1.5's default (image_aspect_ratio=pad in its finetune scripts), nothing cropped away;
# crop: the CLIP processor's own resize-shortest-side + centre crop (official "square"/default);
# resize: squash to the crop size, nothing cropped and no padding, aspect ratio lost.
IMAGE_ASPECT_RATIOS = ("pad", "resize", "crop")


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad the shorter side evenly with ``background`` to a square (official ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def load_image(path) -> Image.Image:
    """Open ``path`` fully (PIL opens lazily) and convert to RGB; PIL's errors pass through."""
    with Image.open(path) as image:
        return image.convert("RGB")


def image_problem(path, *, decode: bool = False) -> tuple[str, str] | None:
    """``(reason, message)`` if the image at ``path`` cannot be trained on, else None; ``reason`` is
    ``missing_image``, ``empty_image`` or ``unreadable_image``.

    Without ``decode`` only what is cheap is read: the file's size and PIL's header
    (format, size; for PNG also ``verify()``'s chunk checksums), which finds missing,
    zero-byte and non-image files. A truncated JPEG passes that; ``decode=True`` decodes
    the image as :func:`load_image` does at batch time, so what passes also loads then.
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing_image", f"image not found: {path}"
    except OSError as e:
        return "unreadable_image", f"cannot read image {path}: {e.strerror or e}"
    if not os.path.isfile(path):
        return "missing_image", f"image not found (not a file): {path}"
    if size == 0:
        return "empty_image", f"image is empty (0 bytes, an interrupted download?): {path}"
    try:
        if decode:
            load_image(path)
        else:
            with Image.open(path) as image:
                image.verify()
    # PIL's plugins report a broken file as OSError, SyntaxError, ValueError, struct.error,
    # EOFError, IndexError, ...: any of them means the image cannot be read.
    except Exception as e:  # noqa: BLE001
        return "unreadable_image", f"cannot read image {path}: {e}"
    return None


def process_image(image: Image.Image, image_processor, aspect_ratio: str = "pad"):
    """``FloatTensor[3, H, W]`` for one RGB image, ``H, W`` the processor's crop size."""
    if aspect_ratio == "pad":
        # Official LLaVA pads with the processor's mean colour, so the padding
        # normalises to about 0 (int() truncates, as officially).
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        pixels = image_processor(expand2square(image, background), return_tensors="pt")["pixel_values"]
    elif aspect_ratio == "crop":
        pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    elif aspect_ratio == "resize":
        crop = image_processor.crop_size
        pixels = image_processor(image, size={"height": crop["height"], "width": crop["width"]},
                                 do_center_crop=False, return_tensors="pt")["pixel_values"]
    else:
        raise ValueError(f"unknown image_aspect_ratio {aspect_ratio!r}; "
                         f"choose one of: {', '.join(IMAGE_ASPECT_RATIOS)}")
    return pixels[0]
