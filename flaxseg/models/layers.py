"""Building blocks shared by every flaxseg architecture, and the argument checks they share.

All arrays are NHWC. Modules keep their parameters in ``param_dtype`` (float32) and compute in
``dtype`` (e.g. bfloat16 on accelerators); geometry (padding, strides, transposed-convolution
sizes) follows PyTorch/Caffe conventions so that published weights and crop offsets carry over.
"""

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Array = jax.Array

# Collection through which models return auxiliary logits (see ``sow_aux_logits``).
AUX_COLLECTION = "aux"

# PyTorch's BatchNorm2d defaults (momentum 0.1 there updates with the *new* batch weight; flax's
# momentum is the weight of the *old* running value, hence 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Output strides every dilated backbone (and the models built on them) accepts.
OUTPUT_STRIDES = (8, 16, 32)


# Argument checks shared by every model and backbone, so that a bad argument gives the same one
# clear sentence everywhere: it names the value and, for a choice, lists the valid ones.


def check_choice(value: Any, valid: Sequence[Any], what: str, owner: str | None = None) -> None:
    """Refuse a name outside ``valid``, e.g. ``Unknown backbone 'vgg19' for SegNet; valid
    backbones: 'vgg16_bn'.`` ``what`` may be qualified ("DeepLab v3 head"); its last word names
    the list."""
    if value not in valid:
        where = f" for {owner}" if owner else ""
        raise ValueError(
            f"Unknown {what} {value!r}{where}; valid {what.split()[-1]}s: "
            f"{', '.join(map(repr, valid))}."
        )


def check_one_of(name: str, value: Any, valid: Sequence[Any]) -> None:
    """Refuse a setting outside ``valid``, e.g. ``output_stride must be one of 8, 16, 32, got
    4.``"""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}.")


def check_output_stride(output_stride: int) -> None:
    """The one error every dilated backbone and model gives for an unsupported output stride."""
    check_one_of("output_stride", output_stride, OUTPUT_STRIDES)


def check_at_least(name: str, value: int, minimum: int = 1) -> None:
    """Refuse a count below ``minimum``, e.g. ``num_classes must be at least 1, got 0.``"""
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}.")


def check_rate(name: str, value: float) -> None:
    """Refuse a rate (dropout) outside [0, 1), e.g. ``dropout_rate must be in [0, 1), got 1.5.``"""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def he_normal_fan_out(groups: int = 1) -> Callable:
    """torchvision's conv init (kaiming_normal_, mode='fan_out', relu) for from-scratch training:
    std √(2 / fan_out), fan_out = k·k·out_channels.

    ``groups`` > 1 (depthwise and grouped convs; pass the conv's ``feature_group_count``) divides
    fan_out by the group count, as timm's ``_init_weight_goog`` (``fix_group_fanout=True``) does
    for its EfficientNet/MobileNet depthwise convs: each output of a depthwise k×k conv reads
    k·k inputs, not k·k·channels. (torchvision's ``kaiming_normal_`` on a depthwise weight
    [C, 1, k, k] counts the full C·k·k; timm's is the He rule for the connections that exist.)
    """
    return nn.initializers.variance_scaling(2.0 * groups, "fan_out", "normal")


def he_normal_fan_in() -> Callable:
    """He-normal over the incoming connections: std √(2 / N), N = k·k·in_channels (the U-Net
    paper's rule, Ronneberger et al. 2015, Sec. 3: "N denotes the number of incoming nodes of
    one neuron", e.g. 9·64 = 576 for a 3×3 conv on 64 channels)."""
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal")


_BATCH_NORM_AXIS: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "batch_norm_axis", default=None
)


@contextlib.contextmanager
def synchronized_batch_norm(axis_name: Optional[str]):
    """Within this context every BatchNorm built by ``batch_norm`` and traced inside a
    ``jax.pmap(..., axis_name=axis_name)`` computes its batch statistics over the whole axis
    (SyncBN): the mean and mean square are averaged over the devices, so training normalises
    with the global batch's statistics, as a jitted step over a device mesh does. None: each
    device's own batch (flax's default)."""
    token = _BATCH_NORM_AXIS.set(axis_name)
    try:
        yield
    finally:
        _BATCH_NORM_AXIS.reset(token)


_BATCH_NORM_MOMENTUM: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar(
    "batch_norm_momentum", default=None
)


