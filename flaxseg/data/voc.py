"""TFDS builder `voc_segmentation`: PASCAL VOC 2012 segmentation, SBD-augmented train_aug,
and a synthetic stand-in, all read through one VOC-folder reader.

Configs:
  `2012`       train (1464) / validation (1449) from VOC 2012 SegmentationClass.
  `2012_aug`   train = train_aug (10,582 = (SBD train ∪ SBD val ∪ VOC train) − VOC val),
               validation = VOC val.
  `synthetic`  scenes from `flaxseg.data.synthetic`, written in the VOC layout and read by
               the same code as `2012` (no download).

Features: `image` uint8 [H, W, 3] (the original JPEG bytes), `segmentation_mask` uint8
[H, W, 1] (class index 0..20, 255 = void, stored as a grayscale PNG of the indices so that any
decoder returns indices, never palette colours), `file_name` (e.g. '2007_000032.jpg').

TensorFlow is not needed: images are handed to TFDS already encoded (`io.BytesIO`), the
builder writes array_record, and `tfds.data_source` decodes with PIL.
"""

import dataclasses
import io
import os
import shutil
import socket
import tarfile
import urllib.parse
import zipfile
import zlib
from pathlib import Path

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from flaxseg.constants import IGNORE_LABEL, VOC_NUM_CLASSES
from flaxseg.data import synthetic

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = (
    "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
    "semantic_contours/benchmark.tgz"
)
VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"
VOC_FOLDER = "VOCdevkit/VOC2012"
SBD_FOLDER = "benchmark_RELEASE/dataset"

# Seconds to wait for a TCP connection to the download host; without this probe an offline
# machine whose firewall drops packets would hang in `requests` (TFDS sets no timeout).
CONNECT_TIMEOUT_S = 10.0

_VALID_LABELS = np.array(list(range(VOC_NUM_CLASSES)) + [IGNORE_LABEL], dtype=np.uint8)

# What converting an image of each PIL mode to RGB does, for the note naming the file.
_MODE_CONVERSIONS = {
    "1": "black-and-white, grey copied to R, G and B",
    "L": "grayscale, grey copied to R, G and B",
    "LA": "grayscale with alpha, grey copied to R, G and B and the alpha channel dropped",
    "P": "palette, indices replaced by their palette colours",
    "PA": "palette with alpha, indices replaced by their colours and the alpha channel dropped",
    "RGBA": "the alpha channel dropped",
    "RGBX": "the padding channel dropped",
    "CMYK": "CMYK, converted by PIL's simple formula, ignoring any colour profile",
    "YCbCr": "YCbCr colours converted to RGB",
    "I": "32-bit grayscale, values clipped to 0..255 and copied to R, G and B",
    "I;16": "16-bit grayscale, values clipped to 0..255 and copied to R, G and B",
    "F": "floating-point grayscale, values clipped to 0..255 and copied to R, G and B",
}

