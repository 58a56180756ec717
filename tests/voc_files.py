"""Small VOC and SBD folders and archives for the data tests (tests/test_data_voc.py,
tests/test_data_bad_inputs.py): JPEG images, palette PNG masks holding every class value the
decoder must keep, SBD .mat labels and split lists."""

import io
import tarfile

import numpy as np
import scipy.io
from PIL import Image

from flaxseg.data import voc
from flaxseg.data.colormap import voc_colormap

# Class indices whose palette colour turns into a different grey value than the index
# (e.g. 1 → (128, 0, 0) → L 38), plus void: a decoder that reads colours would fail.
MASK_VALUES = (0, 1, 7, 15, 20, 255)

VOC_TRAIN = {"2008_000001": (20, 24), "2008_000002": (17, 31), "2008_000003": (26, 18)}
VOC_VAL = {"2008_000004": (21, 21), "2008_000005": (15, 29)}
SBD_TRAIN = {
    "2008_000002": (17, 31),
    "2008_000004": (21, 21),
    "2009_000006": (19, 23),
    "2009_000007": (25, 16),
}
SBD_VAL = {"2008_000003": (26, 18), "2009_000008": (18, 27)}


def _mask(image_id: str, shape, values=MASK_VALUES) -> np.ndarray:
    """A label map holding every value of `values`, laid out differently per id."""
    offset = int(image_id[-1])
    columns = np.arange(shape[1])
    rows = np.arange(shape[0])[:, None]
    return np.asarray(values, dtype=np.uint8)[(columns + rows // 4 + offset) % len(values)]


def _sbd_mask(image_id: str, shape) -> np.ndarray:
    """SBD labels: 0..20 only, in a pattern unlike the VOC one (to tell them apart)."""
    return _mask(image_id, shape, values=(0, 3, 9, 12, 20))[::-1].copy()


def _jpeg_bytes(shape, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _palette_png_bytes(mask: np.ndarray) -> bytes:
    image = Image.fromarray(mask)
    image.putpalette(voc_colormap().reshape(-1).tolist())
    assert image.mode == "P"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_voc(root, train=VOC_TRAIN, val=VOC_VAL):
    """Writes root/VOCdevkit/VOC2012 with JPEGs, palette PNG masks and split lists."""
    voc_root = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc_root / sub).mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val)):
        for image_id, shape in items.items():
            (voc_root / "JPEGImages" / f"{image_id}.jpg").write_bytes(
                _jpeg_bytes(shape, int(image_id[-1]))
            )
            (voc_root / "SegmentationClass" / f"{image_id}.png").write_bytes(
                _palette_png_bytes(_mask(image_id, shape))
            )
        (voc_root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "\n".join(items) + "\n"
        )
    return voc_root


def write_sbd(root, train=SBD_TRAIN, val=SBD_VAL):
    """Writes root/benchmark_RELEASE/dataset with img/*.jpg, cls/*.mat and split lists."""
    sbd_root = root / "benchmark_RELEASE" / "dataset"
    (sbd_root / "img").mkdir(parents=True, exist_ok=True)
    (sbd_root / "cls").mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val)):
        for image_id, shape in items.items():
            (sbd_root / "img" / f"{image_id}.jpg").write_bytes(
                _jpeg_bytes(shape, 100 + int(image_id[-1]))
            )
            gt = {
                "Segmentation": _sbd_mask(image_id, shape),
                "Boundaries": np.zeros((1,), dtype=np.uint8),
                "CategoriesPresent": np.array([1], dtype=np.uint8),
            }
            scipy.io.savemat(sbd_root / "cls" / f"{image_id}.mat", {"GTcls": gt})
        (sbd_root / f"{split}.txt").write_text("\n".join(items) + "\n")
    return sbd_root


def _tar(source_dir, top: str, archive_path, mode: str):
    with tarfile.open(archive_path, mode) as tar:
        tar.add(source_dir / top, arcname=top)


def make_manual_dir(tmp_path, form: str, with_sbd: bool):
    """A manual_dir holding the archives ('archive') or the extracted folders ('folder')."""
    manual = tmp_path / "manual"
    if form == "folder":
        write_voc(manual)
        if with_sbd:
            write_sbd(manual)
        return manual
    staging = tmp_path / "staging"
    write_voc(staging)
    manual.mkdir()
    _tar(staging, "VOCdevkit", manual / voc.VOC_ARCHIVE, "w")
    if with_sbd:
        write_sbd(staging)
        _tar(staging, "benchmark_RELEASE", manual / voc.SBD_ARCHIVE, "w:gz")
    return manual