@contextlib.contextmanager
def batch_norm_momentum(momentum: Optional[float]):
    """Within this context every BatchNorm built by ``batch_norm`` keeps running statistics with
    ``momentum`` (flax's convention: the weight of the old value; TF's ``decay``), overriding
    each layer's own default (PyTorch's 0.9, a backbone flavour's). None changes nothing (an
    enclosing context's value stays). ``SegmentationModel.bn_momentum`` sets it around a
    model's call; it changes no variable, only how the running statistics move."""
    if momentum is None:
        yield
        return
    token = _BATCH_NORM_MOMENTUM.set(momentum)
    try:
        yield
    finally:
        _BATCH_NORM_MOMENTUM.reset(token)


def batch_norm(
    train: bool, dtype: Dtype, param_dtype: Dtype, epsilon: float = BN_EPSILON
) -> Callable[..., nn.BatchNorm]:
    """``nn.BatchNorm`` with PyTorch's momentum and (by default) epsilon, normalising with the
    batch's statistics when ``train`` and with the running ones otherwise; call it with a name
    (and optionally a layer's own ``momentum``). Inside ``synchronized_batch_norm(axis)`` the
    batch statistics span that pmap axis; inside ``batch_norm_momentum(m)`` every layer's
    momentum is ``m``."""
    settings = dict(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        axis_name=_BATCH_NORM_AXIS.get() if train else None,
    )
    momentum = _BATCH_NORM_MOMENTUM.get()
    if momentum is None:
        return functools.partial(nn.BatchNorm, **settings)
    return lambda **kwargs: nn.BatchNorm(**{**settings, **kwargs, "momentum": momentum})


# ``conv_by_taps`` switches from one XLA convolution to a sum of per-tap matmuls when at most
# this fraction of the kernel taps' multiply-adds read real (not padding) pixels. Measured on
# the 2-core CPU (batch 2, 2048 -> 256 channels, forward + both gradients): at 33x33, rate 12
# (fraction 0.58) the taps are 1.3x faster, at rates 24 / 36 (0.27 / 0.11) 5.7x / 33x; at
# 65x65 rate 12 (0.77) and 33x33 rate 4 (0.85) the single convolution is faster.
IN_BOUNDS_TAPS_MAX_FRACTION = 0.6
# False: ``conv_by_taps`` always calls ``lax.conv_general_dilated`` (read when a model is
# traced; for A/B measurements such as benchmarks/profile_cpu.py --ab).
CONV_BY_TAPS = True
_NHWC = ("NHWC", "HWIO", "NHWC")


def _tap_ranges(size: int, kernel: int, dilation: int, pad_low: int, pad_high: int):
    # Per tap: (first output, end output, first input) of the outputs whose input is real.
    out = size + pad_low + pad_high - dilation * (kernel - 1)
    ranges = []
    for tap in range(kernel):
        shift = tap * dilation - pad_low  # input index of output 0
        first, end = max(0, -shift), min(out, size - shift)
        ranges.append((first, end, first + shift) if first < end else None)
    return out, ranges


def in_bounds_fraction(shape: Sequence[int], kernel_shape: Sequence[int], dilation, padding):
    """Fraction of a stride-1 NHWC convolution's multiply-adds that read real input pixels
    (the rest read zero padding): ``shape`` [B, H, W, C], HWIO ``kernel_shape``, per-axis
    ``dilation`` and ``padding`` pairs."""
    fraction = 1.0
    for axis in range(2):
        out, ranges = _tap_ranges(
            shape[1 + axis], kernel_shape[axis], dilation[axis], *padding[axis]
        )
        used = sum(end - first for first, end, _ in filter(None, ranges))
        fraction *= used / max(1, kernel_shape[axis] * out)
    return fraction


def _conv_taps(lhs, rhs, padding, dilation, precision):
    # Stride-1 NHWC conv as the sum over taps of x[in-bounds window] @ kernel[tap], each padded
    # to the output; taps that read padding only are skipped.
    out_h, rows = _tap_ranges(lhs.shape[1], rhs.shape[0], dilation[0], *padding[0])
    out_w, cols = _tap_ranges(lhs.shape[2], rhs.shape[1], dilation[1], *padding[1])
    result = None
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            if row is None or col is None:
                continue
            (r0, r1, y0), (c0, c1, x0) = row, col
            window = lhs[:, y0 : y0 + r1 - r0, x0 : x0 + c1 - c0, :]
            part = jnp.einsum("bhwc,cd->bhwd", window, rhs[i, j], precision=precision)
            part = jnp.pad(part, ((0, 0), (r0, out_h - r1), (c0, out_w - c1), (0, 0)))
            result = part if result is None else result + part
    if result is None:  # every tap reads padding only
        return jnp.zeros((lhs.shape[0], out_h, out_w, rhs.shape[3]), lhs.dtype)
    return result