_MANUAL_INSTRUCTIONS = f"""\
Put the original archives, or their extracted folders, in the manual directory
(`--manual_dir`, default `<data_dir>/downloads/manual`):
  <manual_dir>/{VOC_ARCHIVE}   or  <manual_dir>/{VOC_FOLDER}/  (configs 2012, 2012_aug)
  <manual_dir>/{SBD_ARCHIVE}              or  <manual_dir>/{SBD_FOLDER}/  (config 2012_aug)
Archives: {VOC_URL}
          {SBD_URL}
The manual directory is only read; archives are extracted under the download directory.
"""


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one upstream dataset comes from."""

    title: str
    url: str
    archive: str  # file name of the archive in manual_dir
    folder: str  # path, relative to the archive root, of the folder we read
    members: tuple  # archive member prefixes worth extracting


def _voc_source() -> _Source:
    # Built on each call so that the module-level URL can be pointed elsewhere (a mirror).
    return _Source(
        "PASCAL VOC 2012",
        VOC_URL,
        VOC_ARCHIVE,
        VOC_FOLDER,
        tuple(
            f"{VOC_FOLDER}/{sub}"
            for sub in ("JPEGImages/", "SegmentationClass/", "ImageSets/Segmentation/")
        ),
    )


def _sbd_source() -> _Source:
    return _Source(
        "SBD (Semantic Boundaries Dataset)",
        SBD_URL,
        SBD_ARCHIVE,
        SBD_FOLDER,
        tuple(f"{SBD_FOLDER}/{sub}" for sub in ("img/", "cls/", "train.txt", "val.txt")),
    )


@dataclasses.dataclass(eq=False)
class VocConfig(tfds.core.BuilderConfig):
    """A `voc_segmentation` config; the synthetic_* fields only matter for source='synthetic'."""

    source: str = "voc2012"  # 'voc2012', 'voc2012_aug' or 'synthetic'
    synthetic_num_train: int = 500
    synthetic_num_val: int = 100
    synthetic_min_size: int = 96
    synthetic_max_size: int = 160
    synthetic_seed: int = 0


def synthetic_config(name: str = "synthetic", **synthetic_kwargs) -> VocConfig:
    """A synthetic config with other sizes, e.g. for tests:
    `tfds.builder('voc_segmentation', config=synthetic_config('tiny', num_train=12))`."""
    fields = {f"synthetic_{key}": value for key, value in synthetic_kwargs.items()}
    known = {field.name for field in dataclasses.fields(VocConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"synthetic_config got unknown arguments {unknown}; valid ones are "
            "num_train, num_val, min_size, max_size, seed."
        )
    return VocConfig(
        name=name,
        source="synthetic",
        description="Synthetic VOC-layout scenes (see flaxseg.data.synthetic).",
        **fields,
    )


# ---------------------------------------------------------------------------------------
# Reading and validating one example.


def read_file_bytes(path, kind: str) -> bytes:
    """The bytes of `path`, a `pathlib.Path` or a `zipfile.Path` (a member of a zip archive).

    `kind` names the file in messages, e.g. 'Image file'.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist.")
    try:
        return path.read_bytes()
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # e.g. a bad CRC
        raise ValueError(f"{kind} {path} could not be read ({error}).") from error


def read_image(path, encoding_format: str = "jpeg") -> tuple[bytes, tuple[int, int]]:
    """Returns an image file's bytes and its (height, width) after checking it decodes fully.

    The original bytes are kept (no re-encoding loss) unless the file is not plain RGB
    (grayscale or CMYK JPEGs, RGBA or palette PNGs exist in the wild): those are converted
    to RGB, re-encoded in `encoding_format` ('jpeg' or 'png') so that every decoder returns
    three channels, and a warning names the file and the conversion.
    `path` is a `pathlib.Path` or a `zipfile.Path`.
    """
    data = read_file_bytes(path, "Image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: truncated or garbled files fail here
            mode, size = image.mode, image.size
            if mode != "RGB":
                buffer = io.BytesIO()
                options = {"quality": 95} if encoding_format == "jpeg" else {}
                image.convert("RGB").save(buffer, format=encoding_format.upper(), **options)
                data = buffer.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"Image file {path} is not a readable {encoding_format.upper()} ({error})."
        ) from error
    if mode != "RGB":
        conversion = _MODE_CONVERSIONS.get(mode, f"converted by PIL from mode {mode!r}")
        logging.warning(
            "Image file %s is in PIL mode %r, not RGB; stored as RGB (%s).", path, mode, conversion
        )
    return data, (size[1], size[0])


def read_index_png(path, kind: str = "Mask file") -> tuple[np.ndarray, str]:
    """The pixel values of a label PNG as stored (palette indices for 'P', never colours),
    and its PIL mode. `path` is a `pathlib.Path` or a `zipfile.Path`."""
    data = read_file_bytes(path, kind)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            values = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{kind} {path} is not a readable PNG ({error}).") from error
    return values, mode


