"""Image loading and data URLs: every failure kind is an ImageError naming the file and the reason."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from mmdc.data.images import ImageError, from_data_url, image_sha256, load_image, to_data_url


def write_png(path: Path, size=(8, 6), mode="RGB", color=(10, 200, 30)) -> Path:
    Image.new(mode, size, color).save(path, format="PNG")
    return path


def png_with_header_size(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose IHDR is rewritten (with a valid CRC) to claim width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # Bytes 8..: IHDR chunk = length(4) "IHDR"(4) width(4) height(4) ... crc(4) over type+data.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_load_image_returns_rgb_for_every_mode(tmp_path):
    rgb = load_image(write_png(tmp_path / "rgb.png"))
    assert rgb.mode == "RGB" and rgb.size == (8, 6) and rgb.getpixel((0, 0)) == (10, 200, 30)
    gray = load_image(write_png(tmp_path / "l.png", mode="L", color=77))
    assert gray.mode == "RGB" and gray.getpixel((3, 3)) == (77, 77, 77)
    # Fully transparent RGBA pixels become white, not black.
    rgba = load_image(write_png(tmp_path / "rgba.png", mode="RGBA", color=(0, 0, 0, 0)))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    jpeg = tmp_path / "x.jpg"
    Image.new("CMYK", (5, 5), (0, 0, 0, 0)).save(jpeg, format="JPEG")
    assert load_image(jpeg).mode == "RGB"


def test_missing_and_zero_byte(tmp_path):
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "nope.png")
    assert err.value.source == str(tmp_path / "nope.png") and err.value.reason.startswith("missing")
    with pytest.raises(ImageError, match="missing: not a regular file"):
        load_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: zero-byte file"):
        load_image(empty)


def test_corrupt_and_truncated(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="garbage.png: corrupt"):
        load_image(garbage)
    good = write_png(tmp_path / "big.png", size=(200, 200))
    # Random-ish content so the compressed stream is long enough to cut in the middle.
    Image.frombytes("RGB", (200, 200), bytes((i * 7919) % 251 for i in range(200 * 200 * 3))).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError) as err:
        load_image(truncated)
    assert "truncated.png" in str(err.value) and err.value.reason.startswith("truncated")


def test_too_large_fails_from_header_without_decoding(tmp_path, monkeypatch):
    huge = png_with_header_size(tmp_path / "huge.png", 20000, 20000)

    def no_decoding(self):
        raise AssertionError("pixels were decoded before the size check")

    # A decode of 20000x20000 RGB would allocate 1.2 GB; the header check must come first.
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as err:
        load_image(huge)
    assert "huge.png" in str(err.value) and err.value.reason.startswith("too large")
    monkeypatch.undo()
    # A configurable limit: a fine 8x6 image is too large for max_pixels=40.
    with pytest.raises(ImageError, match="too large: 8x6 = 48 pixels > max_pixels 40"):
        load_image(write_png(tmp_path / "small.png"), max_pixels=40)


def test_image_sha256_hashes_bytes(tmp_path):
    path = write_png(tmp_path / "a.png")
    assert image_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ImageError, match="missing"):
        image_sha256(tmp_path / "b.png")


def test_data_url_round_trip_from_path_and_pil(tmp_path):
    path = write_png(tmp_path / "a.png", color=(1, 2, 3))
    url = to_data_url(path)
    assert url.startswith("data:image/png;base64,")
    back = from_data_url(url)
    assert back.mode == "RGB" and back.size == (8, 6) and back.getpixel((7, 5)) == (1, 2, 3)
    assert to_data_url(Image.new("L", (2, 2), 9)) == to_data_url(Image.new("RGB", (2, 2), (9, 9, 9)))
    with pytest.raises(TypeError):
        to_data_url(42)  # type: ignore[arg-type]


def test_from_data_url_accepts_file_urls_and_paths(tmp_path):
    path = write_png(tmp_path / "with space.png", color=(4, 5, 6))
    assert from_data_url(str(path)).getpixel((0, 0)) == (4, 5, 6)
    assert from_data_url("file://" + str(path).replace(" ", "%20")).getpixel((0, 0)) == (4, 5, 6)
    with pytest.raises(ImageError, match="missing"):
        from_data_url("file://" + str(tmp_path / "gone.png"))


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://example.com/a.png", "unsupported URL scheme 'http'"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain' is not an image"),
        ("data:image/png;base64", "no ',' before the payload"),
        ("data:image/png,rawbytes", "not base64-encoded"),
        ("data:image/png;base64,@@@not base64@@@", "invalid base64 payload"),
        ("data:image/png;base64,", "zero-byte payload"),
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "corrupt"),
        ("file://otherhost/a.png", "remote host"),
        ("", "not an image reference"),
    ],
)
def test_from_data_url_rejects_with_reason(url, reason):
    with pytest.raises(ImageError, match=reason):
        from_data_url(url)


def test_from_data_url_checks_size_before_decoding(tmp_path):
    huge = png_with_header_size(tmp_path / "huge.png", 20000, 20000)
    url = "data:image/png;base64," + base64.b64encode(huge.read_bytes()).decode()
    with pytest.raises(ImageError) as err:
        from_data_url(url)
    assert err.value.reason.startswith("too large")
    assert len(err.value.source) < 80  # a huge data URL is abbreviated in the message


# --------------------------------------------------------------------------------------------
# Confinement: an image must lie inside its folder (issue 29)
# --------------------------------------------------------------------------------------------


def test_confine_keeps_paths_inside_the_folder_and_refuses_the_rest(tmp_path):
    from mmdc.data.images import confine

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    write_png(root / "sub" / "a.png")
    write_png(tmp_path / "secret.png")
    assert confine("sub/a.png", str(root)) == str(root / "sub" / "a.png")
    assert confine(str(root / "sub" / "a.png"), str(root)) == str(root / "sub" / "a.png")  # absolute, inside: kept
    assert confine("sub/../sub/a.png", str(root)).endswith("a.png")
    for outside in ("../secret.png", str(tmp_path / "secret.png"), "sub/../../secret.png", "/etc/passwd"):
        with pytest.raises(ImageError, match="outside the image folder"):
            confine(outside, str(root))
    assert confine("../anything.png", None) == "../anything.png"  # no folder: nothing to confine to


def test_confine_follows_symlinks(tmp_path):
    from mmdc.data.images import confine

    root = tmp_path / "images"
    root.mkdir()
    write_png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ImageError, match="a symlink in it points to"):
        confine("link.png", str(root))
    (root / "inner.png").symlink_to(write_png(root / "real.png"))
    assert confine("inner.png", str(root)) == str(root / "inner.png")  # a link that stays inside is fine
    (tmp_path / "alias").symlink_to(root)  # the folder itself reached through a link
    assert confine("real.png", str(tmp_path / "alias")) == str(tmp_path / "alias" / "real.png")


def test_image_problem_names_every_kind_and_none_for_a_good_image(tmp_path):
    from mmdc.data.images import image_problem

    write_png(tmp_path / "good.png")
    (tmp_path / "zero.png").write_bytes(b"")
    assert image_problem("good.png", str(tmp_path)) is None
    assert "zero-byte" in image_problem("zero.png", str(tmp_path))
    assert "missing" in image_problem("absent.png", str(tmp_path))
    assert "outside the image folder" in image_problem("../x.png", str(tmp_path))
    assert "not a usable path" in image_problem("nul\x00.png", str(tmp_path))
    assert "unreadable" in image_problem("x" * 300 + ".png", str(tmp_path))  # a name longer than the OS allows
    assert "too large" in image_problem("good.png", str(tmp_path), max_pixels=10)
