"""Test-time augmentation as pure array functions: multi-scale inputs, horizontal flip and
sliding windows (DeepLab v2/v3 Sec. 4 "multi-scale inputs and flip"; mmsegmentation's
``slide_inference`` and ``aug_test``).

What is averaged follows MMSegmentation: overlapping sliding windows average their *logits*
(``slide_inference``: the windows' logits summed into ``preds``, divided by ``count_mat``), and
softmax is taken once on that average; scales and flips then average *probabilities*
(``aug_test`` sums ``inference()``'s softmax outputs and divides by their number).
``window_average='probs'`` averages the windows' softmax probabilities instead (flaxseg's
behaviour before; it weighs a confident window less than logit averaging does).

Everything takes ``apply_fn(images [B, h, w, 3]) -> logits [B, h, w, C]`` (any h, w, as the
flaxseg model contract promises), never a model, so this module imports nothing of flaxseg.

Padded batches: evaluation pads every image bottom/right to a bucket shape. ``sizes`` [B, 2]
(int, may be traced) gives each image's real (height, width); scaling and flipping then act on
the real image only, exactly as if it had been evaluated unpadded, and the padding of the
output is 0. Scaled shapes are static functions of the padded shape and the scales, so one
batch shape compiles once whatever the real sizes are.

    probs = predict_probs(apply_fn, images, scales=(0.5, 1.0, 1.5), flip=True, window=513)
"""

import math
from collections.abc import Callable, Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_options(
    scales: Sequence[float] = (1.0,),
    window: Optional[int] = None,
    overlap: float = 0.33,
    output_stride: Optional[int] = None,
) -> tuple[float, ...]:
    """Refuses bad TTA settings with one sentence; returns the scales as a tuple of floats."""
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("scales must name at least one scale, got none.")
    for scale in scales:
        if not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"Every scale must be a positive number, got {scale} in {scales}.")
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be a positive number of pixels, got {window}.")
        if output_stride is not None and window < output_stride:
            raise ValueError(
                f"window={window} is smaller than the model's output stride {output_stride}; "
                f"use a window of at least {output_stride} pixels."
            )
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    return scales


def _scaled_length(length: int, scale: float) -> int:
    return max(1, math.floor(length * scale + 0.5))


