"""The `cityscapes_segmentation` builder on small Cityscapes archives that the tests write.

The fake data has the release's layout and file names: `leftImg8bit/{train,val,test}/<city>/
<city>_<seq>_<frame>_leftImg8bit.png` and `gtFine/{train,val,test}/<city>/..._gtFine_*.png`
under the roots of leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, beside README and
license files. Every build is a real TFDS build read back with `tfds.data_source`.
"""

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from flaxseg import data
from flaxseg.data import cityscapes

SHAPE = (24, 40)  # H, W
TRAIN = {
    "aachen": ("aachen_000000_000019", "aachen_000001_000019"),
    "bochum": ("bochum_000000_000313",),
}
VAL = {"frankfurt": ("frankfurt_000000_000294",), "lindau": ("lindau_000000_000019",)}
TEST = {"berlin": ("berlin_000000_000019",)}  # images only (no fine labels): never built
SPLITS = {"train": TRAIN, "val": VAL, "test": TEST}

# The official labelId → trainId table (cityscapesScripts helpers/labels.py), written out
# here rather than taken from the module under test. Every other id is ignored (255).
OFFICIAL_TRAIN_IDS = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
# Ids in the fake label maps: evaluated classes (7, 26, 33, ...) and ignored ones (0, 1, 6, 9).
LABEL_IDS = (0, 7, 26, 33, 1, 6, 8, 9, 11, 24, 31)


def _seed(stem: str) -> int:
    return sum(map(ord, stem))


def _image(stem: str) -> np.ndarray:
    return np.random.default_rng(_seed(stem)).integers(0, 256, size=(*SHAPE, 3), dtype=np.uint8)


