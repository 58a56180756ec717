"""A synthetic PASCAL-VOC-shaped dataset: learnable scenes written in the real VOC layout.

`write_synthetic_voc` writes `root/VOCdevkit/VOC2012/` exactly as VOCtrainval_11-May-2012.tar
unpacks (JPEGImages/*.jpg, SegmentationClass/*.png as palette PNGs with the VOC colour map,
ImageSets/Segmentation/{train,val,trainval}.txt), so the `synthetic` builder config reads it
with the same code as the real `2012` config, and every run exercises that code.

Each of the 20 object classes is a family a small CNN can learn: its own shape, a
characteristic colour and a texture (stripes, checks, dots, ...), drawn at varied sizes,
positions, aspect ratios and small rotations over a textured gradient background (class 0).
Objects overlap; later ones occlude earlier ones. As in VOC, a void band (255) two pixels wide
runs along every boundary between different labels.

With the defaults (500 train + 100 val images, 96..160 px a side) writing takes about 3 s
and `get_data_source('synthetic', ...)` about 4 s in all on two CPU cores (measured). It is
learnable: a ~60k-parameter U-Net-like CNN trained 800 steps (batch 16, 64 px crops, Adam)
reached 0.98 val mIoU, every class above 0.95 IoU (measured once, CPU).
"""

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from flaxseg.constants import IGNORE_LABEL, VOC_NUM_CLASSES
from flaxseg.data.colormap import voc_colormap

# One shape family per object class 1..20 (index 0 is background and has no shape).
SHAPE_FAMILIES = (
    None,
    "cross",
    "ring",
    "triangle",
    "trapezoid",
    "tall_rectangle",
    "frame",
    "parallelogram",
    "ellipse",
    "star4",
    "pentagon",
    "semicircle",
    "hexagon",
    "arrow",
    "l_shape",
    "star5",
    "hourglass",
    "diamond",
    "t_shape",
    "crescent",
    "heart",
)
TEXTURES = ("plain", "hstripes", "vstripes", "checks", "dots", "diagonal")

_JPEG_QUALITY = 90
_SPLITS = ("train", "val")


def class_colour(class_index: int) -> np.ndarray:
    """The characteristic RGB colour (float [3], 0..255) of an object class 1..20."""
    # Stepping the hue by 7/20 puts neighbouring class indices far apart on the colour
    # wheel; alternating saturation and value separates classes with close hues.
    hue = ((class_index * 7) % 20) / 20.0
    saturation = 0.9 if class_index % 2 else 0.6
    value = 0.95 if (class_index // 2) % 2 else 0.7
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255.0


def class_texture(class_index: int) -> str:
    """The texture family of an object class 1..20."""
    return TEXTURES[class_index % len(TEXTURES)]


def _polygon(family: str) -> np.ndarray:
    """Vertices [N, 2] (x, y) of a polygonal family inside the unit disk, centred at 0."""
    if family in ("star4", "star5"):
        points = 4 if family == "star4" else 5
        angles = np.arange(2 * points) * np.pi / points - np.pi / 2
        radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if family in ("pentagon", "hexagon"):
        sides = 5 if family == "pentagon" else 6
        angles = np.arange(sides) * 2 * np.pi / sides - np.pi / 2
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if family == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y], axis=1) / 17.0
    table = {
        "cross": [
            (-0.33, -1),
            (0.33, -1),
            (0.33, -0.33),
            (1, -0.33),
            (1, 0.33),
            (0.33, 0.33),
            (0.33, 1),
            (-0.33, 1),
            (-0.33, 0.33),
            (-1, 0.33),
            (-1, -0.33),
            (-0.33, -0.33),
        ],
        "triangle": [(0, -1), (0.95, 0.8), (-0.95, 0.8)],
        "trapezoid": [(-0.45, -0.6), (0.45, -0.6), (1, 0.6), (-1, 0.6)],
        "tall_rectangle": [(-0.4, -1), (0.4, -1), (0.4, 1), (-0.4, 1)],
        "parallelogram": [(-0.5, -0.6), (1, -0.6), (0.5, 0.6), (-1, 0.6)],
        "arrow": [
            (-1, -0.25),
            (0.2, -0.25),
            (0.2, -0.7),
            (1, 0),
            (0.2, 0.7),
            (0.2, 0.25),
            (-1, 0.25),
        ],
        "l_shape": [(-0.7, -1), (-0.2, -1), (-0.2, 0.5), (0.8, 0.5), (0.8, 1), (-0.7, 1)],
        "t_shape": [
            (-1, -0.9),
            (1, -0.9),
            (1, -0.4),
            (0.25, -0.4),
            (0.25, 1),
            (-0.25, 1),
            (-0.25, -0.4),
            (-1, -0.4),
        ],
        "hourglass": [(-0.8, -1), (0.8, -1), (0.12, 0), (0.8, 1), (-0.8, 1), (-0.12, 0)],
        "diamond": [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)],
    }
    return np.asarray(table[family], dtype=np.float64)


