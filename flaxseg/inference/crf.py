"""Fully connected CRF post-processing (Krähenbühl & Koltun, NIPS 2011) as DeepLab v1/v2 use it.

The CRF over the pixels of one image has the energy
``E(x) = sum_i U_i(x_i) + sum_{i,j} mu(x_i, x_j) sum_k w_k k_k(f_i, f_j)``, with the unary
``U = -log(probs)`` (DeepLab's network softmax), the Potts compatibility ``mu = [x_i != x_j]``
and two Gaussian kernels:

- appearance (bilateral): ``w_b exp(-|p_i - p_j|^2 / 2 s_xy^2 - |I_i - I_j|^2 / 2 s_rgb^2)``,
- smoothness (Gaussian): ``w_g exp(-|p_i - p_j|^2 / 2 s_g^2)``.

Mean-field inference (``num_iterations`` parallel updates) follows Krähenbühl's released code
(densecrf, which pydensecrf wraps) exactly: Q starts as ``softmax(-U)``; every kernel is
normalised symmetrically, ``K~ = D K D`` with ``D = diag(1 / sqrt(K 1))`` (NORMALIZE_SYMMETRIC,
pydensecrf's default); the pixel's own term ``k(f_i, f_i) = 1`` is included (the lattice cannot
exclude it); the update is ``Q <- softmax(-U + sum_k w_k K~_k Q)`` (the Potts form up to a
per-pixel constant); Q after the last update is returned.

Defaults: DeepLab v2's released VOC 2012 parameters (ResNet-101 model; 10 iterations, bilateral
weight 4, xy std 67, rgb std 3, Gaussian weight 3, xy std 1), as shipped with the DeepLab v2
release and reproduced in kazuto1011/deeplab-pytorch ``configs/voc12.yaml`` (``CRF:`` section).

``method='lattice'`` filters with the permutohedral lattice (Adams et al. 2010,
``permutohedral.py``) for both kernels (the 2-D Gaussian kernel too, as densecrf does);
``method='exact'`` builds the dense N x N kernels: the reference for small images. The lattice
is an approximation with a narrower, truncated kernel (in 5-D its mean response at distances
1, 2, 3 std is 0.49, 0.05, 0 against exp(-r^2 / 2) = 0.61, 0.14, 0.01), so the two agree on
images with coherent regions and less on random textures.

    from flaxseg import inference
    refined = inference.dense_crf(image_uint8, probs)                  # [H, W, C]
    refined = jax.vmap(inference.dense_crf)(images_uint8, probs_batch)  # [B, H, W, C]
"""

import math
import numbers
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.inference.permutohedral import build_lattice, lattice_filter

METHODS = ("lattice", "exact")
# method='exact' keeps two N x N float32 kernels: 1 GiB each at this size.
EXACT_MAX_PIXELS = 128 * 128
# Probabilities are floored before the log, as pydensecrf.utils.unary_from_softmax does.
PROB_FLOOR = 1e-5


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"dense_crf: {name} must be a number > 0, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"dense_crf: {name} must be finite, got {value!r}.")


def _check_inputs(image, probs, params: dict, method: str) -> None:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != jnp.uint8:
        raise ValueError(
            f"dense_crf: image must be a uint8 [H, W, 3] array, got {image.dtype} "
            f"{list(image.shape)}."
        )
    if probs.ndim != 3 or probs.shape[:2] != image.shape[:2] or probs.shape[-1] < 1:
        raise ValueError(
            f"dense_crf: probs must be [H, W, C] with the image's H, W = {list(image.shape[:2])}, "
            f"got {list(probs.shape)}."
        )
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise ValueError(f"dense_crf: probs must be a float array, got {probs.dtype}.")
    iterations = params["num_iterations"]
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, numbers.Integral)
        or iterations < 1
    ):
        raise ValueError(f"dense_crf: num_iterations must be an integer >= 1, got {iterations!r}.")
    for name, value in params.items():
        if name != "num_iterations":
            _check_positive(name, value)
    if method not in METHODS:
        raise ValueError(f"dense_crf: method must be one of {METHODS}, got {method!r}.")
    pixels = image.shape[0] * image.shape[1]
    if method == "exact" and pixels > EXACT_MAX_PIXELS:
        raise ValueError(
            f"dense_crf: method='exact' builds N x N kernels and allows at most "
            f"{EXACT_MAX_PIXELS} pixels, got {pixels}; use method='lattice'."
        )