def conv_by_taps(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """``lax.conv_general_dilated`` (same signature and result) computed as matmuls where XLA's
    CPU convolution is slow; for ``nn.Conv(conv_general_dilated=conv_by_taps)``.

    On the CPU backend, for an ungrouped NHWC convolution:
      * a 1×1 kernel without padding (any stride) is ``x[:, ::s, ::s] @ kernel``: the same
        forward speed, and its kernel gradient is a plain matmul, 1.5–3× faster than XLA's
        convolution kernel gradient (ResNet bottlenecks are two-thirds 1×1 convs);
      * a stride-1 kernel whose taps mostly read zero padding (at most
        ``IN_BOUNDS_TAPS_MAX_FRACTION`` of the work is real, ``in_bounds_fraction``) is the sum
        over taps of ``x[in-bounds window] @ kernel[tap]``. DeepLab's ASPP (rates 12/24/36 on a
        33×33 map at output stride 8) is the case: at rate 36 every off-centre tap lies outside
        the map, and XLA computes those taps anyway (PyTorch's oneDNN skips part of them).
    The same sums in another order (float rounding differs by ~1e-6 relative). Every other
    convolution, every convolution on other backends, and every one when ``CONV_BY_TAPS`` is
    False goes to ``lax.conv_general_dilated``.
    """
    ndim = lhs.ndim
    dilation = tuple(rhs_dilation or (1,) * (ndim - 2))
    standard = (
        ndim == 4
        and not kwargs
        and feature_group_count == 1
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and dimension_numbers is not None
        and CONV_BY_TAPS
        and jax.default_backend() == "cpu"
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    )
    if standard:
        strides = tuple(window_strides)
        if isinstance(padding, str):  # 'SAME' / 'VALID' as explicit pairs
            reach = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
            padding = jax.lax.padtype_to_pads(lhs.shape[1:3], reach, strides, padding)
        padding = tuple(tuple(int(p) for p in pair) for pair in padding)
        if rhs.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
            window = lhs[:, :: strides[0], :: strides[1], :]
            y = jnp.einsum("bhwc,cd->bhwd", window, rhs[0, 0], precision=precision)
            return y.astype(jnp.result_type(lhs, rhs))
        if (
            strides == (1, 1)
            and in_bounds_fraction(lhs.shape, rhs.shape, dilation, padding)
            <= IN_BOUNDS_TAPS_MAX_FRACTION
        ):
            y = _conv_taps(lhs, rhs, padding, dilation, precision)
            return y.astype(jnp.result_type(lhs, rhs))
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )


def conv_without_bias(dtype: Dtype, param_dtype: Dtype) -> Callable[..., nn.Conv]:
    """``nn.Conv`` without bias and with torchvision's He (fan-out) init: the conv before a
    BatchNorm in ResNet and Xception; call it with features, kernel size, strides, name.
    1×1 convolutions and those that read mostly padding run as matmuls (``conv_by_taps``)."""
    return functools.partial(
        nn.Conv,
        use_bias=False,
        kernel_init=he_normal_fan_out(),
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv_by_taps,
    )


@functools.cache
def rematerialised(unit: type[nn.Module], remat: bool) -> type[nn.Module]:
    """``unit`` (a backbone's repeated unit, called as ``unit(...)(x, train)``) wrapped in flax's
    lifted ``nn.remat`` when ``remat`` is set, else ``unit`` itself.

    A rematerialised unit keeps only its input for the backward pass and recomputes its
    activations there: less device memory for one more forward pass per unit. The variables
    (names, tree, shapes) are the same either way, so checkpoints are interchangeable.
    ``train`` (argument 2, counting ``self``) is a Python bool: static.
    """
    return nn.remat(unit, static_argnums=(2,)) if remat else unit


