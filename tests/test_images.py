"""Safe decoding (`load_rgb`) and the bad-image scan on every kind of awkward or broken file."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prompt_peft.data import BadImage, ImageDecodeError, check_image, load_rgb, scan_images, to_rgb


def save(path: Path, image: Image.Image, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kw)
    return path


def noise(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def truncated_jpeg(path: Path) -> Path:
    data = io.BytesIO()
    noise((64, 64)).save(data, "JPEG", quality=95)
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])  # header intact, scan data cut
    return path


@pytest.fixture
def odd_images(tmp_path) -> dict[str, Path]:
    """Valid files in every mode that a naive `convert("RGB")` gets wrong or that confuses a pipeline."""
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)  # index 0 (the transparent one) is red underneath
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    grey16 = Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16))  # mid grey in 16 bits
    rotated = noise((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return {
        "grey": save(tmp_path / "grey.jpg", Image.new("L", (20, 20), 128)),
        "cmyk": save(tmp_path / "cmyk.jpg", Image.new("CMYK", (20, 20), (0, 255, 255, 0))),
        "palette_transparent": save(tmp_path / "palette.png", palette, transparency=0),
        "rgba": save(tmp_path / "rgba.png", rgba),
        "la": save(tmp_path / "la.png", Image.new("LA", (20, 20), (0, 0))),
        "grey16": save(tmp_path / "grey16.png", grey16),
        "bilevel": save(tmp_path / "bilevel.png", Image.new("1", (20, 20), 1)),
        "exif_rotated": save(tmp_path / "exif.jpg", rotated, exif=exif),
    }


@pytest.fixture
def broken_images(tmp_path) -> dict[str, Path]:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    return {
        "truncated": truncated_jpeg(tmp_path / "truncated.jpg"),
        "empty": tmp_path / "empty.jpg",
        "not_an_image": tmp_path / "text.jpg",
        "missing": tmp_path / "does_not_exist.jpg",
    }


def test_load_rgb_converts_every_mode_to_rgb(odd_images):
    for kind, path in odd_images.items():
        image = load_rgb(path)
        assert image.mode == "RGB", kind
    # CMYK (0,255,255,0) is pure red; Pillow's conversion without colour management gives exactly that.
    assert load_rgb(odd_images["cmyk"]).getpixel((5, 5))[0] > 200
    # Transparent pixels are flattened onto white, not shown as the colour stored under alpha 0.
    assert load_rgb(odd_images["palette_transparent"]).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(odd_images["rgba"]).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(odd_images["la"]).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(odd_images["rgba"], background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    # 16-bit grey is scaled (32896/65535 -> 128), where Image.convert("RGB") would clip it to white.
    assert Image.open(odd_images["grey16"]).mode.startswith("I")
    assert load_rgb(odd_images["grey16"]).getpixel((0, 0)) == (128, 128, 128)
    assert load_rgb(odd_images["bilevel"]).getpixel((0, 0)) == (255, 255, 255)


def test_load_rgb_applies_exif_orientation(odd_images):
    assert Image.open(odd_images["exif_rotated"]).size == (40, 20)
    assert load_rgb(odd_images["exif_rotated"]).size == (20, 40)
    assert load_rgb(odd_images["exif_rotated"], exif_transpose=False).size == (40, 20)


def test_load_rgb_accepts_bytes_dicts_and_pil(odd_images):
    path = odd_images["cmyk"]
    data = path.read_bytes()
    expected = load_rgb(path).getpixel((3, 3))
    assert load_rgb(data).getpixel((3, 3)) == expected
    assert load_rgb({"path": None, "bytes": data}).getpixel((3, 3)) == expected
    assert load_rgb({"path": str(path), "bytes": None}).getpixel((3, 3)) == expected
    opened = Image.open(path)
    assert load_rgb(opened).mode == "RGB"
    assert opened.mode == "CMYK"  # the caller's image is not modified


@pytest.mark.parametrize("kind", ["truncated", "empty", "not_an_image", "missing"])
def test_load_rgb_names_the_file_of_a_broken_image(broken_images, kind):
    path = broken_images[kind]
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert isinstance(info.value, OSError)


def test_truncated_image_in_memory_is_reported(broken_images):
    lazily_opened = Image.open(broken_images["truncated"])  # header only: not yet failing
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_rgb(lazily_opened)


def test_to_rgb_keeps_rgb_untouched():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image


def test_check_image_reasons(tmp_path, broken_images, odd_images):
    tiny = save(tmp_path / "tiny.png", Image.new("RGB", (1, 1)))
    assert "too small: 1×1" in check_image(tiny)
    assert check_image(tiny, min_size=None) is None
    assert check_image(tiny, min_size=1) is None
    assert "truncated" in check_image(broken_images["truncated"])
    assert "empty" in check_image(broken_images["empty"])
    assert "cannot identify" in check_image(broken_images["not_an_image"])
    assert "No such file" in check_image(broken_images["missing"])
    assert all(check_image(path) is None for path in odd_images.values())


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_images_reports_exactly_the_bad_ones_in_order(tmp_path, broken_images, odd_images, workers):
    tiny = save(tmp_path / "tiny.png", Image.new("RGB", (1, 1)))
    good = list(odd_images.values())
    items = [
        good[0],
        broken_images["truncated"],
        *good[1:],
        tiny,
        broken_images["empty"],
        broken_images["not_an_image"],
        broken_images["missing"],
    ]
    bad = scan_images(iter(items), total=len(items), num_workers=workers, progress=False)
    positions = [position for position, _ in bad]
    assert positions == [1, len(good) + 1, len(good) + 2, len(good) + 3, len(good) + 4]
    assert all(isinstance(item, BadImage) and item.path == str(items[p]) for p, item in bad)


def test_corrupt_exif_does_not_lose_the_image(tmp_path, caplog):
    path = save(tmp_path / "exif.jpg", noise((20, 20)), exif=b"Exif\x00\x00garbage-not-tiff")
    with caplog.at_level(logging.WARNING):
        assert load_rgb(path).size == (20, 20)