def _kernel_features(image: jax.Array, bilateral_xy_std, bilateral_rgb_std, gaussian_xy_std):
    """Per-pixel features as densecrf builds them (x, y[, r, g, b]) / std, pixel order y*W + x."""
    h, w, _ = image.shape
    ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    positions = jnp.stack([xs, ys], axis=-1).reshape(h * w, 2).astype(jnp.float32)
    colours = image.reshape(h * w, 3).astype(jnp.float32)
    gaussian = positions / np.float32(gaussian_xy_std)
    bilateral = jnp.concatenate(
        [positions / np.float32(bilateral_xy_std), colours / np.float32(bilateral_rgb_std)], 1
    )
    return gaussian, bilateral


def _normalized_kernel(
    features: jax.Array, feature_ranges: tuple, method: str
) -> Callable[[jax.Array], jax.Array]:
    """features [N, d] -> Q [N, C] -> D K D Q, K_ij = exp(-|f_i - f_j|^2 / 2) (self included)."""
    if method == "lattice":
        lattice = build_lattice(features, feature_ranges)
        apply = partial(lattice_filter, lattice)
    else:
        sq_dist = 0.0
        for k in range(features.shape[1]):
            sq_dist = sq_dist + (features[:, None, k] - features[None, :, k]) ** 2
        kernel = jnp.exp(-0.5 * sq_dist)
        apply = partial(jnp.matmul, kernel)
    ones = jnp.ones((features.shape[0], 1), jnp.float32)
    norm = 1.0 / jnp.sqrt(apply(ones) + 1e-20)  # [N, 1]
    return lambda q: norm * apply(norm * q)


def _unary(probs: jax.Array) -> jax.Array:
    h, w, c = probs.shape
    return -jnp.log(jnp.clip(probs.astype(jnp.float32), PROB_FLOOR, 1.0)).reshape(h * w, c)


def _kernels(image, params: dict, method: str):
    xy_std, rgb_std = params["bilateral_xy_std"], params["bilateral_rgb_std"]
    gaussian, bilateral = _kernel_features(image, xy_std, rgb_std, params["gaussian_xy_std"])
    # Static bounds on each feature's spread (they let the lattice pack its sort keys).
    h, w, _ = image.shape
    gaussian_ranges = ((w - 1) / params["gaussian_xy_std"], (h - 1) / params["gaussian_xy_std"])
    bilateral_ranges = ((w - 1) / xy_std, (h - 1) / xy_std) + (255 / rgb_std,) * 3
    # The order densecrf users add them in (addPairwiseGaussian, then addPairwiseBilateral).
    return [
        (params["gaussian_weight"], _normalized_kernel(gaussian, gaussian_ranges, method)),
        (params["bilateral_weight"], _normalized_kernel(bilateral, bilateral_ranges, method)),
    ]


@partial(jax.jit, static_argnames=("params", "method"))
def _mean_field(image, probs, num_iterations, params: tuple, method: str) -> jax.Array:
    params = dict(params)
    unary = _unary(probs)
    kernels = _kernels(image, params, method)

    def step(_, q):
        logits = -unary
        for weight, kernel in kernels:
            logits = logits + np.float32(weight) * kernel(q)
        return jax.nn.softmax(logits, axis=-1)

    q = jax.lax.fori_loop(0, num_iterations, step, jax.nn.softmax(-unary, axis=-1))
    return q.reshape(probs.shape)


