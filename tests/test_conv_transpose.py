"""Transposed convolution: every ``impl`` of ``layers.conv_transpose`` against PyTorch's
``ConvTranspose2d`` and against each other, values and derivatives."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxseg.models import layers

IMPLS = layers.CONV_TRANSPOSE_IMPLS

# (input size, kernel, stride, padding): FCN's 2× (4, 2, 1), 8× (16, 8, 4) and 32× (64, 32, 16)
# layers at tiny sizes, U-Net's 2×2 up-conv, an odd kernel, a stride larger than the kernel, and
# padding ≥ kernel (negative padding of the dilated input in the lax form).
GEOMETRIES = [
    (5, 4, 2, 1),
    (3, 16, 8, 4),
    (2, 64, 32, 16),
    (4, 2, 2, 0),
    (5, 5, 3, 2),
    (4, 2, 3, 0),
    (6, 2, 2, 2),
]


def _inputs(n, k, c_in=3, c_out=2, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, n, n + 1, c_in)).astype(dtype)
    kernel = rng.normal(size=(k, k, c_in, c_out)).astype(dtype)
    return x, kernel


def _assert_close(got, want, tolerance=1e-5, what=""):
    """Max abs difference at most ``tolerance`` × the largest |want| (float32 sums of hundreds of
    products of unit normals carry absolute rounding errors of ~1e-5 at magnitudes ~40)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error <= tolerance, (what, error)


def _value_and_grads(impl, x, kernel, s, p, cotangent_seed=1):
    """Output and (d/dx, d/dkernel) of <conv_transpose(x, kernel), a fixed random cotangent>."""
    y = layers.conv_transpose(x, kernel, s, p, impl)
    cotangent = jnp.asarray(np.random.default_rng(cotangent_seed).normal(size=y.shape), y.dtype)
    grads = jax.grad(
        lambda x, w: jnp.sum(layers.conv_transpose(x, w, s, p, impl) * cotangent), argnums=(0, 1)
    )(x, kernel)
    return y, grads, cotangent


@pytest.mark.parametrize("n,k,s,p", GEOMETRIES)
def test_every_impl_matches_torch_values_and_gradients(n, k, s, p):
    x, kernel = _inputs(n, k, seed=n + k + s + p)
    torch_x = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    torch_w = torch.from_numpy(kernel.transpose(2, 3, 0, 1).copy()).requires_grad_()
    torch_y = torch.nn.functional.conv_transpose2d(torch_x, torch_w, stride=s, padding=p)
    expected = torch_y.detach().permute(0, 2, 3, 1).numpy()
    results = {}
    for impl in IMPLS:
        y, (dx, dkernel), cotangent = _value_and_grads(
            impl, jnp.asarray(x), jnp.asarray(kernel), s, p
        )
        assert y.shape == expected.shape == (2, *[(m - 1) * s - 2 * p + k for m in (n, n + 1)], 2)
        torch_x.grad = torch_w.grad = None
        torch_y.backward(
            torch.from_numpy(np.array(cotangent)).permute(0, 3, 1, 2), retain_graph=True
        )
        _assert_close(y, expected, what=(impl, "value"))
        _assert_close(dx, torch_x.grad.permute(0, 2, 3, 1), what=(impl, "d/dx"))
        _assert_close(dkernel, torch_w.grad.permute(2, 3, 0, 1), what=(impl, "d/dkernel"))
        results[impl] = (y, dx, dkernel)
    # The forms against each other (the same cotangent for all).
    for impl in ("subpixel", "lax_subpixel_grad"):
        for what, got, want in zip(("value", "d/dx", "d/dkernel"), results[impl], results["lax"]):
            _assert_close(got, want, what=(impl, what))


@pytest.mark.parametrize("n,k,s,p", [(5, 4, 2, 1), (3, 16, 8, 4), (2, 64, 32, 16)])
def test_impls_agree_in_float64(n, k, s, p):
    with jax.enable_x64(True):
        x, kernel = _inputs(n, k, dtype=np.float64)
        reference = _value_and_grads("lax", jnp.asarray(x), jnp.asarray(kernel), s, p)
        for impl in ("subpixel", "lax_subpixel_grad"):
            y, grads, _ = _value_and_grads(impl, jnp.asarray(x), jnp.asarray(kernel), s, p)
            assert y.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in grads)
            for got, want in zip([y, *grads], [reference[0], *reference[1]], strict=True):
                _assert_close(got, want, tolerance=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_give_bfloat16_values_and_gradients(impl):
    x, kernel = _inputs(4, 16, c_in=2)
    want, want_grads, _ = _value_and_grads("lax", jnp.asarray(x), jnp.asarray(kernel), 8, 4)
    x16, kernel16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    y, grads, _ = _value_and_grads(impl, x16, kernel16, 8, 4)
    assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for got, ref in zip([y, *grads], [want, *want_grads], strict=True):
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), atol=0.03 * scale)


