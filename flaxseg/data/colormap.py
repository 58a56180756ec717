"""The PASCAL VOC colour map (the palette stored in every SegmentationClass PNG) and
`colorize`, which paints a label map with any dataset's colour map."""

import numpy as np


def voc_colormap(num_entries: int = 256) -> np.ndarray:
    """Returns the VOC palette as uint8 [num_entries, 3].

    Entry i spreads the bits of i over the three channels, most significant first
    (the devkit's `labelcolormap.m`): bit 0 → red, bit 1 → green, bit 2 → blue, three
    bits per round. Entry 0 is black, 1 is (128, 0, 0), 255 (void) is (224, 224, 192).
    """
    index = np.arange(num_entries, dtype=np.int64)
    colours = np.zeros((num_entries, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colours.astype(np.uint8)


def colorize(label_map: np.ndarray, colormap=None) -> np.ndarray:
    """Maps an integer label map [H, W] to an RGB uint8 [H, W, 3] image.

    `colormap` is a uint8 [N, 3] array, a callable returning one (e.g.
    `dataset_info('cityscapes').colormap`), or None for the VOC colour map (256 entries:
    classes 0..20 and 255 = void).
    """
    if colormap is None:
        colormap = voc_colormap
    colours = np.asarray(colormap() if callable(colormap) else colormap)
    if colours.ndim != 2 or colours.shape[1] != 3:
        raise ValueError(f"A colour map must have shape [N, 3], got {colours.shape}.")
    label_map = np.asarray(label_map)
    if label_map.min(initial=0) < 0 or label_map.max(initial=0) >= len(colours):
        raise ValueError(
            f"Label values must lie in 0..{len(colours) - 1} to be coloured, got range "
            f"{label_map.min()}..{label_map.max()}."
        )
    return colours.astype(np.uint8)[label_map.astype(np.int64)]