def _resize_weights(in_len: int, out_len: int, in_size, out_size) -> Array:
    """[B, in_len, out_len] bilinear weights (half-pixel centres, no antialiasing: PyTorch's
    ``align_corners=False``, as the models resize) that map the first ``in_size`` of ``in_len``
    entries onto the first ``out_size`` of ``out_len``; sizes are [B] and may be traced.

    The same formula as ``jax.image.resize(method='bilinear', antialias=False)``, with the
    input and output lengths masked to the real sizes: padding is never sampled and is 0 in
    the output.
    """
    in_size = jnp.asarray(in_size, jnp.float32)[:, None, None]
    out_size = jnp.asarray(out_size, jnp.float32)[:, None, None]
    inv_scale = in_size / out_size
    source = jnp.arange(in_len, dtype=jnp.float32)[None, :, None]
    target = jnp.arange(out_len, dtype=jnp.float32)[None, None, :]
    sample = (target + 0.5) * inv_scale - 0.5
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample - source))
    weights = jnp.where(source < in_size, weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = jnp.where(total > 1000.0 * np.finfo(np.float32).eps, weights / total, 0.0)
    inside = (sample >= -0.5) & (sample <= in_size - 0.5) & (target < out_size)
    return jnp.where(inside, weights, 0.0)


def resize_padded(x: Array, shape: Sequence[int], in_sizes, out_sizes) -> Array:
    """Bilinear resize of each image's real top-left ``in_sizes[b]`` (h, w) region of
    x [B, H, W, C] to ``out_sizes[b]`` in the top-left of a zero [B, shape[0], shape[1], C]."""
    in_sizes, out_sizes = jnp.asarray(in_sizes), jnp.asarray(out_sizes)
    rows = _resize_weights(x.shape[1], shape[0], in_sizes[:, 0], out_sizes[:, 0])
    cols = _resize_weights(x.shape[2], shape[1], in_sizes[:, 1], out_sizes[:, 1])
    x32 = x.astype(jnp.float32)
    out = jnp.einsum("bhwc,bhH->bHwc", x32, rows, precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("bHwc,bwW->bHWc", out, cols, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


def flip_padded(x: Array, widths=None) -> Array:
    """Horizontal flip of x [B, H, W, C]; with ``widths`` [B], of each image's real left
    ``widths[b]`` columns only, the padding staying where it is. Its own inverse."""
    if widths is None:
        return x[:, :, ::-1]
    columns = jnp.arange(x.shape[2])[None, :]
    widths = jnp.asarray(widths)[:, None]
    index = jnp.where(columns < widths, widths - 1 - columns, columns)  # [B, W]
    return jnp.take_along_axis(x, index[:, None, :, None], axis=2)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` ≤ ``length`` pixels with ``stride`` that cover
    ``length``, the last one flush with the end (mmsegmentation's grid)."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


WINDOW_AVERAGES = ("logits", "probs")


def sliding_window_probs(
    probs_fn: Callable[[Array], Array], images: Array, *, window: int, overlap: float = 0.33
) -> Array:
    """The average of ``probs_fn`` (any per-pixel map: logits or probabilities) of images
    [B, H, W, 3] over overlapping ``window``×``window`` crops (stride ceil(window·(1 − overlap))):
    each window's output summed into its place, divided by how many windows cover each pixel
    (MMSegmentation's ``preds / count_mat``). A side shorter than the window is taken whole, so
    an image that one window covers gives exactly ``probs_fn(images)``."""
    _, height, width, _ = images.shape
    window_h, window_w = min(window, height), min(window, width)
    stride = max(1, math.ceil(window * (1.0 - overlap)))
    offsets = [
        (top, left)
        for top in window_starts(height, window_h, stride)
        for left in window_starts(width, window_w, stride)
    ]
    if len(offsets) == 1:
        return probs_fn(images)
    count = np.zeros((height, width), np.float32)
    for top, left in offsets:
        count[top : top + window_h, left : left + window_w] += 1

    def add_window(total, offset):
        top, left = offset[0], offset[1]
        crop = jax.lax.dynamic_slice(
            images, (0, top, left, 0), (images.shape[0], window_h, window_w, images.shape[3])
        )
        probs = probs_fn(crop)
        start = (0, top, left, 0)
        current = jax.lax.dynamic_slice(total, start, probs.shape)
        return jax.lax.dynamic_update_slice(total, current + probs, start), None

    # One traced model call (the scan body) whatever the number of windows.
    probs = jax.eval_shape(probs_fn, images[:, :window_h, :window_w])
    total = jnp.zeros((*images.shape[:3], probs.shape[-1]), probs.dtype)
    total, _ = jax.lax.scan(add_window, total, jnp.asarray(offsets, jnp.int32))
    return total / jnp.asarray(count)[None, :, :, None]


def predict_probs(
    apply_fn: Callable[[Array], Array],
    images: Array,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: Optional[int] = None,
    overlap: float = 0.33,
    sizes=None,
    pad_multiple: int = 1,
    window_average: str = "logits",
) -> Array:
    """Softmax probabilities [B, H, W, C] (float32) of images [B, H, W, 3], averaged over
    ``scales`` × (identity, horizontal flip if ``flip``).

    For scale s each image's real (h, w) is resized bilinearly to (round(s·h), round(s·w)) in a
    zero canvas of (round(s·H), round(s·W)) rounded up to ``pad_multiple``, run (whole, or in
    sliding windows if ``window``), and its probabilities resized back to (h, w). Scale 1.0
    is run unresized, so ``scales=(1.0,)`` without flip or window is plain inference,
    ``softmax(apply_fn(images))``.

    Args:
      apply_fn: images -> float logits at the images' H×W.
      sizes: int [B, 2] real (height, width) of each image in the padded batch; None: all of
        H×W. Output pixels outside an image's real size are 0.
      pad_multiple: canvas sides of the scaled images are rounded up to a multiple of this
        (the padding is 0 and is cropped off the result).
      window_average: with ``window``, 'logits' (MMSegmentation's ``slide_inference``: the
        windows' logits averaged, then one softmax) or 'probs' (the windows' probabilities
        averaged).
    """
    scales = check_options(scales, window, overlap)
    if window_average not in WINDOW_AVERAGES:
        raise ValueError(
            f"window_average must be one of {', '.join(map(repr, WINDOW_AVERAGES))}, "
            f"got {window_average!r}."
        )
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be a positive number of pixels, got {pad_multiple}.")
    batch, height, width, _ = images.shape
    full = sizes is None
    sizes = (
        jnp.tile(jnp.asarray([[height, width]], jnp.int32), (batch, 1))
        if full
        else jnp.asarray(sizes, jnp.int32)
    )

    def probs_fn(x):
        return jax.nn.softmax(apply_fn(x).astype(jnp.float32), axis=-1)

    def logits_fn(x):
        return apply_fn(x).astype(jnp.float32)

    def run(x):
        if window is None:
            return probs_fn(x)
        if window_average == "probs":
            return sliding_window_probs(probs_fn, x, window=window, overlap=overlap)
        logits = sliding_window_probs(logits_fn, x, window=window, overlap=overlap)
        return jax.nn.softmax(logits, axis=-1)

    total = None
    for scale in scales:
        for flipped in (False, True) if flip else (False,):
            x = flip_padded(images, None if full else sizes[:, 1]) if flipped else images
            if scale == 1.0:
                probs = run(x)
            else:
                canvas = [
                    math.ceil(_scaled_length(side, scale) / pad_multiple) * pad_multiple
                    for side in (height, width)
                ]
                scaled = jnp.floor(sizes * scale + 0.5).astype(jnp.int32)
                scaled = jnp.clip(scaled, 1, jnp.asarray(canvas))  # float32 rounding vs Python's
                probs = run(resize_padded(x, canvas, sizes, scaled))
                probs = resize_padded(probs, (height, width), scaled, sizes)
            if flipped:
                probs = flip_padded(probs, None if full else sizes[:, 1])
            total = probs if total is None else total + probs
    count = len(scales) * (2 if flip else 1)
    probs = total if count == 1 else total / count
    if full:
        return probs
    rows = jnp.arange(height)[None, :, None] < sizes[:, 0, None, None]
    columns = jnp.arange(width)[None, None, :] < sizes[:, 1, None, None]
    return jnp.where((rows & columns)[..., None], probs, 0.0)
