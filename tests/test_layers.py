"""Shared layers: geometry and numerics against PyTorch and analytic references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flaxseg.models import layers


def _to_torch(x_nhwc):
    return torch.from_numpy(np.asarray(x_nhwc, np.float32)).permute(0, 3, 1, 2)


def _from_torch(x_nchw):
    return x_nchw.detach().permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- transposed conv


@pytest.mark.parametrize(
    "size,k,s,p",
    [
        (5, 4, 2, 0),
        (5, 4, 2, 1),
        (7, 64, 32, 0),
        (3, 16, 8, 4),
        (6, 3, 2, 0),
        (4, 5, 3, 2),
        (1, 63, 32, 0),
    ],
)
def test_transposed_conv_output_size_formula_matches_module(size, k, s, p):
    expected = (size - 1) * s - 2 * p + k
    assert layers.transposed_conv_output_size(size, k, s, p) == expected
    module = layers.ConvTransposeUpsample(2, k, s, p)
    x = jax.ShapeDtypeStruct((1, size, size + 1, 2), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    out = jax.eval_shape(module.apply, variables, x)
    assert out.shape == (1, expected, layers.transposed_conv_output_size(size + 1, k, s, p), 2)


def test_transposed_conv_output_size_rejects_empty_output():
    with pytest.raises(ValueError, match="non-positive"):
        layers.transposed_conv_output_size(1, 2, 2, 1)


@pytest.mark.parametrize("k,s,p", [(4, 2, 1), (3, 2, 0), (16, 8, 4), (5, 3, 2), (2, 2, 0)])
@pytest.mark.parametrize("use_bias", [False, True])
def test_conv_transpose_matches_torch(k, s, p, use_bias):
    rng = np.random.default_rng(k * 100 + s * 10 + p + use_bias)
    c_in, c_out = 3, 5
    x = rng.normal(size=(2, 6, 7, c_in)).astype(np.float32)
    torch_layer = torch.nn.ConvTranspose2d(c_in, c_out, k, stride=s, padding=p, bias=use_bias)
    with torch.no_grad():
        torch_layer.weight.normal_()
        if use_bias:
            torch_layer.bias.normal_()
        expected = _from_torch(torch_layer(_to_torch(x)))

    params = {"kernel": torch_layer.weight.detach().numpy().transpose(2, 3, 0, 1)}
    if use_bias:
        params["bias"] = torch_layer.bias.detach().numpy()
    module = layers.ConvTransposeUpsample(c_out, k, s, p, use_bias=use_bias, bilinear_init=False)
    out = module.apply({"params": params}, jnp.asarray(x))
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def test_bilinear_kernel_values_and_channel_diagonal():
    kernel = layers.bilinear_kernel(4, 3)
    assert kernel.shape == (4, 4, 3, 3) and kernel.dtype == np.float32
    w = np.array([0.25, 0.75, 0.75, 0.25])  # factor 2, centre 1.5
    for c in range(3):
        np.testing.assert_allclose(kernel[:, :, c, c], np.outer(w, w))
    off_diagonal = kernel * (1 - np.eye(3))[None, None]
    assert not off_diagonal.any()
    # Odd size: factor 2, centre 1 -> triangle [0.5, 1, 0.5].
    np.testing.assert_allclose(layers.bilinear_kernel(3, 1)[:, 1, 0, 0], [0.5, 1.0, 0.5])


def _bilinear_upsample(x, k, s, p):
    module = layers.ConvTransposeUpsample(x.shape[-1], k, s, p)
    return np.asarray(module.apply(module.init(jax.random.key(0), x), x))


@pytest.mark.parametrize("factor", [2, 4])
def test_bilinear_transposed_conv_equals_half_pixel_interpolation_in_the_interior(factor):
    # Kernel 2f, stride f, padding f/2: input pixel i lands at output coordinate
    # i·f + (f − 1)/2, the half-pixel-centre geometry of align_corners=False. The borders
    # differ (the transposed conv sees zeros beyond the edge, interpolate clamps).
    rng = np.random.default_rng(factor)
    x = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)
    out = _bilinear_upsample(jnp.asarray(x), 2 * factor, factor, factor // 2)
    expected = _from_torch(
        F.interpolate(_to_torch(x), scale_factor=factor, mode="bilinear", align_corners=False)
    )
    assert out.shape == expected.shape
    inner = slice(factor, -factor)
    np.testing.assert_allclose(out[:, inner, inner], expected[:, inner, inner], atol=1e-5)
    assert np.abs(out[:, 0] - expected[:, 0]).max() > 1e-2  # the border really differs


@pytest.mark.parametrize("factor", [2, 3])
def test_odd_bilinear_kernel_equals_align_corners_interpolation(factor):
    # Kernel 2f − 1, stride f, padding f − 1: input pixel i lands exactly on output i·f, so the
    # output is align_corners=True interpolation to (n − 1)·f + 1 everywhere, borders included.
    rng = np.random.default_rng(10 + factor)
    x = rng.normal(size=(1, 4, 5, 2)).astype(np.float32)
    out = _bilinear_upsample(jnp.asarray(x), 2 * factor - 1, factor, factor - 1)
    size = (3 * factor + 1, 4 * factor + 1)
    expected = _from_torch(
        F.interpolate(_to_torch(x), size=size, mode="bilinear", align_corners=True)
    )
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_fcn_32x_upsampling_of_a_ramp_is_linear_interpolation():
    # FCN-32s geometry (kernel 64, stride 32, no padding): sample i sits at output 32·i + 31.5,
    # so a linear ramp in the input comes out as the analytic ramp between the first and last
    # sample.
    n_h, n_w = 4, 3
    ii, jj = np.meshgrid(np.arange(n_h), np.arange(n_w), indexing="ij")
    x = (2.0 * ii - 3.0 * jj + 1.0).astype(np.float32)[None, :, :, None]
    out = _bilinear_upsample(jnp.asarray(x), 64, 32, 0)[0, :, :, 0]
    y, xx = np.meshgrid(np.arange(out.shape[0]), np.arange(out.shape[1]), indexing="ij")
    analytic = 2.0 * (y - 31.5) / 32 - 3.0 * (xx - 31.5) / 32 + 1.0
    inner_h = slice(32, 32 * (n_h - 1) + 32)
    inner_w = slice(32, 32 * (n_w - 1) + 32)
    np.testing.assert_allclose(out[inner_h, inner_w], analytic[inner_h, inner_w], atol=1e-4)


def test_bilinear_init_needs_matching_channels():
    module = layers.ConvTransposeUpsample(4, 4, 2)
    with pytest.raises(ValueError, match="3 and 4"):
        module.init(jax.random.key(0), jnp.zeros((1, 3, 3, 3)))


# ----------------------------------------------------------------------------- resize / crop


@pytest.mark.parametrize(
    "src,dst", [((7, 9), (19, 23)), ((19, 23), (7, 5)), ((5, 8), (10, 16)), ((12, 5), (6, 11))]
)
def test_resize_bilinear_matches_torch_interpolate(src, dst):
    rng = np.random.default_rng(sum(src) + sum(dst))
    x = rng.normal(size=(2, *src, 3)).astype(np.float32)
    out = layers.resize_bilinear(jnp.asarray(x), dst)
    expected = _from_torch(
        F.interpolate(_to_torch(x), size=dst, mode="bilinear", align_corners=False)
    )
    assert out.shape == (2, *dst, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_resize_bilinear_keeps_dtype_and_rejects_empty_size():
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    assert layers.resize_bilinear(x, (8, 6)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"\(0, 3\)"):
        layers.resize_bilinear(x, (0, 3))


def test_crop_to_and_center_crop():
    x = jnp.arange(2 * 6 * 7 * 1).reshape(2, 6, 7, 1)
    np.testing.assert_array_equal(layers.crop_to(x, 1, 2, 3, 4), np.asarray(x)[:, 1:4, 2:6])
    np.testing.assert_array_equal(layers.center_crop(x, 3, 4), np.asarray(x)[:, 1:4, 1:5])
    with pytest.raises(ValueError, match="does not fit in a 6x7"):
        layers.crop_to(x, 4, 0, 3, 7)


# ----------------------------------------------------------------------------- conv blocks

# (window, stride, padding): torchvision's/FCN's 2×2, AlexNet's 3×3/2, DeepLab's 3×3/2 pad 1 and
# 3×3/1 pad 1, and a window whose ceil-mode overhang goes past the padding (3×3/3 pad 1).
POOLS = [(2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 1, 1), (3, 3, 1)]


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("window,stride,padding", POOLS)
def test_max_pool_matches_torch(window, stride, padding, ceil_mode):
    x = np.random.default_rng(window).normal(size=(1, 9, 12, 2)).astype(np.float32) - 3.0
    out = layers.max_pool(jnp.asarray(x), window, stride, padding, ceil_mode)
    expected = _from_torch(F.max_pool2d(_to_torch(x), window, stride, padding, ceil_mode=ceil_mode))
    assert out.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("window,stride,padding", POOLS)
@pytest.mark.parametrize("height,width", [(9, 12), (8, 13)])
def test_avg_pool_matches_caffe_ave_pooling(window, stride, padding, ceil_mode, height, width):
    # Caffe's AVE pooling: sum of the real pixels / the window clipped to [−p, n + p), which is
    # PyTorch's count_include_pad=True (its ceil mode clips the overhang the same way).
    x = np.random.default_rng(height).normal(size=(2, height, width, 3)).astype(np.float32)
    out = layers.avg_pool(jnp.asarray(x), window, stride, padding, ceil_mode)
    expected = _from_torch(
        F.avg_pool2d(
            _to_torch(x), window, stride, padding, ceil_mode=ceil_mode, count_include_pad=True
        )
    )
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)


def test_caffe_pool_output_size_rule():
    # Caffe's ceil((n + 2p − k) / s) + 1, less one where the last window would start in the
    # padding: 513 -> 257 -> 129 -> 65 for DeepLab's 3×3/2 pad 1 pools.
    sizes = [513]
    for _ in range(3):
        sizes.append(layers.pool_output_size(sizes[-1], 3, 2, 1, ceil_mode=True))
    assert sizes == [513, 257, 129, 65]
    assert layers.pool_output_size(4, 3, 3, 1, ceil_mode=True) == 2  # ceil gives 3: dropped
    with pytest.raises(ValueError, match="cannot pool a dimension of size 1"):
        layers.pool_output_size(1, 2, 2)


def test_conv_bn_act_matches_torch_in_eval_and_updates_running_mean_like_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 11, 10, 3)).astype(np.float32)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, bias=False)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    variables = {
        "params": {
            "conv": {"kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0)},
            "bn": {"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()},
        },
        "batch_stats": {
            "bn": {"mean": bn.running_mean.numpy().copy(), "var": bn.running_var.numpy().copy()}
        },
    }
    module = layers.ConvBNAct(4, kernel_size=3, stride=2, dilation=2)
    out = module.apply(variables, jnp.asarray(x), train=False)
    bn.eval()
    expected = _from_torch(F.relu(bn(conv(_to_torch(x)))))
    assert out.shape == expected.shape == (2, 6, 5, 4)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)

    _, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    bn.train()
    with torch.no_grad():
        bn(conv(_to_torch(x)))
    # torch's momentum 0.1 == flax's 0.9. (The running *variance* differs by torch's n/(n−1)
    # unbiasing, so only the mean is compared.)
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["bn"]["mean"]), bn.running_mean.numpy(), atol=1e-5
    )


def test_conv_bn_act_without_bn_has_bias_and_no_batch_stats():
    module = layers.ConvBNAct(6, kernel_size=1, use_bn=False, activation=None)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 5, 5, 2)))
    assert set(variables) == {"params"}
    assert set(variables["params"]["conv"]) == {"kernel", "bias"}


# ----------------------------------------------------------------------------- aux mechanism


class _TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
        small = nn.Conv(
            3, (2, 2), strides=(2, 2), dtype=jnp.bfloat16, kernel_init=nn.initializers.ones
        )(x)
        layers.sow_aux_logits(self, "stage3", small, x.shape[1:3])
        return x


def test_sow_aux_logits_returns_float32_logits_at_input_size_only_when_mutable():
    module = _TwoHeads()
    x = jnp.ones((2, 8, 6, 1))
    variables = module.init(jax.random.key(0), x)
    _, state = module.apply(variables, x, mutable=[layers.AUX_COLLECTION])
    aux = state[layers.AUX_COLLECTION]["stage3"]
    # One array, even though `variables` already held an 'aux' entry from init.
    assert isinstance(aux, jax.Array)
    assert aux.shape == (2, 8, 6, 3) and aux.dtype == jnp.float32
    params_only = {"params": variables["params"]}
    assert isinstance(module.apply(params_only, x), jax.Array)  # not mutable: plain output


class _SharedBN(nn.Module):
    @nn.compact
    def __call__(self, x, y):
        block = layers.ConvBNAct(3, 1, activation=None)
        return block(x, train=True), layers.call_without_batch_stats_update(block, y, train=True)


def test_call_without_batch_stats_update_normalises_by_batch_but_keeps_running_stats():
    module = _SharedBN()
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.normal(size=(2, 5, 4, 2)) + 3.0, jnp.float32) for _ in range(2))
    variables = module.init(jax.random.key(0), x, y)
    (_, out_y), state = module.apply(variables, x, y, mutable=["batch_stats"])
    # The running mean moved once, by x's batch alone (momentum 0.9 from 0).
    kernel = variables["params"]["ConvBNAct_0"]["conv"]["kernel"][0, 0]
    np.testing.assert_allclose(
        state["batch_stats"]["ConvBNAct_0"]["bn"]["mean"],
        0.1 * np.mean(np.asarray(x) @ np.asarray(kernel), axis=(0, 1, 2)),
        rtol=1e-5,
    )
    # y was normalised with its own batch statistics (zero mean per channel) ...
    np.testing.assert_allclose(np.mean(np.asarray(out_y), axis=(0, 1, 2)), 0.0, atol=1e-5)
    # ... and the parameters it used get gradients.
    grads = jax.grad(
        lambda p: jnp.sum(
            module.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                y,
                mutable=["batch_stats"],
            )[0][1]
            ** 3
        )
    )(variables["params"])
    assert np.abs(np.asarray(grads["ConvBNAct_0"]["conv"]["kernel"])).max() > 0
