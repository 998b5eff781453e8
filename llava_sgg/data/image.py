"""Image loading and LLaVA-1.5's aspect-ratio handling in front of an HF CLIP image processor."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

__all__ = ["IMAGE_ASPECT_RATIOS", "changed_since", "check_images", "decode_check", "expand2square", "file_signature",
           "image_problem", "load_image", "process_image", "quick_check"]

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


def decode_check(path) -> None:
    """Decode the image at ``path`` as far as needed to know that :func:`load_image` will; PIL's errors pass.

    A JPEG (nearly all of LLaVA's images) is decoded in draft mode, scaled by 1/8 in the DCT: libjpeg
    still reads and entropy-decodes every scan to its last byte, so what a full decode finds (a file
    cut short after its header, a broken scan or Huffman table) is found here too (of 300 damaged copies
    of a baseline and a progressive JPEG, cut, overwritten or zeroed in places, it refused exactly
    those that load_image refused; tests/test_data_image.py checks a sample of them), but
    the inverse DCT at full size and the colour conversion are skipped (most of a full decode's
    CPU). :func:`quick_check`, the default, is far cheaper but passes a JPEG whose scans are damaged;
    ``data.check: full`` uses this one, and caches the images that decoded (LlavaSFTDataset), so that
    the cost is paid once. Other formats are decoded in full, as at batch time.
    """
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        else:
            image.convert("RGB")


def quick_check(path) -> None:
    """Check the image at ``path`` as cheaply as finds what damages downloaded files; PIL's errors pass.

    The header is parsed (format, size). A PNG's chunks are read to its end with their checksums
    (``verify()``); a JPEG passes when its last two bytes are the end-of-image marker, which a
    file cut short (an interrupted download, a full disk) lacks; a JPEG without it (cut short, or
    valid with bytes after the marker) and every other format go through :func:`decode_check`.
    What passes here and still fails to load is a JPEG damaged inside its scans: the batch that
    draws it stops with an error naming the sample (``data.check: full`` decodes every image).
    """
    with Image.open(path) as image:
        if image.format == "PNG":
            image.verify()
            return
        if image.format == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                if f.read(2) == b"\xff\xd9":
                    return
    decode_check(path)


def image_problem(path, *, decode: bool = False) -> tuple[str, str] | None:
    """``(reason, message)`` if the image at ``path`` cannot be trained on, else None; ``reason`` is
    ``missing_image``, ``empty_image`` or ``unreadable_image``.

    Without ``decode`` the check is :func:`quick_check`, which finds missing, zero-byte,
    non-image and truncated files; ``decode=True`` decodes the image (:func:`decode_check`),
    so that what passes also loads at batch time.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing_image", f"image not found: {path}"
    except OSError as e:
        return "unreadable_image", f"cannot read image {path}: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return "missing_image", f"image not found (not a file): {path}"
    if st.st_size == 0:
        return "empty_image", f"image is empty (0 bytes, an interrupted download?): {path}"
    try:
        (decode_check if decode else quick_check)(path)
    # PIL's plugins report a broken file as OSError, SyntaxError, ValueError, struct.error,
    # EOFError, IndexError, ...: any of them means the image cannot be read.
    except Exception as e:  # noqa: BLE001
        return "unreadable_image", f"cannot read image {path}: {e}"
    return None


def file_signature(path) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of the file at ``path``, None if it cannot be read: what says it is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _check_chunk(paths, decode):
    # The signature (what the cache of decoded images keeps) before the check: a file changed after it
    # is checked again next time.
    return [(file_signature(path) if decode else None, image_problem(path, decode=decode)) for path in paths]


def check_images(paths: Sequence, *, workers: int = 1, progress: Callable[[int], object] | None = None,
                 chunk_size: int = 64, decode: bool = True) -> tuple[dict, dict]:
    """Check every image of ``paths`` (:func:`image_problem`, decoding each unless ``decode=False``) in
    ``workers`` threads.

    Returns ``(problems, good)``: ``problems[path] = (reason, message)`` for each image that cannot be
    trained on, and, when decoding, ``good[path]`` the :func:`file_signature` of each other one, which
    tells a later check that it has not changed since. ``progress`` is called with the number of images done, a chunk
    at a time.

    Threads, not processes: PIL decodes with the GIL released, and threads were as fast as processes
    without the pickling (docs/benchmarks/data-prep-cpu2.json).
    """
    chunks = [paths[i:i + chunk_size] for i in range(0, len(paths), chunk_size)]
    problems, good = {}, {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as pool:
        for chunk, results in zip(chunks, pool.map(_check_chunk, chunks, [decode] * len(chunks))):
            for path, (signature, problem) in zip(chunk, results):
                if problem is not None:
                    problems[path] = problem
                elif signature is not None:
                    good[path] = signature
            if progress is not None:
                progress(len(chunk))
    return problems, good


def changed_since(paths: Sequence, signatures: Mapping, *, workers: int = 1, chunk_size: int = 1024) -> list:
    """The paths whose :func:`file_signature` is not the one in ``signatures`` (in threads: a network file
    system answers each stat slowly)."""
    chunks = [paths[i:i + chunk_size] for i in range(0, len(paths), chunk_size)]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks) or 1))) as pool:
        now = [s for chunk in pool.map(lambda c: [file_signature(p) for p in c], chunks) for s in chunk]
    return [p for p, signature in zip(paths, now) if signature is None or signatures.get(p) != signature]


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