def read_voc_mask(path: Path) -> np.ndarray:
    """Class indices uint8 [H, W] from a VOC SegmentationClass PNG.

    VOC masks are palette ('P') PNGs whose pixel values are the class indices; `np.asarray`
    of the 'P' image gives exactly those. Converting to RGB or 'L' first would return
    colours or luminance instead, so neither is done. Mode 'L' files are taken as indices.
    """
    mask, mode = read_index_png(path)
    if mode in ("RGB", "RGBA"):
        raise ValueError(
            f"Mask file {path} is an {mode} image, which looks like a colour-rendered mask; "
            "VOC masks must be palette ('P') or grayscale ('L') PNGs whose pixel values are "
            "the class indices, as in the VOC devkit's SegmentationClass folder."
        )
    if mode not in ("P", "L"):
        raise ValueError(
            f"Mask file {path} has PIL mode {mode!r}; expected a palette ('P') "
            "PNG of class indices as in VOC SegmentationClass."
        )
    return validate_mask(mask, path)


def read_sbd_mask(path: Path) -> np.ndarray:
    """Class indices uint8 [H, W] from an SBD `cls/<id>.mat` (struct GTcls, field Segmentation)."""
    if not path.is_file():
        raise FileNotFoundError(f"SBD label file {path} does not exist.")
    try:
        contents = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=True)
    # scipy reports truncated or garbled files as any of these (IndexError for a bad
    # header, NotImplementedError for MATLAB v7.3 / HDF5 files).
    except (
        OSError,
        ValueError,
        TypeError,
        IndexError,
        NotImplementedError,
        scipy.io.matlab.MatReadError,
    ) as error:
        raise ValueError(f"SBD label file {path} is not a readable .mat file ({error}).") from error
    if "GTcls" not in contents or not hasattr(contents["GTcls"], "Segmentation"):
        found = sorted(name for name in contents if not name.startswith("__"))
        if "GTcls" in contents and hasattr(contents["GTcls"], "_fieldnames"):
            found = [f"GTcls.{name}" for name in contents["GTcls"]._fieldnames]
        raise ValueError(
            f"SBD label file {path} has no GTcls.Segmentation field (it holds "
            f"{', '.join(found) or 'no variables'}); expected a cls/<id>.mat of SBD's "
            "benchmark_RELEASE."
        )
    mask = np.asarray(contents["GTcls"].Segmentation)
    if mask.ndim != 2:
        raise ValueError(
            f"SBD label file {path} holds a Segmentation of shape {mask.shape}; "
            "expected a 2-D label map."
        )
    return validate_mask(mask, path)


def validate_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    """Checks that a label map only holds 0..20 and 255; returns it as uint8."""
    values = np.unique(mask)
    bad = values[~np.isin(values, _VALID_LABELS)]
    if bad.size:
        raise ValueError(
            f"Mask file {path} contains label value {bad[0]}; valid values are "
            f"0..{VOC_NUM_CLASSES - 1} and {IGNORE_LABEL} (void)."
        )
    return mask.astype(np.uint8)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A grayscale ('L') PNG of the indices: every PNG decoder returns them unchanged."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_example(
    image_path: Path, mask_path: Path, *, read_mask=None, image_format: str = "jpeg"
) -> dict:
    """The feature dict for one (image, mask) pair.

    `read_mask(mask_path)` returns the final uint8 [H, W] label map; by default the mask is a
    VOC PNG or an SBD .mat. `image_format` is the image feature's encoding ('jpeg', 'png').
    """
    image_bytes, image_size = read_image(image_path, image_format)
    if read_mask is None:
        read_mask = read_sbd_mask if mask_path.suffix == ".mat" else read_voc_mask
    mask = read_mask(mask_path)
    if mask.shape != image_size:
        raise ValueError(
            f"Mask file {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
            f"{image_path} is {image_size[1]}x{image_size[0]}."
        )
    return {
        "image": io.BytesIO(image_bytes),
        "segmentation_mask": io.BytesIO(encode_mask_png(mask)),
        "file_name": image_path.name,
    }


# ---------------------------------------------------------------------------------------
# Split lists and the examples of each split.


