"""layers.conv_by_taps is lax.conv_general_dilated (its CPU matmul forms of 1×1 convs and taps).

Exact same results (to float rounding) and gradients for every case it rewrites, the rewrite
really happens where it should (no convolution left in the jaxpr), and everything else falls
through unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _both(x, kernel, strides, padding, dilation=(1, 1), groups=1):
    dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC)

    def run(conv):
        return lambda x, k: conv(
            x,
            k,
            strides,
            padding,
            rhs_dilation=dilation,
            dimension_numbers=dims,
            feature_group_count=groups,
        )

    return run(jax.lax.conv_general_dilated), run(layers.conv_by_taps)


CASES = [
    # (H, W, C_in, kernel, strides, padding, dilation) — 1×1 matmuls, mostly-padding taps
    (9, 7, 5, (1, 1), (1, 1), "SAME", (1, 1)),
    (9, 7, 5, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    (8, 8, 5, (1, 1), (2, 2), "VALID", (1, 1)),
    (9, 9, 4, (3, 3), (1, 1), ((12, 12), (12, 12)), (12, 12)),  # only the centre tap is real
    (9, 7, 4, (3, 3), (1, 1), ((4, 4), (4, 4)), (4, 4)),  # partly real off-centre taps
    (6, 5, 4, (3, 1), (1, 1), ((2, 5), (0, 0)), (3, 1)),  # asymmetric padding
    (8, 8, 3, (5, 5), (1, 1), ((6, 6), (6, 6)), (3, 3)),
]


@pytest.mark.parametrize("h, w, c, kernel, strides, padding, dilation", CASES)
def test_conv_by_taps_equals_the_xla_convolution_and_its_gradients(
    h, w, c, kernel, strides, padding, dilation
):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(*kernel, c, 3)), jnp.float32)
    reference, taps = _both(x, k, strides, padding, dilation)
    np.testing.assert_allclose(taps(x, k), reference(x, k), rtol=1e-5, atol=1e-5)
    grads = [
        jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) ** 2), (0, 1))(x, k) for f in (reference, taps)
    ]
    for got, want in zip(grads[1], grads[0]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    jaxpr = str(jax.make_jaxpr(taps)(x, k))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


@pytest.mark.parametrize(
    "kernel, strides, padding, dilation, groups",
    [
        ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # mostly real: XLA's convolution
        ((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),  # strided 3×3
        ((3, 3), (1, 1), ((6, 6), (6, 6)), (6, 6), 4),  # depthwise
    ],
)
def test_conv_by_taps_leaves_other_convolutions_to_xla(kernel, strides, padding, dilation, groups):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(*kernel, 4 // groups, 4)), jnp.float32)
    reference, taps = _both(x, k, strides, padding, dilation, groups)
    assert "conv_general_dilated" in str(jax.make_jaxpr(taps)(x, k))
    np.testing.assert_array_equal(taps(x, k), reference(x, k))


def test_conv_by_taps_can_be_switched_off(monkeypatch):
    x, k = jnp.ones((1, 5, 5, 2)), jnp.ones((1, 1, 2, 3))
    _, taps = _both(x, k, (1, 1), "SAME")
    monkeypatch.setattr(layers, "CONV_BY_TAPS", False)
    assert "conv_general_dilated" in str(jax.make_jaxpr(taps)(x, k))


def test_in_bounds_fraction_of_deeplab_aspp_rates_on_a_33_pixel_map():
    def fraction(rate):
        return layers.in_bounds_fraction((2, 33, 33, 8), (3, 3), (rate, rate), [(rate, rate)] * 2)

    assert fraction(36) == pytest.approx(1 / 9)  # every off-centre tap is outside the map
    assert fraction(24) == pytest.approx(((33 + 2 * 9) / 99) ** 2)
    assert fraction(12) == pytest.approx(((33 + 2 * 21) / 99) ** 2)
    assert fraction(1) == pytest.approx(((33 + 2 * 32) / 99) ** 2)