class ConvBNAct(nn.Module):
    """Convolution, optional BatchNorm, optional activation: the unit most decoders repeat.

    Padding is symmetric, PyTorch-style: ``padding=None`` means ``dilation * (k - 1) // 2`` on
    every side (shape-preserving for stride 1 and odd k), an int pads that much on every side.
    The convolution has a bias only when there is no BatchNorm (unless ``use_bias`` says
    otherwise), because BN's shift makes it redundant.

    Shapes: [B, H, W, C_in] -> [B, H', W', features] with
    H' = floor((H + 2p - dilation·(k - 1) - 1) / stride) + 1.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None
    dilation: int = 1
    use_bn: bool = True
    activation: Callable[[Array], Array] | None = nn.relu
    use_bias: bool | None = None
    kernel_init: Callable = he_normal_fan_out()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        pad = self.dilation * (self.kernel_size - 1) // 2 if self.padding is None else self.padding
        use_bias = (not self.use_bn) if self.use_bias is None else self.use_bias
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=(self.dilation, self.dilation),
            use_bias=use_bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_general_dilated=conv_by_taps,
            name="conv",
        )(x)
        if self.use_bn:
            x = batch_norm(train, self.dtype, self.param_dtype)(name="bn")(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class SeparableConv(nn.Module):
    """Depthwise k×k conv (stride, dilation) → BN → [act] → pointwise 1×1 → BN → [act].

    [B, H, W, C] -> [B, H', W', features], H' = floor((H − 1) / stride) + 1 (padding =
    dilation·(k − 1) / 2, PyTorch-style symmetric). Children ``conv_dw``, ``bn_dw``, ``conv_pw``,
    ``bn_pw`` as in timm; the unit of Xception-65 (which sets TF's ``bn_epsilon`` 1e-3) and of
    DeepLab v3+'s separable ASPP and decoder.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    activation: Callable[[Array], Array] | None = None
    bn_epsilon: float = BN_EPSILON
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        norm = batch_norm(train, self.dtype, self.param_dtype, self.bn_epsilon)
        act = self.activation or (lambda y: y)
        k, s, d = self.kernel_size, self.stride, self.dilation
        pad = d * (k - 1) // 2
        channels = x.shape[-1]
        x = conv(
            channels,
            (k, k),
            strides=(s, s),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=(d, d),
            feature_group_count=channels,
            kernel_init=he_normal_fan_out(groups=channels),
            name="conv_dw",
        )(x)
        x = act(norm(name="bn_dw")(x))
        return act(norm(name="bn_pw")(conv(self.features, (1, 1), name="conv_pw")(x)))


def call_without_batch_stats_update(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call the bound submodule ``module`` with its ``'batch_stats'`` read but never written.

    In training its BatchNorms still normalise with the statistics of this batch; only the
    running averages keep the values they had. DeepLab v2's multi-scale inputs use it so that the
    shared backbone's statistics move once per step (from the full-scale pass), not once per
    scale. (``nn.map_variables`` lets the call mutate a view of the collection and writes
    nothing back.)
    """
    call = nn.map_variables(
        lambda mdl, *a, **k: mdl(*a, **k), "batch_stats", trans_out_fn=lambda _: {}, mutable=True
    )
    return call(module, *args, **kwargs)


# PyTorch state-dict key maps: {flax variable path, collection first: torch key}. Conv kernels
# are OIHW there (converted by ``flaxseg.weights``), BatchNorm's scale/bias/mean/var are
# weight/bias/running_mean/running_var, and ``num_batches_tracked`` has no counterpart.
KeyMap = dict[tuple[str, ...], str]


def conv_key_map(flax_path: Sequence[str], torch_name: str, bias: bool = False) -> KeyMap:
    """Entries of a conv (or Linear) at ``flax_path`` for torch module ``torch_name``."""
    key_map = {("params", *flax_path, "kernel"): f"{torch_name}.weight"}
    if bias:
        key_map[("params", *flax_path, "bias")] = f"{torch_name}.bias"
    return key_map


def batchnorm_key_map(flax_path: Sequence[str], torch_name: str) -> KeyMap:
    """Entries of a flax ``BatchNorm`` at ``flax_path`` for a torch ``BatchNorm2d``."""
    return {
        ("params", *flax_path, "scale"): f"{torch_name}.weight",
        ("params", *flax_path, "bias"): f"{torch_name}.bias",
        ("batch_stats", *flax_path, "mean"): f"{torch_name}.running_mean",
        ("batch_stats", *flax_path, "var"): f"{torch_name}.running_var",
    }


def conv_bn_key_map(flax_prefix: Sequence[str], torch_conv: str, torch_bn: str) -> KeyMap:
    """Entries of a ``ConvBNAct`` at ``flax_prefix`` (torch Conv2d without bias + BatchNorm2d)."""
    return {
        **conv_key_map((*flax_prefix, "conv"), torch_conv),
        **batchnorm_key_map((*flax_prefix, "bn"), torch_bn),
    }


def prefix_key_map(key_map: KeyMap, flax_prefix: Sequence[str], torch_prefix: str = "") -> KeyMap:
    """``key_map`` of a submodule, moved under module path ``flax_prefix`` and torch key prefix
    ``torch_prefix`` (e.g. a backbone's map inside a model: ``('backbone',)``, ``'backbone.'``)."""
    return {
        (collection, *flax_prefix, *rest): torch_prefix + key
        for (collection, *rest), key in key_map.items()
    }


def pool_output_size(
    size: int, window: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> int:
    """Output size of a pooling window over ``size`` pixels, as PyTorch and Caffe compute it.

    floor((n + 2p − k) / s) + 1, or with ``ceil_mode`` (Caffe's only mode) ceil(...) + 1 less
    one when the last window would start in the right padding (both frameworks' rule).
    """
    span = size + 2 * padding - window
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and padding and (out - 1) * stride >= size + padding:
        out -= 1
    if size < 1 or out < 1:
        raise ValueError(
            f"A {window}x{window} pool with stride {stride} and padding {padding} cannot pool a "
            f"dimension of size {size}."
        )
    return out


def _pool_padding(
    x: Array, window: int, stride: int, padding: int, ceil_mode: bool
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    # (padding per spatial axis, output size): padding on the left, and on the right as far as
    # the last window reaches (a ceil-mode window may hang over the padded edge).
    pads, sizes = [], []
    for n in x.shape[1:3]:
        out = pool_output_size(n, window, stride, padding, ceil_mode)
        pads.append((padding, max(0, (out - 1) * stride + window - n - padding)))
        sizes.append(out)
    return pads, tuple(sizes)


def max_pool(
    x: Array, window: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> Array:
    """Max pooling of [B, H, W, C] with PyTorch ``MaxPool2d`` / Caffe ``MAX`` semantics.

    Output sizes follow ``pool_output_size``; padding and a ceil-mode overhang never win (they
    are -inf), so every window takes the maximum of its real pixels. ``ceil_mode=True`` is
    Caffe's pooling, which FCN's crop offsets and DeepLab's 3×3/2 pools assume.
    """
    pads, (out_h, out_w) = _pool_padding(x, window, stride, padding, ceil_mode)
    # reduce_window pads with max's identity, -inf.
    y = nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)
    return y[:, :out_h, :out_w, :]


def avg_pool(
    x: Array, window: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> Array:
    """Average pooling of [B, H, W, C] with Caffe ``AVE`` semantics.

    Caffe (and PyTorch's ``AvgPool2d(count_include_pad=True)``) sums the real pixels of a
    window and divides by the window clipped to the *padded* extent [−p, n + p): zero padding
    counts, the part of a ceil-mode window hanging beyond the padding does not. (DeepLab-LargeFOV's
    ``pool5a``, 3×3 stride 1 pad 1, thus always divides by 9.)
    """
    pads, (out_h, out_w) = _pool_padding(x, window, stride, padding, ceil_mode)
    # A Python-scalar init makes this lax's reduce_window_sum, which has a gradient (a traced
    # init array gives the generic reduce_window, which has none).
    sums = jax.lax.reduce_window(
        x,
        0.0,
        jax.lax.add,
        (1, window, window, 1),
        (1, stride, stride, 1),
        ((0, 0), *pads, (0, 0)),
    )[:, :out_h, :out_w, :]

    def counts(size: int, out: int) -> np.ndarray:
        starts = np.arange(out) * stride - padding
        return np.minimum(starts + window, size + padding) - starts

    divisor = np.outer(counts(x.shape[1], out_h), counts(x.shape[2], out_w))
    return sums / jnp.asarray(divisor[None, :, :, None], x.dtype)


def resize_bilinear(x: Array, size: Sequence[int]) -> Array:
    """Bilinear resize of [B, H, W, C] to [B, size[0], size[1], C].

    Matches PyTorch ``F.interpolate(mode='bilinear', align_corners=False)`` (half-pixel centres,
    no antialiasing) for both up- and down-sampling; the dtype is preserved.
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize_bilinear needs a positive target size, got {tuple(size)}.")
    if x.shape[1:3] == (h, w):
        return x
    return jax.image.resize(
        x, (x.shape[0], h, w, x.shape[3]), method="bilinear", antialias=False
    ).astype(x.dtype)


def _bilinear_weights_1d(kernel_size: int) -> np.ndarray:
    # FCN's surgery.upsample_filt: a triangle of half-width `factor` centred on the kernel.
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    return 1.0 - np.abs(np.arange(kernel_size) - center) / factor


def bilinear_kernel(kernel_size: int, channels: int) -> np.ndarray:
    """FCN's bilinear upsampling filter as an HWIO kernel [k, k, channels, channels] (float32).

    Diagonal in channels (channel c feeds only channel c), separable, triangle-shaped with
    half-width ``factor = (k + 1) // 2``. With stride ``factor`` a transposed convolution with
    this kernel performs bilinear interpolation away from the borders (see
    ``ConvTransposeUpsample``).
    """
    if kernel_size < 1 or channels < 1:
        raise ValueError(
            f"bilinear_kernel needs kernel_size >= 1 and channels >= 1, got {kernel_size} and "
            f"{channels}."
        )
    w = _bilinear_weights_1d(kernel_size)
    kernel = np.zeros((kernel_size, kernel_size, channels, channels), np.float32)
    kernel[:, :, np.arange(channels), np.arange(channels)] = np.outer(w, w)[:, :, None]
    return kernel


def _bilinear_init(key, shape, dtype=jnp.float32):
    del key  # deterministic
    k_h, k_w, c_in, c_out = shape
    assert k_h == k_w and c_in == c_out, shape
    return jnp.asarray(bilinear_kernel(k_h, c_in), dtype)


def transposed_conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Spatial output size of a (PyTorch/Caffe) transposed convolution: (n − 1)·s − 2p + k."""
    out = (size - 1) * stride - 2 * padding + kernel_size
    if size < 1 or out < 1:
        raise ValueError(
            f"Transposed convolution with kernel {kernel_size}, stride {stride}, padding "
            f"{padding} on size {size} gives a non-positive output size {out}."
        )
    return out


# Implementations of ``conv_transpose`` (its ``impl`` argument); None picks
# ``default_conv_transpose_impl()``.
CONV_TRANSPOSE_IMPLS = ("lax", "lax_subpixel_grad", "subpixel")


def default_conv_transpose_impl(backend: str | None = None) -> str:
    """The transposed-convolution implementation ``impl=None`` uses on ``backend`` (default:
    ``jax.default_backend()``): ``'subpixel'`` on CPU, ``'lax'`` elsewhere.

    On XLA:CPU (2 cores, FCN-8s/32s layers at 500 px, batch 8; ``benchmarks/conv_transpose.py``)
    the sub-pixel form ran 2–26× faster than ``jax.lax.conv_transpose`` forward and 10–25×
    forward+backward: XLA:CPU computes the transposed convolution densely over the zero-dilated
    input (15 s for FCN-32s's 64×64 stride-32 layer) and its kernel gradient is slower still.
    GPU and TPU get ``jax.lax.conv_transpose``, their native transposed convolution (not yet
    measured against the sub-pixel form there).
    """
    backend = jax.default_backend() if backend is None else backend
    return "subpixel" if backend == "cpu" else "lax"


def _conv_transpose_lax(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    # PyTorch geometry: with ``transpose_kernel`` the kernel is read as the HWOI kernel of the
    # forward convolution this one transposes (flipped, in/out swapped), and with
    # ``use_consistent_padding`` ``padding`` is that forward convolution's padding p, so the
    # dilated input is padded by k − 1 − p on each side: output (n − 1)·s − 2p + k.
    return jax.lax.conv_transpose(
        x,
        kernel,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWOI", "NHWC"),
        transpose_kernel=True,
        use_consistent_padding=True,
    )


def _conv_transpose_subpixel(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    # Output pixel q·s + r − p only sees the M = ceil(k / s) inputs q, q − 1, ..., q − M + 1,
    # through kernel taps r, r + s, ..., so one M×M correlation with s²·C_out outputs followed
    # by depth-to-space gives the result.
    k, _, c_in, c_out = kernel.shape
    s, p = stride, padding
    taps = -(-k // s)
    kernel = jnp.pad(kernel, ((0, taps * s - k), (0, taps * s - k), (0, 0), (0, 0)))
    # [m_y, r_y, m_x, r_x, C_in, C_out]; correlation visits inputs q − M + 1 .. q, hence the flip
    # of the tap axes m.
    kernel = kernel.reshape(taps, s, taps, s, c_in, c_out)[::-1, :, ::-1]
    kernel = kernel.transpose(0, 2, 4, 1, 3, 5).reshape(taps, taps, c_in, s * s * c_out)
    # The M×M correlation as an explicit patch matrix times the kernel: XLA's CPU convolution
    # is fast forward but its kernel gradient for s²·C_out (up to 21,504) output channels is
    # ~30× slower than the same product as a matmul.
    batch, height, width, _ = x.shape
    q_h, q_w = height + taps - 1, width + taps - 1
    padded = jnp.pad(x, ((0, 0), (taps - 1, taps - 1), (taps - 1, taps - 1), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i : i + q_h, j : j + q_w, :] for i in range(taps) for j in range(taps)], axis=-1
    )
    y = patches @ kernel.reshape(taps * taps * c_in, s * s * c_out)
    y = y.reshape(batch, q_h, q_w, s, s, c_out).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(batch, q_h * s, q_w * s, c_out)
    out_h = transposed_conv_output_size(x.shape[1], k, s, p)
    out_w = transposed_conv_output_size(x.shape[2], k, s, p)
    return y[:, p : p + out_h, p : p + out_w, :]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_transpose_lax_subpixel_grad(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    return _conv_transpose_lax(x, kernel, stride, padding)


@functools.partial(_conv_transpose_lax_subpixel_grad.defjvp, symbolic_zeros=True)
def _conv_transpose_lax_subpixel_grad_jvp(stride, padding, primals, tangents):
    # The output is bilinear in (x, kernel), so its tangent is f(dx, kernel) + f(x, dkernel);
    # computing both terms in the sub-pixel form makes reverse mode (which transposes this
    # linear map) use the matmul gradients instead of XLA's convolution gradients.
    x, kernel = primals
    dx, dkernel = tangents
    y = _conv_transpose_lax(x, kernel, stride, padding)
    terms = []
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        terms.append(_conv_transpose_subpixel(dx, kernel, stride, padding))
    if not isinstance(dkernel, jax.custom_derivatives.SymbolicZero):
        terms.append(_conv_transpose_subpixel(x, dkernel, stride, padding))
    return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)


_CONV_TRANSPOSE_FNS = {
    "lax": _conv_transpose_lax,
    "lax_subpixel_grad": _conv_transpose_lax_subpixel_grad,
    "subpixel": _conv_transpose_subpixel,
}


def conv_transpose(
    x: Array, kernel: Array, stride: int, padding: int, impl: str | None = None
) -> Array:
    """Transposed convolution of [B, H, W, C_in] by an HWIO kernel [k, k, C_in, C_out].

    PyTorch ``ConvTranspose2d`` semantics: input pixel i adds ``kernel[ky] · x[i]`` to output
    pixel ``i·stride − padding + ky``; output size (n − 1)·s − 2p + k. The kernel is cast to
    ``x.dtype``. ``impl`` chooses how it is computed (the results agree to float rounding):

    - ``'lax'``: ``jax.lax.conv_transpose``, differentiated by XLA.
    - ``'subpixel'``: output pixel q·s + r − p sees only inputs q − M + 1 .. q (M = ceil(k/s))
      through kernel taps r, r + s, ..., so one patch matrix [B·H'·W', M²·C_in] times the
      kernel rearranged to [M²·C_in, s²·C_out], then depth-to-space. The textbook form
      (correlating the s-fold zero-dilated input with the full kernel) does k²/M² times the
      multiplies, nearly all by zeros.
    - ``'lax_subpixel_grad'``: ``jax.lax.conv_transpose`` forward; derivatives (a
      ``jax.custom_jvp``, so ``jax.grad``, ``jax.jvp``, ``jax.vmap``, ``jax.jit`` and
      higher-order derivatives all work) in the sub-pixel form.
    - ``None``: ``default_conv_transpose_impl()`` — ``'subpixel'`` on CPU, ``'lax'`` on GPU/TPU.
    """
    check_choice(impl, (None, *CONV_TRANSPOSE_IMPLS), "conv_transpose impl")
    if padding < 0:
        raise ValueError(f"Transposed convolution padding must be non-negative, got {padding}.")
    impl = default_conv_transpose_impl() if impl is None else impl
    return _CONV_TRANSPOSE_FNS[impl](x, kernel.astype(x.dtype), stride, padding)


class ConvTransposeUpsample(nn.Module):
    """Learnable upsampling by a transposed convolution with PyTorch ``ConvTranspose2d`` semantics.

    Input pixel i scatters ``kernel[ky]`` onto output pixel ``i·stride − padding + ky``, so
    output size = (n − 1)·s − 2p + k (``transposed_conv_output_size``). The kernel is stored
    HWIO [k, k, C_in, features]; a torch weight [C_in, C_out, kH, kW] converts with
    ``w.transpose(2, 3, 0, 1)``.

    ``bilinear_init=True`` (FCN, Long et al. 2015) starts from ``bilinear_kernel`` (needs
    C_in == features): with k = 2f, stride f, padding f/2 this equals
    ``F.interpolate(scale_factor=f, align_corners=False)`` away from the borders. FCN uses no
    bias. Freezing the kernel (the reference Caffe nets use lr_mult 0) is the optimizer's job.

    ``impl`` is ``conv_transpose``'s: ``'lax'`` (``jax.lax.conv_transpose``), ``'subpixel'``,
    ``'lax_subpixel_grad'``, or None for the backend's default (``'subpixel'`` on CPU, ``'lax'``
    elsewhere); it changes the speed, not the parameters or (beyond float rounding) the result.
    """

    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    use_bias: bool = False
    bilinear_init: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        c_in = x.shape[-1]
        if self.bilinear_init and c_in != self.features:
            raise ValueError(
                f"A bilinear-initialised transposed convolution maps each channel to itself, so "
                f"it needs as many input channels as features, got {c_in} and {self.features}."
            )
        init = _bilinear_init if self.bilinear_init else nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, (k, k, c_in, self.features), self.param_dtype)
        y = conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), s, p, self.impl)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def crop_to(x: Array, offset_h: int, offset_w: int, height: int, width: int) -> Array:
    """Caffe ``Crop`` layer: the [height, width] window of [B, H, W, C] starting at the offsets."""
    in_h, in_w = x.shape[1], x.shape[2]
    if (
        offset_h < 0
        or offset_w < 0
        or offset_h + height > in_h
        or offset_w + width > in_w
        or height < 1
        or width < 1
    ):
        raise ValueError(
            f"Crop window {height}x{width} at offset ({offset_h}, {offset_w}) does not fit in a "
            f"{in_h}x{in_w} feature map."
        )
    return x[:, offset_h : offset_h + height, offset_w : offset_w + width, :]


def center_crop(x: Array, height: int, width: int) -> Array:
    """Crop [B, H, W, C] to its central [height, width] window (extra pixel goes bottom/right)."""
    return crop_to(x, (x.shape[1] - height) // 2, (x.shape[2] - width) // 2, height, width)


def _keep_latest(previous, value):
    del previous
    return value


_SCORE_MAPS: contextvars.ContextVar[bool] = contextvars.ContextVar("score_maps", default=False)


@contextlib.contextmanager
def score_map_outputs():
    """Within this context a model returns (and sows as auxiliary logits) its score maps at the
    resolution its head computes them, skipping the final bilinear resize to the input's size
    (``SegmentationModel.finish``, ``sow_aux_logits``): e.g. DeepLab v1/v2's stride-8 maps, 41×41
    for a 321×321 input. For losses taken at the score map's resolution as Caffe's DeepLab
    does (``flaxseg.training.steps``, ``--config.loss_resolution=score_map``); it changes no
    variable. Models whose logits are already at the input's size return them unchanged."""
    token = _SCORE_MAPS.set(True)
    try:
        yield
    finally:
        _SCORE_MAPS.reset(token)


def returns_score_maps() -> bool:
    """True inside ``score_map_outputs()``."""
    return _SCORE_MAPS.get()


def sow_aux_logits(module: nn.Module, name: str, logits: Array, size: Sequence[int]) -> None:
    """Return auxiliary logits from ``module`` through the ``AUX_COLLECTION`` collection.

    The logits are resized to ``size`` (the input's H, W) and cast to float32, so the training
    loop can score them exactly like the main output. They are only kept when the caller applies
    with ``mutable=[..., 'aux']`` (``init`` keeps them too: drop the collection from initialised
    variables). The entry ``aux[<module path>][name]`` is the array itself, overwritten rather
    than appended to, so a stale 'aux' collection passed back in cannot double-count.
    Inside ``score_map_outputs()`` they keep their own resolution.
    """
    if not returns_score_maps():
        logits = resize_bilinear(logits, size)
    module.sow(
        AUX_COLLECTION,
        name,
        logits.astype(jnp.float32),
        init_fn=lambda: None,
        reduce_fn=_keep_latest,
    )