def read_id_list(path: Path) -> list[str]:
    """Image ids, one per line, from a split list such as ImageSets/Segmentation/train.txt.

    An empty list, or an id listed twice in the same file, is an error naming the file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Split list {path} does not exist.")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"Split list {path} holds no image ids; expected one id per line.")
    seen = set()
    for image_id in ids:
        if image_id in seen:
            raise ValueError(
                f"Split list {path} lists image id {image_id!r} more than once; each id "
                "must appear once."
            )
        seen.add(image_id)
    return ids


def voc_split_pairs(voc_root: Path, split: str) -> list[tuple[Path, Path]]:
    """(JPEG, mask PNG) paths of VOC `split` ('train' or 'val') under `.../VOCdevkit/VOC2012`."""
    ids = read_id_list(voc_root / "ImageSets" / "Segmentation" / f"{split}.txt")
    return [
        (voc_root / "JPEGImages" / f"{i}.jpg", voc_root / "SegmentationClass" / f"{i}.png")
        for i in ids
    ]


def train_aug_ids(voc_train, voc_val, sbd_train, sbd_val) -> list[str]:
    """The standard train_aug ids: (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def train_aug_pairs(voc_root: Path, sbd_root: Path) -> list[tuple[Path, Path]]:
    """(JPEG, mask) paths of train_aug: the VOC image and PNG for ids in VOC train (VOC's
    hand-made masks are preferred), otherwise the SBD image and `cls/<id>.mat`."""
    list_dir = voc_root / "ImageSets" / "Segmentation"
    voc_train = read_id_list(list_dir / "train.txt")
    voc_val = read_id_list(list_dir / "val.txt")
    sbd_train = read_id_list(sbd_root / "train.txt")
    sbd_val = read_id_list(sbd_root / "val.txt")
    voc_train_set = set(voc_train)
    image_ids = train_aug_ids(voc_train, voc_val, sbd_train, sbd_val)
    if not image_ids:
        raise ValueError(
            f"train_aug is empty: every id of {list_dir / 'train.txt'}, {sbd_root / 'train.txt'} "
            f"and {sbd_root / 'val.txt'} is also in {list_dir / 'val.txt'}."
        )
    pairs = []
    for image_id in image_ids:
        if image_id in voc_train_set:
            pairs.append(
                (
                    voc_root / "JPEGImages" / f"{image_id}.jpg",
                    voc_root / "SegmentationClass" / f"{image_id}.png",
                )
            )
        else:
            pairs.append(
                (sbd_root / "img" / f"{image_id}.jpg", sbd_root / "cls" / f"{image_id}.mat")
            )
    return pairs


# ---------------------------------------------------------------------------------------
# Finding the upstream data: manual_dir first, then the download.


def configured_manual_dir(dl_manager) -> Path:
    """The manual directory TFDS was given (whether or not it exists), for messages."""
    # `dl_manager.manual_dir` raises when the folder is missing or empty, and TFDS has no
    # public accessor for the configured path; the private attribute is read only for
    # error messages, with TFDS's own default as fallback.
    configured = getattr(dl_manager, "_manual_dir", None)
    return Path(os.fspath(configured or Path(dl_manager.download_dir) / "manual"))


def existing_manual_dir(dl_manager) -> Path | None:
    """The manual directory if it exists and is not empty, else None."""
    try:
        return Path(os.fspath(dl_manager.manual_dir))
    except AssertionError:  # TFDS's way of saying: missing, empty or not configured
        return None


def _archive_root_name(member_name: str) -> str:
    return member_name[2:] if member_name.startswith("./") else member_name


def extract_archive(archive: Path, destination: Path, prefixes: tuple) -> Path:
    """Extracts the members of `archive` under `prefixes` into `destination`; returns it.

    Re-running is free while the archive is unchanged (same size and mtime). Extraction goes
    to a temporary sibling that is renamed at the end, so an interrupted run leaves no
    half-extracted folder behind that would later pass for a complete one.
    """
    stat = archive.stat()
    stamp = f"{archive.name} {stat.st_size} {stat.st_mtime_ns}"
    marker = destination / ".extracted_from"
    if marker.is_file() and marker.read_text() == stamp:
        return destination
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:  # detects plain tar and gzip alike
            for member in tar:
                if (member.isfile() or member.isdir()) and _archive_root_name(
                    member.name
                ).startswith(prefixes):
                    tar.extract(member, staging, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"Archive {archive} could not be extracted ({error}).") from error
    (staging / ".extracted_from").write_text(stamp)
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)
    return destination