def _label_ids(stem: str, shape=SHAPE) -> np.ndarray:
    """A label-id map holding every id of LABEL_IDS, laid out differently per file."""
    rows, columns = np.arange(shape[0])[:, None], np.arange(shape[1])
    return np.asarray(LABEL_IDS, dtype=np.uint8)[
        (columns + rows // 3 + _seed(stem)) % len(LABEL_IDS)
    ]


def _train_ids(stem: str) -> np.ndarray:
    lookup = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in OFFICIAL_TRAIN_IDS.items():
        lookup[label_id] = train_id
    return lookup[_label_ids(stem)]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def cityscapes_files() -> dict:
    """Relative path → bytes of both archives' contents, keyed 'images' and 'labels'."""
    images = {"README": b"Cityscapes leftImg8bit\n", "license.txt": b"license\n"}
    labels = {"README": b"Cityscapes gtFine\n", "license.txt": b"license\n"}
    for split, cities in SPLITS.items():
        for city, stems in cities.items():
            for stem in stems:
                images[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = _png(_image(stem))
                prefix = f"gtFine/{split}/{city}/{stem}_gtFine_"
                label_ids = _label_ids(stem)
                labels[prefix + "labelIds.png"] = _png(label_ids)
                # The release's other annotation files, which the builder must not read.
                labels[prefix + "color.png"] = _png(np.stack([label_ids * 7] * 3, axis=-1))
                labels[prefix + "instanceIds.png"] = _png(label_ids.astype(np.uint16) * 1000)
                labels[prefix + "polygons.json"] = json.dumps(
                    {"imgHeight": SHAPE[0], "imgWidth": SHAPE[1], "objects": []}
                ).encode()
    return {"images": images, "labels": labels}


def _write_folder(root, files: dict):
    for name, contents in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents)


def _write_zip(path, files: dict, directory_entries: bool = False):
    """A zip of `files`; with `directory_entries`, also one entry per folder (as `zip -r`
    writes them), else the folders are only implied by the file names."""
    with zipfile.ZipFile(path, "w") as archive:
        if directory_entries:
            folders = {
                name.rsplit("/", depth)[0] + "/"
                for name in files
                for depth in range(1, name.count("/") + 1)
            }
            for folder in sorted(folders):
                archive.writestr(folder, b"")
        for name, contents in files.items():
            archive.writestr(name, contents)


def make_manual_dir(tmp_path, images: str = "zip", labels: str = "zip", edit=None):
    """A manual_dir holding each archive as a zip ('zip'), extracted ('folder') or not at all
    (None), after `edit(files)` changed the files' contents."""
    manual = tmp_path / "manual"
    manual.mkdir(parents=True)
    files = cityscapes_files()
    if edit is not None:
        edit(files)
    for form, key, archive in (
        (images, "images", cityscapes.IMAGE_ARCHIVE),
        (labels, "labels", cityscapes.LABEL_ARCHIVE),
    ):
        if form == "zip":  # both kinds of zip: with and without folder entries
            _write_zip(manual / archive, files[key], directory_entries=key == "images")
        elif form == "folder":
            _write_folder(manual, files[key])
    return manual


def _snapshot(folder):
    """Every path under `folder` with its size and mtime, to prove it was not modified."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _build(tmp_path, manual, split="train"):
    return data.get_data_source(
        "cityscapes", split, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)
    )


def test_label_id_table_is_the_official_one():
    for label_id in range(256):
        expected = OFFICIAL_TRAIN_IDS.get(label_id, 255)
        assert cityscapes.LABEL_ID_TO_TRAIN_ID[label_id] == expected, label_id


@pytest.mark.parametrize("images,labels", [("zip", "zip"), ("folder", "folder"), ("zip", "folder")])
def test_build_gives_lossless_images_and_train_ids(tmp_path, images, labels):
    manual = make_manual_dir(tmp_path, images, labels)
    before = _snapshot(manual)
    sources = {split: _build(tmp_path, manual, split) for split in ("train", "validation")}
    assert _snapshot(manual) == before  # manual_dir is only read
    assert not list((tmp_path / "tfds").rglob("*.png"))  # the zips were not extracted

    for split, cities in (("train", TRAIN), ("validation", VAL)):
        source = sources[split]
        stems = [stem for city in sorted(cities) for stem in cities[city]]
        assert len(source) == len(stems)
        examples = {}
        for index in range(len(source)):
            example = source[index]
            name = example["file_name"]
            examples[name.decode() if isinstance(name, bytes) else name] = example
        assert set(examples) == {f"{stem}_leftImg8bit.png" for stem in stems}
        for stem in stems:
            example = examples[f"{stem}_leftImg8bit.png"]
            assert example["image"].dtype == np.uint8 and example["image"].shape == (*SHAPE, 3)
            np.testing.assert_array_equal(example["image"], _image(stem))  # lossless
            mask = example["segmentation_mask"]
            assert mask.dtype == np.uint8 and mask.shape == (*SHAPE, 1)
            np.testing.assert_array_equal(mask[..., 0], _train_ids(stem))
    all_masks = np.concatenate(
        [sources["train"][i]["segmentation_mask"].ravel() for i in range(len(sources["train"]))]
    )
    assert set(np.unique(all_masks)) == {0, 1, 2, 11, 13, 16, 18, 255}


def test_missing_archives_name_where_to_put_them(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        _build(tmp_path, manual)
    message = str(error.value)
    assert str(manual / "leftImg8bit_trainvaltest.zip") in message
    assert str(manual / "leftImg8bit") in message

    labels_missing = make_manual_dir(tmp_path / "images_only", "zip", None)
    with pytest.raises(FileNotFoundError) as error:
        _build(tmp_path / "images_only", labels_missing)
    message = str(error.value)
    assert str(labels_missing / "gtFine_trainvaltest.zip") in message
    assert str(labels_missing / "gtFine") in message


def test_label_id_outside_cityscapes_ids_is_named(tmp_path):
    def add_40(files):
        name = "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
        label_ids = _label_ids("bochum_000000_000313")
        label_ids[5, 7] = 40
        files["labels"][name] = _png(label_ids)

    manual = make_manual_dir(tmp_path, edit=add_40)
    with pytest.raises(
        ValueError,
        match=r"gtFine_trainvaltest\.zip/gtFine/train/bochum/"
        r"bochum_000000_000313_gtFine_labelIds\.png contains "
        r"label id 40",
    ):
        _build(tmp_path, manual)


def test_image_without_label_file_is_named(tmp_path):
    def drop_label(files):
        del files["labels"]["gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"]

    manual = make_manual_dir(tmp_path, "folder", "folder", edit=drop_label)
    expected = manual / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    with pytest.raises(
        FileNotFoundError,
        match=f"Label file {expected} for image .*lindau_000000_000019_leftImg8bit.png",
    ):
        _build(tmp_path, manual)


def test_image_and_label_size_mismatch_is_named(tmp_path):
    def shrink_label(files):
        stem = "aachen_000001_000019"
        files["labels"][f"gtFine/train/aachen/{stem}_gtFine_labelIds.png"] = _png(
            _label_ids(stem, (24, 39))
        )

    manual = make_manual_dir(tmp_path, "folder", "folder", edit=shrink_label)
    with pytest.raises(
        ValueError,
        match=r"aachen_000001_000019_gtFine_labelIds\.png is 39x24.*"
        r"aachen_000001_000019_leftImg8bit\.png is 40x24",
    ):
        _build(tmp_path, manual)


def test_unreadable_image_is_named(tmp_path):
    def truncate(files):
        name = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
        files["images"][name] = files["images"][name][:100]

    manual = make_manual_dir(tmp_path, edit=truncate)
    with pytest.raises(
        ValueError,
        match=r"aachen_000000_000019_leftImg8bit\.png is not a "
        r"readable PNG",
    ):
        _build(tmp_path, manual)


def test_corrupt_or_foreign_zip_is_named(tmp_path):
    manual = make_manual_dir(tmp_path)
    (manual / cityscapes.IMAGE_ARCHIVE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(
        ValueError, match=f"{manual / cityscapes.IMAGE_ARCHIVE} is not a readable zip file"
    ):
        _build(tmp_path, manual)

    # A member whose bytes were damaged after zipping: the CRC check names it.
    _write_zip(manual / cityscapes.IMAGE_ARCHIVE, cityscapes_files()["images"])
    member = "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    with zipfile.ZipFile(manual / cityscapes.IMAGE_ARCHIVE) as archive:
        info = archive.getinfo(member)
    contents = bytearray((manual / cityscapes.IMAGE_ARCHIVE).read_bytes())
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    contents[data_start + info.compress_size // 2] ^= 0xFF  # stored (not deflated) members
    (manual / cityscapes.IMAGE_ARCHIVE).write_bytes(bytes(contents))
    with pytest.raises(ValueError, match=f"Image file .*{member} could not be read .*CRC"):
        _build(tmp_path / "crc", manual, "validation")

    # A zip whose folders do not sit at its root (re-zipped by hand, say).
    _write_zip(manual / cityscapes.IMAGE_ARCHIVE, {"leftImg8bit_trainvaltest/README": b""})
    with pytest.raises(ValueError, match="has no leftImg8bit/ folder at its root"):
        _build(tmp_path, manual)