def dense_crf(
    image: jax.Array,
    probs: jax.Array,
    *,
    num_iterations: int = 10,
    bilateral_weight: float = 4.0,
    bilateral_xy_std: float = 67.0,
    bilateral_rgb_std: float = 3.0,
    gaussian_weight: float = 3.0,
    gaussian_xy_std: float = 1.0,
    method: str = "lattice",
) -> jax.Array:
    """Refines class probabilities with a fully connected CRF (mean-field inference).

    Args:
      image: uint8 [H, W, 3] RGB image (the one the probabilities were predicted for).
      probs: float [H, W, C] class probabilities (a softmax); the unary is -log(probs), with
        probabilities floored at 1e-5.
      num_iterations: mean-field updates (>= 1).
      bilateral_weight, bilateral_xy_std, bilateral_rgb_std: appearance kernel weight and its
        position (pixels) and colour (0..255 intensity) standard deviations.
      gaussian_weight, gaussian_xy_std: smoothness kernel weight and position std (pixels).
      method: 'lattice' (permutohedral lattice, any size) or 'exact' (dense N x N kernels,
        at most EXACT_MAX_PIXELS pixels; the reference).

    Returns:
      float32 [H, W, C] marginals Q after the last update; argmax over C is the label map.

    Jit-compiled (the kernel parameters are static, the iteration count is not); batch it
    with ``jax.vmap(dense_crf)`` over images of one H, W. Defaults: DeepLab v2's VOC 2012
    parameters (see the module docstring).
    """
    image = jnp.asarray(image)
    probs = jnp.asarray(probs)
    params = dict(
        num_iterations=num_iterations,
        bilateral_weight=bilateral_weight,
        bilateral_xy_std=bilateral_xy_std,
        bilateral_rgb_std=bilateral_rgb_std,
        gaussian_weight=gaussian_weight,
        gaussian_xy_std=gaussian_xy_std,
    )
    _check_inputs(image, probs, params, method)
    del params["num_iterations"]  # a traced loop bound: other counts reuse the compilation
    params = tuple((name, float(value)) for name, value in params.items())
    return _mean_field(image, probs, int(num_iterations), params, method)


def mean_field_energy(
    image: jax.Array,
    probs: jax.Array,
    marginals: jax.Array,
    *,
    bilateral_weight: float = 4.0,
    bilateral_xy_std: float = 67.0,
    bilateral_rgb_std: float = 3.0,
    gaussian_weight: float = 3.0,
    gaussian_xy_std: float = 1.0,
    method: str = "exact",
) -> jax.Array:
    """The mean-field free energy that ``dense_crf``'s updates descend, for marginals [H, W, C].

    ``F(Q) = sum Q log Q + sum Q U - 1/2 sum_k w_k sum_l Q_l^T K~_k Q_l`` (the KL divergence
    from Q to the CRF's distribution up to log Z, with the Potts term written up to a constant
    as ``dense_crf``'s update uses it); the updates are its fixed-point equations. A scalar.
    """
    image, probs, marginals = jnp.asarray(image), jnp.asarray(probs), jnp.asarray(marginals)
    params = dict(
        num_iterations=1,
        bilateral_weight=bilateral_weight,
        bilateral_xy_std=bilateral_xy_std,
        bilateral_rgb_std=bilateral_rgb_std,
        gaussian_weight=gaussian_weight,
        gaussian_xy_std=gaussian_xy_std,
    )
    _check_inputs(image, probs, params, method)
    if marginals.shape != probs.shape:
        raise ValueError(
            f"mean_field_energy: marginals must have the shape of probs {list(probs.shape)}, "
            f"got {list(marginals.shape)}."
        )
    params = tuple((name, float(value)) for name, value in params.items())
    return _energy(image, probs, marginals, params, method)


@partial(jax.jit, static_argnames=("params", "method"))
def _energy(image, probs, marginals, params: tuple, method: str) -> jax.Array:
    params = dict(params)
    q = marginals.reshape(-1, marginals.shape[-1]).astype(jnp.float32)
    energy = jnp.sum(q * jnp.log(jnp.maximum(q, 1e-20))) + jnp.sum(q * _unary(probs))
    for weight, kernel in _kernels(image, params, method):
        energy = energy - 0.5 * weight * jnp.sum(q * kernel(q))
    return energy