def _check_reachable(url: str) -> None:
    """Raises OSError within CONNECT_TIMEOUT_S if the host of `url` cannot be reached."""
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
        pass


def locate_source(dl_manager, source: _Source, needed: tuple[str, ...] = ()) -> Path:
    """Returns a folder that contains `source.folder`.

    Order: the extracted folder in manual_dir, the archive in manual_dir (extracted under
    the download directory, manual_dir is never written), then the official download.
    """
    extract_root = Path(os.fspath(dl_manager.download_dir)) / "extracted"
    manual_dir = existing_manual_dir(dl_manager)
    if manual_dir is not None:
        if (manual_dir / source.folder).is_dir():
            return manual_dir
        if (manual_dir / source.archive).is_file():
            return extract_archive(
                manual_dir / source.archive,
                extract_root / f"flaxseg.{source.archive}",
                source.members,
            )
    try:
        _check_reachable(source.url)
        archive = Path(os.fspath(dl_manager.download(source.url)))
    except (OSError, tfds.download.DownloadError) as error:
        expected = configured_manual_dir(dl_manager)
        raise FileNotFoundError(
            f"{source.title} was not found and could not be downloaded from {source.url} "
            f"({error}); put the archive at {expected / source.archive} or extract it so "
            f"that {expected / source.folder} exists; this dataset needs "
            f"{' and '.join(needed or (source.archive,))} in the folder given as --manual_dir, "
            "or train on the embedded synthetic set with --dataset=synthetic."
        ) from error
    return extract_archive(archive, extract_root / f"flaxseg.{source.archive}", source.members)


# ---------------------------------------------------------------------------------------
# The builder.


def segmentation_features(image_format: str) -> tfds.features.FeaturesDict:
    """The features of every flaxseg segmentation builder: `image` uint8 [H, W, 3] stored as
    `image_format` ('jpeg' or 'png'), `segmentation_mask` uint8 [H, W, 1] (a grayscale PNG of
    the class indices, 255 = ignore), `file_name` (the image file's name)."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(
                shape=(None, None, 3), dtype=np.uint8, encoding_format=image_format
            ),
            "segmentation_mask": tfds.features.Image(
                shape=(None, None, 1), dtype=np.uint8, encoding_format="png"
            ),
            "file_name": tfds.features.Text(),
        }
    )


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 semantic segmentation (with SBD train_aug and a synthetic config)."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS derives this from the package via `importlib_resources`, which it does not list
    # as a dependency (the import fails on a clean install); the answer is this file.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [
        VocConfig(
            name="2012",
            source="voc2012",
            description="VOC 2012 SegmentationClass: train 1464, validation 1449.",
        ),
        VocConfig(
            name="2012_aug",
            source="voc2012_aug",
            description="train_aug (10,582: SBD train+val and VOC train, minus VOC "
            "val) for train, VOC 2012 val for validation.",
        ),
        synthetic_config("synthetic"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=segmentation_features("jpeg"),
            supervised_keys=("image", "segmentation_mask"),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        if config.source == "synthetic":
            voc_root = synthetic.write_synthetic_voc(
                Path(os.fspath(dl_manager.download_dir)) / f"synthetic_{config.name}",
                num_train=config.synthetic_num_train,
                num_val=config.synthetic_num_val,
                min_size=config.synthetic_min_size,
                max_size=config.synthetic_max_size,
                seed=config.synthetic_seed,
            )
        else:
            needed = (VOC_ARCHIVE, SBD_ARCHIVE) if config.source == "voc2012_aug" else ()
            voc_root = locate_source(dl_manager, _voc_source(), needed) / VOC_FOLDER
        if config.source == "voc2012_aug":
            sbd_root = locate_source(dl_manager, _sbd_source(), needed) / SBD_FOLDER
            train_pairs = train_aug_pairs(voc_root, sbd_root)
        else:
            train_pairs = voc_split_pairs(voc_root, "train")
        return {
            "train": self._generate_examples(train_pairs),
            "validation": self._generate_examples(voc_split_pairs(voc_root, "val")),
        }

    def _generate_examples(self, pairs):
        for image_path, mask_path in pairs:
            yield image_path.stem, make_example(image_path, mask_path)
