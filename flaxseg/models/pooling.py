"""Pooling ops with PyTorch semantics: max-pooling with argmax indices, max-unpooling, and
adaptive average pooling.

Pure, vectorised JAX (reshapes, ``argmax`` and matrix products; no loops over pixels and no
scatters, which are slow on accelerators). Arrays are NHWC.

- ``max_pool_with_indices`` / ``max_unpool`` are SegNet's encoder pooling and decoder
  upsampling (Badrinarayanan et al., TPAMI 2017): the decoder puts every pooled value back at
  the position its maximum came from, zeros elsewhere. Indices follow
  ``torch.nn.MaxPool2d(return_indices=True)``: per (batch, channel) plane, the flat index
  ``h · W + w`` into the *pooling input* of width W. Ties go to the first maximum in row-major
  window order and a window holding NaN reports its last NaN, as PyTorch's CPU kernel does.
- ``adaptive_avg_pool`` is PSPNet's pyramid pooling (Zhao et al., CVPR 2017) with the bins of
  ``torch.nn.AdaptiveAvgPool2d``: output cell i of o over n inputs averages
  [floor(i·n/o), ceil((i+1)·n/o)), so bins overlap when o does not divide n.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.models.layers import pool_output_size

Array = jax.Array


def pooled_size(size: int, window: int, ceil_mode: bool = False) -> int:
    """Output size of a ``window``×``window`` max-pool with stride ``window`` and no padding.

    floor((n − k) / k) + 1 by default (PyTorch's ``ceil_mode=False``: trailing rows that do not
    fill a window are dropped), ceil((n − k) / k) + 1 with ``ceil_mode`` (the last window may
    hang over the edge and sees only real pixels; every n ≥ 1 pools to at least 1).
    """
    if size < 1 or (size < window and not ceil_mode):
        raise ValueError(
            f"A {window}x{window} max-pool (ceil_mode={ceil_mode}) cannot pool a dimension of "
            f"size {size}; use a larger input or ceil_mode=True."
        )
    return pool_output_size(size, window, window, ceil_mode=ceil_mode)


def _to_windows(x: Array, window: int) -> Array:
    # [B, oh·k, ow·k, C] -> [B, oh, ow, k·k, C], the window's pixels in row-major order.
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // window, w // window, window * window, c)


def _from_windows(x: Array, window: int) -> Array:
    # Inverse of ``_to_windows``.
    b, oh, ow, _, c = x.shape
    x = x.reshape(b, oh, ow, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, oh * window, ow * window, c)


def max_pool_with_indices(
    x: Array, window: int = 2, ceil_mode: bool = False
) -> tuple[Array, Array]:
    """Max-pool [B, H, W, C] with a ``window``×``window`` kernel and stride ``window``.

    Returns ``(pooled, indices)``, both [B, oh, ow, C] with oh = ``pooled_size(H, window,
    ceil_mode)`` (likewise ow). ``indices`` (int32) hold the flat position ``h · W + w`` of each
    maximum in its channel of ``x``, exactly as ``torch.nn.MaxPool2d(window, window,
    ceil_mode=ceil_mode, return_indices=True)`` reports them for the NCHW transpose.
    Gradients reach only the selected pixel (as in PyTorch), not every tied maximum.
    """
    b, h, w, c = x.shape
    oh, ow = pooled_size(h, window, ceil_mode), pooled_size(w, window, ceil_mode)
    ph, pw = oh * window, ow * window
    x_win = x[:, :ph, :pw, :]
    # Ceil mode: pad the overhang with -inf. A window's first pixel is always real and ties go
    # to the first maximum, so padding is never selected, even when every real value is -inf.
    x_win = jnp.pad(
        x_win,
        ((0, 0), (0, ph - x_win.shape[1]), (0, pw - x_win.shape[2]), (0, 0)),
        constant_values=-jnp.inf,
    )
    windows = _to_windows(x_win, window)  # [B, oh, ow, k·k, C]

    # jnp.argmax returns the first maximum (PyTorch's tie rule). PyTorch's kernel also lets
    # every NaN replace the running maximum, so a window with NaNs reports its last one.
    is_nan = jnp.isnan(windows)
    first_max = jnp.argmax(jnp.where(is_nan, -jnp.inf, windows), axis=3)
    last_nan = window * window - 1 - jnp.argmax(jnp.flip(is_nan, axis=3), axis=3)
    local = jnp.where(jnp.any(is_nan, axis=3), last_nan, first_max)  # [B, oh, ow, C]

    pooled = jnp.take_along_axis(windows, local[:, :, :, None, :], axis=3)[:, :, :, 0, :]
    rows = jnp.arange(oh, dtype=jnp.int32)[None, :, None, None] * window + local // window
    cols = jnp.arange(ow, dtype=jnp.int32)[None, None, :, None] * window + local % window
    return pooled, (rows * w + cols).astype(jnp.int32)


def max_unpool(x: Array, indices: Array, output_size: Sequence[int], window: int = 2) -> Array:
    """SegNet's upsampling: scatter pooled values [B, oh, ow, C] back to [B, H, W, C].

    ``indices`` are those of ``max_pool_with_indices(y, window)`` for a y of spatial size
    ``output_size`` = (H, W); each value lands at its index and every other pixel is zero, so the
    result equals ``torch.nn.MaxUnpool2d(window, window)(x, indices, output_size=(H, W))``.
    Passing the encoder map's exact size restores odd sizes (the rows a floor-mode pool dropped
    come back as zeros). Because each index lies inside its own non-overlapping window, the
    scatter is a one-hot selection per window: no data-dependent scatter is needed.
    """
    b, oh, ow, c = x.shape
    h, w = int(output_size[0]), int(output_size[1])
    if indices.shape != x.shape:
        raise ValueError(
            f"max_unpool needs indices shaped like the pooled values, got {indices.shape} and "
            f"{x.shape}."
        )
    # A floor-mode pool maps n in [o·k, o·k + k − 1] to o cells, a ceil-mode one n in
    # [(o − 1)·k + 1, o·k]; any other size cannot have produced these indices.
    if not all((o - 1) * window < n < (o + 1) * window for n, o in ((h, oh), (w, ow))):
        raise ValueError(
            f"max_unpool output_size {(h, w)} cannot come from a {window}x{window} pool with "
            f"output {(oh, ow)}."
        )
    rows, cols = indices // w, indices % w
    local_row = rows - jnp.arange(oh, dtype=indices.dtype)[None, :, None, None] * window
    local_col = cols - jnp.arange(ow, dtype=indices.dtype)[None, None, :, None] * window
    local = local_row * window + local_col  # position inside the window, row-major
    one_hot = local[:, :, :, None, :] == jnp.arange(window * window)[None, None, None, :, None]
    y = _from_windows(jnp.where(one_hot, x[:, :, :, None, :], jnp.zeros((), x.dtype)), window)
    # Floor mode left rows/cols out (pad them with zeros); ceil mode covered extra ones (crop).
    y = y[:, :h, :w, :]
    return jnp.pad(y, ((0, 0), (0, h - y.shape[1]), (0, w - y.shape[2]), (0, 0)))


def adaptive_bins(size: int, bins: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pooling bins: [(floor(i·n/o), ceil((i+1)·n/o)) for i < o]."""
    if size < 1 or bins < 1:
        raise ValueError(
            f"Adaptive pooling needs a positive input and output size, got {size} and {bins}."
        )
    return [((i * size) // bins, -(-((i + 1) * size) // bins)) for i in range(bins)]


def adaptive_average_matrix(size: int, bins: int) -> np.ndarray:
    """[bins, size] float32 matrix whose row i averages ``adaptive_bins(size, bins)[i]``."""
    matrix = np.zeros((bins, size), np.float32)
    for i, (start, end) in enumerate(adaptive_bins(size, bins)):
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: Array, output_size: int | Sequence[int]) -> Array:
    """``torch.nn.AdaptiveAvgPool2d(output_size)`` on [B, H, W, C] -> [B, oh, ow, C].

    Separable: average over rows, then over columns, each a product with a constant bin
    matrix. Accumulates in float32 at full precision (a bin mean must not lose bits to
    bfloat16 matmul passes on accelerators) and returns ``x.dtype``.
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    rows = jnp.asarray(adaptive_average_matrix(x.shape[1], int(oh)))
    cols = jnp.asarray(adaptive_average_matrix(x.shape[2], int(ow)))
    y = jnp.einsum(
        "ih,bhwc->biwc", rows, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    y = jnp.einsum("jw,biwc->bijc", cols, y, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
