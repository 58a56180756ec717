"""Small Cityscapes archives for the data tests (tests/test_data_cityscapes.py,
tests/test_data_bad_inputs.py), in the release's layout and file names."""

import io
import json
import zipfile

import numpy as np
from PIL import Image

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