def _place(points: np.ndarray, centre, radius: float, aspect: float, angle: float):
    """Scales, rotates and translates unit-disk points to image coordinates."""
    scaled = points * np.array([radius * aspect, radius])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return [tuple(p) for p in scaled @ rotation.T + np.asarray(centre)]


def _ellipse_box(centre, rx: float, ry: float):
    return [centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry]


def shape_mask(
    family: str, height: int, width: int, centre, radius: float, aspect: float, angle: float
) -> np.ndarray:
    """Boolean [height, width] mask of one object of `family`."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    rx, ry = radius * aspect, radius
    if family == "ellipse":
        draw.ellipse(_ellipse_box(centre, rx, 0.7 * ry), fill=255)
    elif family == "ring":
        draw.ellipse(_ellipse_box(centre, rx, ry), fill=255)
        draw.ellipse(_ellipse_box(centre, 0.55 * rx, 0.55 * ry), fill=0)
    elif family == "crescent":
        draw.ellipse(_ellipse_box(centre, rx, ry), fill=255)
        offset = (centre[0] + 0.45 * rx, centre[1] - 0.2 * ry)
        draw.ellipse(_ellipse_box(offset, 0.85 * rx, 0.85 * ry), fill=0)
    elif family == "semicircle":
        draw.pieslice(_ellipse_box(centre, rx, ry), start=180, end=360, fill=255)
    elif family == "frame":
        square = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64) * 0.8
        draw.polygon(_place(square, centre, radius, aspect, angle), fill=255)
        draw.polygon(_place(square * 0.55, centre, radius, aspect, angle), fill=0)
    else:
        draw.polygon(_place(_polygon(family), centre, radius, aspect, angle), fill=255)
    return np.asarray(canvas) > 0


def _texture_pattern(texture: str, height: int, width: int, rng: np.random.Generator):
    """Boolean [height, width] pattern; True pixels are drawn in the darker shade."""
    ys, xs = np.mgrid[0:height, 0:width]
    period = int(rng.integers(6, 11))
    phase = int(rng.integers(0, period))
    if texture == "plain":
        return np.zeros((height, width), dtype=bool)
    if texture == "hstripes":
        return ((ys + phase) // (period // 2)) % 2 == 0
    if texture == "vstripes":
        return ((xs + phase) // (period // 2)) % 2 == 0
    if texture == "diagonal":
        return ((xs + ys + phase) // (period // 2)) % 2 == 0
    if texture == "checks":
        return (((xs + phase) // period) + ((ys + phase) // period)) % 2 == 0
    # Dots: discs of radius period/4 on a square grid.
    dy = (ys + phase) % period - period / 2
    dx = (xs + phase) % period - period / 2
    return dx * dx + dy * dy <= (period / 4) ** 2


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A muted gradient with a faint wavy texture: float [height, width, 3] in 0..255."""
    start, end = rng.uniform(40, 200, size=(2, 3))
    # Pull towards grey so backgrounds are less saturated than the object colours.
    start, end = 0.5 * start + 0.5 * start.mean(), 0.5 * end + 0.5 * end.mean()
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = np.cos(angle) * xs / width + np.sin(angle) * ys / height
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    image = start + ramp[..., None] * (end - start)
    frequency = rng.uniform(0.05, 0.2, size=2)
    waves = np.sin(frequency[0] * xs + rng.uniform(0, 6)) * np.sin(frequency[1] * ys)
    return image + 12.0 * waves[..., None]


