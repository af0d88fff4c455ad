"""One reader for every picture (`pipelines.open_picture`): pictures are read as they look.

Each case builds its picture here with PIL/numpy and compares the reader's result with a
reference conversion written out in the test: 16-bit grey scaled (not clipped), EXIF orientation
applied, the first frame of an animation (with a warning naming the file), palette transparency
composited onto white (or kept as RGBA), CMYK by PIL's conversion, decompression bombs refused
by name, and files that are not regular files refused before they are opened."""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
from PIL import Image

from pipelines import PictureError, QwenImagePipeline, SettingError, open_picture
from tests.support.pictures import png_declaring

GRADIENT = (np.arange(64 * 256).reshape(64, 256) * (65535 / (64 * 256 - 1))).round()  # 0 .. 65535, mean 32767.5


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.int16)


def white_composite(rgba: np.ndarray) -> np.ndarray:
    """Alpha compositing onto white, written out (PIL's alpha_composite rounds the same way)."""
    alpha = rgba[..., 3:].astype(np.float64) / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.int16)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_bit_depth_grey_is_scaled_to_eight_bits_not_clipped(mode, tmp_path):
    """A 16-bit gradient's 8-bit mean is ~127.5 (clipping gave 254.5: 99.6% white); each level is
    value * 255 / full scale, rounded."""
    if mode == "F":
        values, full = (GRADIENT / 65535).astype(np.float32), 1.0
        picture = Image.fromarray(values, "F")
    else:
        values, full = GRADIENT, 65535.0
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
        picture = Image.frombytes(mode, (256, 64), GRADIENT.astype(dtype).tobytes())
    assert picture.mode == mode
    expected = np.round(values.astype(np.float64) * 255 / full).astype(np.int16)
    got = rgb(open_picture(picture))
    assert abs(got.mean() - 127.5) < 0.1
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)
    if mode == "I;16":  # the same through a 16-bit PNG file
        path = tmp_path / "gradient16.png"
        picture.save(path)
        with Image.open(path) as opened:
            assert opened.mode == "I;16"
        assert np.array_equal(rgb(open_picture(path)), got)


def test_grey_levels_no_picture_has_are_refused_naming_the_file():
    with pytest.raises(PictureError, match=r"input_image: the picture given is a F picture with values from -1"):
        open_picture(Image.fromarray(np.full((4, 4), -1.0, dtype=np.float32), "F"), "input_image")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_is_applied(suffix, tmp_path):
    """Orientation 6 (the camera turned clockwise): stored landscape, shown portrait, rotated 90
    degrees clockwise. PNG is compared pixel for pixel; JPEG against the stored pixels turned."""
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, :32] = (220, 30, 30)  # left half red, a green block top right
    stored[:8, 48:] = (30, 200, 30)
    picture = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"portrait.{suffix}"
    picture.save(path, exif=exif, **({"quality": 95} if suffix == "jpg" else {}))
    with Image.open(path) as opened:
        assert opened.size == (64, 32)  # what was stored: landscape
        on_disk = np.asarray(opened.convert("RGB"), dtype=np.int16)
    got = open_picture(path)
    assert got.size == (32, 64)  # portrait, as it is shown
    assert np.array_equal(rgb(got), np.rot90(on_disk, k=-1))
    with Image.open(path) as opened:  # a picture in memory gets the same turn
        assert np.array_equal(rgb(open_picture(opened)), rgb(got))


@pytest.mark.parametrize("suffix", ["gif", "png"])
def test_an_animation_gives_its_first_frame_and_a_warning_naming_the_file(suffix, tmp_path, caplog):
    colours = [(200, 20, 20), (20, 200, 20), (20, 20, 200)]
    frames = [Image.new("RGB", (16, 12), c) for c in colours]
    path = tmp_path / f"animated.{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with caplog.at_level(logging.WARNING, logger="pipelines.core.images"):
        got = open_picture(path, "edit_image[0]")
        open_picture(path, "edit_image[0]")  # the runner checks before the call, the call again: said once
    assert rgb(got).reshape(-1, 3).tolist() == [list(colours[0])] * (16 * 12)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "edit_image[0]" in warnings[0] and str(path) in warnings[0]
    assert "3 frames" in warnings[0] and "first frame" in warnings[0]
    caplog.clear()
    with Image.open(path) as opened, caplog.at_level(logging.WARNING, logger="pipelines.core.images"):
        opened.seek(1)  # in memory: the frame it is at
        assert rgb(open_picture(opened)).reshape(-1, 3)[0].tolist() == list(colours[1])
    assert "frame 2, the one it is at" in caplog.records[0].getMessage()


