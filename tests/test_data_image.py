"""Image preprocessing: LLaVA-1.5's pad-to-square, the processor's crop, and plain resize."""

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from llava_sgg.data import expand2square, load_image, process_image


def processor():
    return CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})


def test_every_aspect_ratio_mode_gives_the_crop_size():
    image = Image.new("RGB", (80, 30), (200, 30, 30))
    for mode in ("pad", "resize", "crop"):
        pixels = process_image(image, processor(), mode)
        assert pixels.shape == (3, 56, 56) and pixels.dtype == torch.float32


def test_pad_fills_with_the_mean_colour_which_normalises_to_about_zero():
    red = Image.new("RGB", (56, 20), (255, 0, 0))
    pixels = process_image(red, processor(), "pad")
    # 18 rows of padding above and below the 20 rows of image, at 56 px nothing is rescaled.
    for row, col in [(0, 0), (0, 55), (55, 0), (55, 55)]:
        assert pixels[:, row, col].abs().max() < 0.02  # int(mean * 255) / 255 is just below the mean
    assert pixels[0, 28, 28] > 1.5 and pixels[1, 28, 28] < -1.5  # the image itself is untouched red


def test_expand2square_centres_the_image():
    square = expand2square(Image.new("RGB", (4, 2), (255, 255, 255)), (0, 0, 0))
    assert square.size == (4, 4)
    assert [square.getpixel((0, y)) for y in range(4)] == [(0, 0, 0), (255, 255, 255), (255, 255, 255), (0, 0, 0)]
    tall = Image.new("RGB", (3, 6))
    assert expand2square(tall, (0, 0, 0)).size == (6, 6)
    assert expand2square(square, (9, 9, 9)) is square


def test_crop_cuts_the_sides_and_resize_keeps_them():
    # Left third blue, the rest green: a centre crop of a wide image loses the blue.
    image = Image.new("RGB", (168, 56), (0, 255, 0))
    image.paste((0, 0, 255), (0, 0, 56, 56))
    crop = process_image(image, processor(), "crop")
    resize = process_image(image, processor(), "resize")
    assert crop[2, 28, 0] < 0 and resize[2, 28, 0] > 1  # blue channel at the left edge


def test_images_are_converted_to_rgb(tmp_path):
    for mode, colour in [("L", 128), ("RGBA", (10, 20, 30, 40)), ("P", 3)]:
        path = tmp_path / f"{mode}.png"
        Image.new(mode, (10, 10), colour).save(path)
        assert load_image(path).mode == "RGB"
        assert process_image(load_image(path), processor(), "pad").shape == (3, 56, 56)


def test_an_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown image_aspect_ratio 'anyres'"):
        process_image(Image.new("RGB", (8, 8)), processor(), "anyres")


def refused(load, path) -> bool:
    """Whether ``load(path)`` raises (any error PIL raises)."""
    try:
        load(path)
    except Exception:  # noqa: BLE001
        return True
    return False


def test_the_draft_decode_of_the_check_refuses_what_a_full_decode_refuses(tmp_path):
    import random

    from llava_sgg.data.image import decode_check, image_problem

    rng = random.Random(0)
    image = Image.effect_noise((160, 120), 40).convert("RGB")
    outcomes = set()
    for progressive in (False, True):
        image.save(tmp_path / "good.jpg", quality=90, progressive=progressive)
        data = (tmp_path / "good.jpg").read_bytes()
        for trial in range(24):
            damaged = bytearray(data)
            if trial % 3 == 0:  # cut short, as an interrupted download
                damaged = damaged[:rng.randint(700, len(data) - 3)]
            elif trial % 3 == 1:  # bytes overwritten
                for _ in range(20):
                    damaged[rng.randint(700, len(data) - 3)] = rng.randint(0, 255)
            else:  # a block zeroed
                start = rng.randint(600, len(data) - 1500)
                damaged[start:start + 1000] = bytes(1000)
            path = tmp_path / f"damaged-{progressive}-{trial}.jpg"
            path.write_bytes(damaged)
            outcome = refused(decode_check, path)
            assert outcome == refused(load_image, path), (progressive, trial)
            assert (image_problem(path, decode=True) is not None) == outcome
            outcomes.add(outcome)
    assert outcomes == {True, False}  # both kinds of damage are among the trials


def test_the_quick_check_refuses_files_cut_short_and_never_a_file_that_loads(tmp_path):
    import random

    from llava_sgg.data.image import image_problem, quick_check

    rng = random.Random(1)
    image = Image.effect_noise((160, 120), 40).convert("RGB")
    image.save(tmp_path / "good.jpg", quality=90)
    image.save(tmp_path / "good.png")
    for name in ("good.jpg", "good.png"):
        data = (tmp_path / name).read_bytes()
        assert not refused(quick_check, tmp_path / name)
        for trial in range(12):  # cut short anywhere after the header, as an interrupted download
            path = tmp_path / f"cut-{trial}-{name}"
            path.write_bytes(data[:rng.randint(200, len(data) - 1)])
            assert refused(quick_check, path) and refused(load_image, path), (name, trial)
            assert image_problem(path)[0] == "unreadable_image"
    # Bytes after a JPEG's end marker (some cameras append them) load: the check decodes such a file.
    (tmp_path / "trailer.jpg").write_bytes((tmp_path / "good.jpg").read_bytes() + b"\x00" * 64)
    assert not refused(load_image, tmp_path / "trailer.jpg") and not refused(quick_check, tmp_path / "trailer.jpg")
    # Damage inside the scans of a JPEG that still ends with its marker passes (a full check decodes):
    # the quick check may pass a file that does not load, but never refuses one that does.
    data = (tmp_path / "good.jpg").read_bytes()
    for trial in range(12):
        damaged = bytearray(data)
        start = rng.randint(600, len(data) - 1500)
        damaged[start:start + 1000] = bytes(1000)
        path = tmp_path / f"zeroed-{trial}.jpg"
        path.write_bytes(damaged)
        assert refused(quick_check, path) <= refused(load_image, path)
