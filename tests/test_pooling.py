"""Parity of flaxseg.models.pooling with PyTorch's MaxPool2d/MaxUnpool2d/AdaptiveAvgPool2d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity_helpers import nhwc

from flaxseg.models import pooling


def _torch_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize(
    "shape, ties",
    [
        ((2, 8, 10, 3), False),
        ((2, 9, 7, 3), False),  # odd sizes: floor drops, ceil overhangs
        ((1, 13, 1 + 2 * 6, 4), True),  # values from {0, 1, 2}: many ties
        ((3, 5, 6, 2), True),
    ],
)
def test_max_pool_and_unpool_match_torch(shape, ties, ceil_mode):
    rng = np.random.default_rng(sum(shape) + ceil_mode)
    if ties:
        x = rng.integers(0, 3, size=shape).astype(np.float32)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    pooled, indices = pooling.max_pool_with_indices(jnp.asarray(x), 2, ceil_mode=ceil_mode)

    t_pooled, t_indices = torch.nn.MaxPool2d(2, 2, ceil_mode=ceil_mode, return_indices=True)(
        _torch_nchw(x)
    )
    np.testing.assert_array_equal(np.asarray(pooled), nhwc(t_pooled))
    np.testing.assert_array_equal(np.asarray(indices), nhwc(t_indices))
    assert indices.dtype == jnp.int32

    # Unpool something other than the pooled maxima, so placement is what is checked.
    values = rng.standard_normal(pooled.shape).astype(np.float32)
    out = pooling.max_unpool(jnp.asarray(values), indices, shape[1:3])
    t_out = torch.nn.MaxUnpool2d(2, 2)(_torch_nchw(values), t_indices, output_size=shape[1:3])
    assert out.shape == shape
    np.testing.assert_array_equal(np.asarray(out), nhwc(t_out))


def test_max_pool_ties_and_nans_follow_torch_rules():
    # Window [[1, 1], [1, 1]] -> first (0); [[0, 1], [1, 0]] -> 1; NaN windows -> last NaN.
    x = np.array([[1, 1, 0, 1, float("nan"), 1], [1, 1, 1, 0, float("nan"), 0]], np.float32)[
        None, :, :, None
    ]
    _, indices = pooling.max_pool_with_indices(jnp.asarray(x))
    _, t_indices = torch.nn.functional.max_pool2d(_torch_nchw(x), 2, 2, return_indices=True)
    np.testing.assert_array_equal(np.asarray(indices)[0, 0, :, 0], [0, 3, 10])
    np.testing.assert_array_equal(np.asarray(indices), nhwc(t_indices))


def test_max_pool_gradient_goes_to_selected_pixel_only():
    x = jnp.ones((1, 2, 2, 1))
    grad = jax.grad(lambda v: pooling.max_pool_with_indices(v)[0].sum())(x)
    np.testing.assert_array_equal(np.asarray(grad)[0, :, :, 0], [[1, 0], [0, 0]])


def test_pooling_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="ceil_mode=True"):
        pooling.max_pool_with_indices(jnp.zeros((1, 1, 4, 1)))
    assert pooling.max_pool_with_indices(jnp.zeros((1, 1, 4, 1)), ceil_mode=True)[0].shape == (
        1,
        1,
        2,
        1,
    )
    with pytest.raises(ValueError, match="output_size"):
        pooling.max_unpool(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1), jnp.int32), (9, 4))


@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_torch(bins):
    x = np.random.default_rng(bins).standard_normal((2, 33, 47, 5)).astype(np.float32)
    out = pooling.adaptive_avg_pool(jnp.asarray(x), bins)
    expected = nhwc(torch.nn.AdaptiveAvgPool2d(bins)(_torch_nchw(x)))
    assert out.shape == (2, bins, bins, 5)
    assert np.max(np.abs(np.asarray(out) - expected)) <= 1e-6


def test_adaptive_bins_overlap_like_torch():
    # 7 pixels into 3 bins: [0, 3), [2, 5), [4, 7).
    assert pooling.adaptive_bins(7, 3) == [(0, 3), (2, 5), (4, 7)]
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(1, 2 * 5, 3, 1)
    out = pooling.adaptive_avg_pool(jnp.asarray(x), (6, 2))
    expected = nhwc(torch.nn.AdaptiveAvgPool2d((6, 2))(_torch_nchw(x)))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)