def _scene(height: int, width: int, classes, rng: np.random.Generator):
    """Renders one scene: (image uint8 [H, W, 3], label uint8 [H, W] with 0..20 and 255)."""
    image = _background(height, width, rng)
    label = np.zeros((height, width), dtype=np.uint8)
    side = min(height, width)
    radii = rng.uniform(0.15, 0.4, size=len(classes)) * side
    # Larger objects first, so smaller ones in front are rarely hidden entirely.
    for order in np.argsort(-radii):
        class_index = int(classes[order])
        centre = (rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height)
        mask = shape_mask(
            SHAPE_FAMILIES[class_index],
            height,
            width,
            centre,
            radius=float(radii[order]),
            aspect=rng.uniform(0.75, 1.3),
            angle=rng.uniform(-0.35, 0.35),
        )
        colour = class_colour(class_index) + rng.uniform(-18, 18, size=3)
        shade = np.where(
            _texture_pattern(class_texture(class_index), height, width, rng)[..., None],
            0.55 * colour,
            colour,
        )
        image = np.where(mask[..., None], shade, image)
        label[mask] = class_index
    # Void band: any pixel whose 3x3 neighbourhood holds two labels (two pixels wide).
    boundary = ndimage.maximum_filter(label, size=3, mode="nearest") != ndimage.minimum_filter(
        label, size=3, mode="nearest"
    )
    label[boundary] = IGNORE_LABEL
    image = image + rng.normal(0.0, 5.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _class_stream(rng: np.random.Generator):
    """Yields object classes 1..20 in successive random permutations, so a split of a
    dozen images already holds every class."""
    while True:
        yield from (rng.permutation(VOC_NUM_CLASSES - 1) + 1).tolist()


def _palette_png_bytes(label: np.ndarray) -> bytes:
    """A palette ('P') PNG whose pixel values are the class indices, like VOC's."""
    image = Image.fromarray(label)  # mode 'L'; putpalette turns it into 'P', values intact
    image.putpalette(voc_colormap().reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def write_synthetic_voc(
    root,
    *,
    num_train: int = 500,
    num_val: int = 100,
    min_size: int = 96,
    max_size: int = 160,
    seed: int = 0,
) -> Path:
    """Writes a synthetic dataset in the VOC 2012 layout under `root`; returns
    `root/VOCdevkit/VOC2012`.

    Args:
      root: folder to write into (created if needed).
      num_train, num_val: images in ImageSets/Segmentation/train.txt and val.txt.
      min_size, max_size: each image's height and width are drawn independently from
        [min_size, max_size], so odd sizes occur.
      seed: the same seed writes byte-identical files.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(
            f"write_synthetic_voc needs num_train >= 1 and num_val >= 1, got {num_train} "
            f"and {num_val}."
        )
    if not 16 <= min_size <= max_size:
        raise ValueError(
            f"write_synthetic_voc needs 16 <= min_size <= max_size, got min_size={min_size}, "
            f"max_size={max_size}."
        )
    voc_root = Path(root) / "VOCdevkit" / "VOC2012"
    image_dir = voc_root / "JPEGImages"
    mask_dir = voc_root / "SegmentationClass"
    list_dir = voc_root / "ImageSets" / "Segmentation"
    for folder in (image_dir, mask_dir, list_dir):
        folder.mkdir(parents=True, exist_ok=True)

    ids_by_split = {}
    for split_number, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
        rng = np.random.default_rng([seed, split_number])
        classes = _class_stream(rng)
        ids = []
        for index in range(count):
            image_id = f"synthetic_{split}_{index:06d}"
            height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            scene_classes = [next(classes) for _ in range(int(rng.integers(1, 5)))]
            image, label = _scene(height, width, scene_classes, rng)
            (image_dir / f"{image_id}.jpg").write_bytes(_jpeg_bytes(image))
            (mask_dir / f"{image_id}.png").write_bytes(_palette_png_bytes(label))
            ids.append(image_id)
        ids_by_split[split] = ids
    (list_dir / "train.txt").write_text("\n".join(ids_by_split["train"]) + "\n")
    (list_dir / "val.txt").write_text("\n".join(ids_by_split["val"]) + "\n")
    (list_dir / "trainval.txt").write_text(
        "\n".join(ids_by_split["train"] + ids_by_split["val"]) + "\n"
    )
    return voc_root