def test_palette_transparency_is_composited_onto_white_or_kept_as_rgba(tmp_path):
    palette = Image.new("P", (8, 4))
    palette.putpalette([0, 0, 0, 250, 10, 10, 10, 250, 10] + [0] * (253 * 3))
    palette.putdata([0, 1, 2, 1] * 8)
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)  # index 0 (black) is transparent
    with Image.open(path) as opened:
        assert opened.mode == "P" and opened.info["transparency"] == 0
        reference = np.asarray(opened.convert("RGBA"), dtype=np.int16)  # PIL's documented conversion
    got = rgb(open_picture(path))
    assert np.array_equal(got, white_composite(reference))
    assert got[0, 0].tolist() == [255, 255, 255]  # transparent black shows as white, not black
    kept = open_picture(path, alpha=True)
    assert kept.mode == "RGBA" and np.array_equal(np.asarray(kept, dtype=np.int16), reference)
    half = np.dstack([np.full((4, 4, 3), 40, np.uint8), np.full((4, 4), 128, np.uint8)])  # LA-like, half alpha
    grey_alpha = Image.fromarray(half[..., [0, 3]], "LA")
    assert np.array_equal(rgb(open_picture(grey_alpha)), white_composite(np.asarray(grey_alpha.convert("RGBA"))))


def test_cmyk_jpeg_is_read_by_pils_conversion(tmp_path):
    cmyk = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 4), dtype=np.uint8), "CMYK")
    path = tmp_path / "print.jpg"
    cmyk.save(path, quality=95)
    with Image.open(path) as opened:
        assert opened.mode == "CMYK"
        reference = np.asarray(opened.convert("RGB"), dtype=np.int16)
    assert np.array_equal(rgb(open_picture(path)), reference)


def test_decompression_bombs_are_a_typed_error_naming_file_pixels_limit_and_override(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(30000, 30000))  # 900 million pixels: above twice Pillow's limit
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(PictureError, match=r"input_image: '.*bomb\.png' declares 30000x30000 = 900,000,000 pixels, "
                                           rf"above the limit of {limit:,}.*DIFFSYNTH_MAX_IMAGE_PIXELS=900000000"):
        open_picture(bomb, "input_image")
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's own setting is left as it was
    small = tmp_path / "small.png"
    Image.new("RGB", (200, 100), (10, 20, 30)).save(small)
    monkeypatch.setenv("DIFFSYNTH_MAX_IMAGE_PIXELS", "10000")  # a limit lowered below the picture's 20,000
    with pytest.raises(SettingError, match=r"small\.png' declares 200x100 = 20,000 pixels, above the limit of "
                                           r"10,000.*PIL\.Image\.MAX_IMAGE_PIXELS"):
        open_picture(small)
    monkeypatch.setenv("DIFFSYNTH_MAX_IMAGE_PIXELS", "20000")
    assert open_picture(small).size == (200, 100)
    monkeypatch.setenv("DIFFSYNTH_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(SettingError, match="DIFFSYNTH_MAX_IMAGE_PIXELS='lots' is not a pixel count"):
        open_picture(small)


def open_in_thread(path, what: str, fifo=None):
    """open_picture(path) in a thread; a reader stuck on a FIFO is released (its writer opened
    and closed) and the test fails instead of hanging."""
    outcome: list = []

    def work():
        try:
            outcome.append(open_picture(path, what))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"open_picture({str(path)!r}) blocked: it opened what is not a regular file")
    return outcome[0]


def test_what_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "picture.png"
    os.mkfifo(fifo)
    error = open_in_thread(fifo, "edit_image[1]", fifo)
    assert isinstance(error, PictureError)
    assert "edit_image[1]" in str(error) and str(fifo) in str(error) and "FIFO (named pipe)" in str(error)
    assert "a folder" in str(open_in_thread(tmp_path, "input_image"))
    if os.path.exists("/dev/null"):
        assert "a character device" in str(open_in_thread("/dev/null", "input_image"))
    missing = open_in_thread(tmp_path / "nothing.png", "input_image")
    assert isinstance(missing, FileNotFoundError) and "nothing.png" in str(missing)
    with pytest.raises(PictureError, match="input_image must be a PIL.Image or the path"):
        open_picture(3, "input_image")  # a SettingError (the runner's exit 2), not a TypeError


def test_the_pipeline_reads_every_picture_argument_with_the_one_reader(tmp_path):
    """input_image: RGB with transparency on white; edit_image: RGBA kept (the vision path
    composites after resizing, as transformers does; the VAE path composites too)."""
    pixels = np.zeros((24, 32, 4), dtype=np.uint8)
    pixels[..., 0], pixels[:, 16:, 3] = 200, 255  # red; the left half fully transparent
    path = tmp_path / "cutout.png"
    Image.fromarray(pixels, "RGBA").save(path)
    gradient = tmp_path / "gradient16.png"
    Image.frombytes("I;16", (256, 64), GRADIENT.astype("<u2").tobytes()).save(gradient)
    a = QwenImagePipeline.check_arguments(dict(prompt="p", input_image=str(path), denoising_strength=0.5,
                                               edit_image=[str(path), str(gradient)]))
    assert np.array_equal(rgb(a["input_image"]), white_composite(pixels.astype(np.int16)))
    first, second = a["edit_image"].pictures
    assert first.mode == "RGBA" and np.array_equal(np.asarray(first), pixels)
    assert abs(rgb(second).mean() - 127.5) < 0.1
