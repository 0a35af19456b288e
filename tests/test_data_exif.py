"""EXIF orientation is applied in the image decoder and by make_shards; make_shards refuses a
folder where no image decodes."""

import io
import tarfile

import numpy as np
import pytest
from helpers import run
from PIL import Image
from skimage import data as skdata

from vistok.data import make_shards
from vistok.data.image_decode import ImageDecoder

ORIENTATION = 0x0112


def _jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def upright() -> Image.Image:
    return Image.fromarray(skdata.astronaut()[40:136:2, 150:214:2])  # 48 x 32 (H x W)


# EXIF orientation -> how the camera stored the pixels of an upright scene.
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # "rotate 90 CW to display"
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


def _decode(data: bytes) -> np.ndarray:
    out = ImageDecoder(resolution=32, random_crop=False, hflip=False)({"jpg": data}, None)
    assert isinstance(out, np.ndarray), out
    return out.astype(np.float32)


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_decoder_applies_the_exif_orientation(upright, orientation):
    reference = _decode(_jpeg(upright))
    rotated = _jpeg(upright.transpose(STORED[orientation]), orientation)
    # Same picture up to JPEG noise; without the tag applied it is a different crop.
    assert np.abs(_decode(rotated) - reference).mean() < 4
    ignored = _decode(_jpeg(upright.transpose(STORED[orientation])))
    assert np.abs(ignored - reference).mean() > 20


def test_make_shards_keeps_the_tag_and_checks_the_oriented_image(upright, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    (src / "phone.jpg").write_bytes(_jpeg(upright.transpose(Image.Transpose.ROTATE_90), 6))
    (paths,) = [make_shards.main([str(src), str(tmp_path / "shards")])]
    with tarfile.open(paths[0]) as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
        stored = tar.extractfile(member).read()
    with Image.open(io.BytesIO(stored)) as img:
        assert img.getexif()[ORIENTATION] == 6
    assert np.abs(_decode(stored) - _decode(_jpeg(upright))).mean() < 4


def test_make_shards_with_no_readable_image_exits_non_zero(tmp_path):
    src = tmp_path / "broken"
    src.mkdir()
    for i in range(3):
        (src / f"b{i}.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    proc = run(["-m", "vistok.data.make_shards", str(src), str(tmp_path / "out")], expect=1)
    assert "none of the 3 image files" in proc.stderr
    assert not list((tmp_path / "out").glob("*.tar"))
