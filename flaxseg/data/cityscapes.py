"""TFDS builder `cityscapes_segmentation`: Cityscapes fine annotations in the 19 train ids.

Config `fine`: train (2,975) / validation (500) from the `train/` and `val/` folders of
leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (the test split has no public fine
labels and is not built). Registration-only data: nothing is downloaded; the archives, or the
folders they unpack to, are read from the manual directory.

Features as in `voc_segmentation`: `image` uint8 [H, W, 3] (the original, lossless PNG
bytes), `segmentation_mask` uint8 [H, W, 1] (train id 0..18, 255 = ignore, a grayscale PNG),
`file_name` (e.g. 'aachen_000000_000019_leftImg8bit.png').

The zips are read member by member (`zipfile.Path`), never extracted: zip has a central
directory, so any member can be read directly, and leftImg8bit_trainvaltest.zip is 11 GB —
extracting it would need that much more disk for files read once.
"""

import contextlib
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from flaxseg.constants import IGNORE_LABEL
from flaxseg.data import voc

HOMEPAGE = "https://www.cityscapes-dataset.com/"
IMAGE_ARCHIVE = "leftImg8bit_trainvaltest.zip"
LABEL_ARCHIVE = "gtFine_trainvaltest.zip"
IMAGE_FOLDER = "leftImg8bit"  # at the root of IMAGE_ARCHIVE
LABEL_FOLDER = "gtFine"  # at the root of LABEL_ARCHIVE
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
SPLIT_FOLDERS = {"train": "train", "validation": "val"}  # TFDS split → folder

# The 19 evaluated classes, in train-id order, with their label id and official colour
# (cityscapesScripts `helpers/labels.py`).
_TRAIN_CLASSES = (
    # name, label id, colour
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
CLASS_NAMES = tuple(name for name, _, _ in _TRAIN_CLASSES)
NUM_CLASSES = len(CLASS_NAMES)
MAX_LABEL_ID = 33  # label ids run 0..33 (and −1, licence plate, which labelIds PNGs never hold)

# labelId → trainId for every stored value 0..255: the 19 classes above, all else ignore.
# 255 is what −1 becomes in 8 bits, so it is accepted (as ignore) although the official
# labelIds PNGs never contain it.
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_LABEL, dtype=np.uint8)
for _train_id, (_, _label_id, _) in enumerate(_TRAIN_CLASSES):
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id
_VALID_STORED_IDS = (*range(MAX_LABEL_ID + 1), 255)


def colormap() -> np.ndarray:
    """The official Cityscapes colours by train id, uint8 [256, 3]; ignore (and every row
    past 18) is black, as in cityscapesScripts."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:NUM_CLASSES] = [colour for _, _, colour in _TRAIN_CLASSES]
    return colours


_MANUAL_INSTRUCTIONS = f"""\
Register at {HOMEPAGE}, download {IMAGE_ARCHIVE} (11 GB) and {LABEL_ARCHIVE} (241 MB), and
put the archives, or the folders they unpack to, in the manual directory (`--manual_dir`,
default `<data_dir>/downloads/manual`):
  <manual_dir>/{IMAGE_ARCHIVE}  or  <manual_dir>/{IMAGE_FOLDER}/{{train,val}}/<city>/
  <manual_dir>/{LABEL_ARCHIVE}       or  <manual_dir>/{LABEL_FOLDER}/{{train,val}}/<city>/