def test_kernel_is_cast_to_the_input_dtype():
    x, kernel = _inputs(3, 4)
    for impl in IMPLS:
        y = layers.conv_transpose(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel), 2, 1, impl)
        assert y.dtype == jnp.bfloat16


def test_lax_impl_is_lax_conv_transpose_and_custom_derivative_uses_matmuls():
    x, kernel = _inputs(3, 16)
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    forward = jax.make_jaxpr(lambda x, w: layers.conv_transpose(x, w, 8, 4, "lax"))(x, kernel)
    (conv,) = [e for e in forward.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert conv.params["lhs_dilation"] == (8, 8) and conv.params["window_strides"] == (1, 1)
    subpixel = jax.make_jaxpr(lambda x, w: layers.conv_transpose(x, w, 8, 4, "subpixel"))
    assert "conv_general_dilated" not in str(subpixel(x, kernel))

    def loss(impl):
        return lambda x, w: jnp.sum(layers.conv_transpose(x, w, 8, 4, impl) ** 2)

    # XLA's own derivative: two more convolutions. The custom one: the lax forward only, the
    # derivatives as matmuls (dot_general).
    plain = jax.make_jaxpr(jax.grad(loss("lax"), argnums=(0, 1)))(x, kernel).jaxpr
    custom = jax.make_jaxpr(jax.grad(loss("lax_subpixel_grad"), argnums=(0, 1)))(x, kernel).jaxpr
    count = str(plain).count("conv_general_dilated"), str(custom).count("conv_general_dilated")
    assert count == (3, 1), count
    assert "dot_general" in str(custom) and "dot_general" not in str(plain)


def test_custom_derivative_supports_jit_jvp_vmap_and_second_order():
    x, kernel = _inputs(3, 4)
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    dx, dkernel = jnp.ones_like(x), jnp.full_like(kernel, 0.5)

    def run(impl):
        f = lambda x, w: layers.conv_transpose(x, w, 2, 1, impl)  # noqa: E731
        loss = lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
        return [
            jax.jit(f)(x, kernel),
            *jax.jvp(f, (x, kernel), (dx, dkernel)),
            jax.vmap(f, in_axes=(0, None))(x[:, None], kernel),
            # Only the kernel differentiated: the input's tangent is a symbolic zero.
            jax.jit(jax.grad(loss, argnums=1))(x, kernel),
            # Hessian-vector product (forward over reverse) and grad of grad.
            jax.jvp(jax.grad(loss), (x, kernel), (dx, dkernel))[1],
            jax.grad(lambda x, w: jnp.sum(jax.grad(loss)(x, w) ** 2), argnums=1)(x, kernel),
        ]

    for got, want in zip(run("lax_subpixel_grad"), run("lax"), strict=True):
        _assert_close(got, want)


def test_default_impl_per_backend():
    assert layers.default_conv_transpose_impl("cpu") == "subpixel"
    assert layers.default_conv_transpose_impl("gpu") == "lax"
    assert layers.default_conv_transpose_impl("tpu") == "lax"
    assert layers.default_conv_transpose_impl() == layers.default_conv_transpose_impl(
        jax.default_backend()
    )


def test_module_impl_keeps_parameters_and_result():
    x = jnp.asarray(_inputs(4, 4, c_in=3)[0])
    outputs, trees = [], []
    for impl in (None, *IMPLS):
        module = layers.ConvTransposeUpsample(
            5, 4, 2, 1, use_bias=True, bilinear_init=False, impl=impl
        )
        variables = module.init(jax.random.key(0), x)
        trees.append(jax.tree.map(lambda a: (a.shape, a.dtype), variables))
        outputs.append(np.asarray(module.apply(variables, x)))
    assert trees[0] == {
        "params": {"kernel": ((4, 4, 3, 5), jnp.float32), "bias": ((5,), jnp.float32)}
    }
    assert all(tree == trees[0] for tree in trees)
    for out in outputs[1:]:
        _assert_close(out, outputs[0])


def test_bad_impl_is_refused_with_the_choices():
    message = (
        "Unknown conv_transpose impl 'cudnn'; valid impls: None, 'lax', 'lax_subpixel_grad', "
        "'subpixel'."
    )
    x, kernel = jnp.zeros((1, 3, 3, 2)), jnp.zeros((4, 4, 2, 2))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        layers.conv_transpose(x, kernel, 2, 1, "cudnn")
    module = layers.ConvTransposeUpsample(2, 4, 2, 1, impl="cudnn")
    with pytest.raises(ValueError, match="^Unknown conv_transpose impl 'cudnn'"):
        module.init(jax.random.key(0), x)