The manual directory is only read, and the archives are read in place (not extracted).
"""


# ---------------------------------------------------------------------------------------
# Reading one example.


def read_train_ids(path) -> np.ndarray:
    """Train ids uint8 [H, W] (255 = ignore) from a `*_gtFine_labelIds.png`.

    `path` is a `pathlib.Path` or a `zipfile.Path`. The PNG holds label ids 0..33 as 8-bit
    grey values; any other value means the file is not a labelIds map.
    """
    label_ids, mode = voc.read_index_png(path, "Label file")
    if label_ids.ndim != 2 or mode not in ("L", "P", "I", "I;16"):
        raise ValueError(
            f"Label file {path} has PIL mode {mode!r}; expected a single-channel "
            "PNG of Cityscapes label ids (the *_gtFine_labelIds.png file)."
        )
    values = np.unique(label_ids)
    bad = values[~np.isin(values, _VALID_STORED_IDS)]
    if bad.size:
        raise ValueError(
            f"Label file {path} contains label id {bad[0]}; valid Cityscapes "
            f"label ids are 0..{MAX_LABEL_ID} (and 255 for -1)."
        )
    return LABEL_ID_TO_TRAIN_ID[label_ids]


def make_example(image_path, label_path) -> dict:
    """The feature dict for one (leftImg8bit PNG, gtFine labelIds PNG) pair."""
    return voc.make_example(image_path, label_path, read_mask=read_train_ids, image_format="png")


# ---------------------------------------------------------------------------------------
# Finding the upstream data and the pairs of one split.


def locate(dl_manager, archive: str, folder: str) -> Path:
    """`<manual_dir>/<folder>` if that folder exists, else `<manual_dir>/<archive>` after
    checking that it is a zip with `<folder>/` at its root."""
    manual_dir = voc.existing_manual_dir(dl_manager)
    if manual_dir is not None:
        if (manual_dir / folder).is_dir():
            return manual_dir / folder
        if (manual_dir / archive).is_file():
            check_archive(manual_dir / archive, folder)
            return manual_dir / archive
    expected = voc.configured_manual_dir(dl_manager)
    raise FileNotFoundError(
        f"Cityscapes data was not found: put {archive} (from {HOMEPAGE}, after registering) "
        f"at {expected / archive}, or extract it so that {expected / folder} exists."
    )


def check_archive(archive: Path, folder: str) -> None:
    """Raises ValueError unless `archive` is a readable zip holding `<folder>/...`."""
    try:
        with zipfile.ZipFile(archive) as zip_file:
            has_folder = any(name.startswith(f"{folder}/") for name in zip_file.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(
            f"Archive {archive} is not a readable zip file ({error}); download it again."
        ) from error
    if not has_folder:
        raise ValueError(
            f"Archive {archive} has no {folder}/ folder at its root; expected the "
            f"official Cityscapes archive of that name."
        )


@contextlib.contextmanager
def open_tree(location: Path, folder: str):
    """Yields `folder` from `locate`'s result: that folder itself, or `<folder>/` inside the
    zip as a `zipfile.Path` (the zip is closed on exit)."""
    if location.is_dir():
        yield location
        return
    with zipfile.ZipFile(location) as zip_file:
        yield zipfile.Path(zip_file, f"{folder}/")


def split_pairs(image_root, label_root, split_folder: str) -> list:
    """(image, label) paths of one split, sorted by city then file name.

    `image_root` is the `leftImg8bit` folder and `label_root` the `gtFine` folder, each a
    `pathlib.Path` or a `zipfile.Path`. Every `*_leftImg8bit.png` under
    `<split_folder>/<city>/` must have its `*_gtFine_labelIds.png`.
    """
    image_split = image_root / split_folder
    if not image_split.is_dir():
        raise FileNotFoundError(f"Image folder {image_split} does not exist.")
    pairs = []
    for city in sorted(
        (path for path in image_split.iterdir() if path.is_dir()), key=lambda path: path.name
    ):
        images = sorted(
            (
                path
                for path in city.iterdir()
                if path.is_file() and path.name.endswith(IMAGE_SUFFIX)
            ),
            key=lambda path: path.name,
        )
        for image in images:
            stem = image.name.removesuffix(IMAGE_SUFFIX)  # <city>_<seq>_<frame>
            label = label_root / split_folder / city.name / f"{stem}{LABEL_SUFFIX}"
            if not label.is_file():
                raise FileNotFoundError(f"Label file {label} for image {image} does not exist.")
            pairs.append((image, label))
    if not pairs:
        raise FileNotFoundError(
            f"Image folder {image_split} holds no <city>/*{IMAGE_SUFFIX} files."
        )
    return pairs


# ---------------------------------------------------------------------------------------
# The builder.


class CityscapesSegmentation(tfds.core.GeneratorBasedBuilder):
    """Cityscapes semantic segmentation, fine annotations, 19 train-id classes."""

    VERSION = tfds.core.Version("1.0.0")
    # As in voc.py: TFDS would derive this through `importlib_resources`, not a dependency.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="fine",
            description="gtFine train (2,975) and val (500) in the 19 train ids, 255 = ignore.",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=voc.segmentation_features("png"),
            supervised_keys=("image", "segmentation_mask"),
            homepage=HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        # Both are located (and the zips checked) before anything is read.
        images = locate(dl_manager, IMAGE_ARCHIVE, IMAGE_FOLDER)
        labels = locate(dl_manager, LABEL_ARCHIVE, LABEL_FOLDER)
        return {
            split: self._generate_examples(images, labels, folder)
            for split, folder in SPLIT_FOLDERS.items()
        }

    def _generate_examples(self, images: Path, labels: Path, split_folder: str):
        with (
            open_tree(images, IMAGE_FOLDER) as image_root,
            open_tree(labels, LABEL_FOLDER) as label_root,
        ):
            for image, label in split_pairs(image_root, label_root, split_folder):
                yield image.name.removesuffix(IMAGE_SUFFIX), make_example(image, label)
