"""Adversaries of Luc, Couprie, Chintala & Verbeek, "Semantic Segmentation using Adversarial
Networks" (NIPS 2016 workshop on adversarial training, arXiv:1611.08408), and their inputs.

An adversary a(x, y) sees an image x and a C-channel label map y and tells ground-truth maps
(real) from the segmenter's softmax s(x) (fake). Not a segmentation model, so not in the
``flaxseg.models`` registry; ``flaxseg.training.adversarial`` imports it directly.

    encoded = real_input(image, labels, probs, encoding='scaling', num_classes=21)
    adversary = create_adversary('largefov', encoding='scaling', num_classes=21)
    params = adversary.init(rng, image, encoded)['params']
    logits = adversary.apply({'params': params}, image, encoded)   # [B] float32, > 0: real

Input encodings (section 3.2 of the paper), [B, H, W, D] float32, D = ``input_channels``:
  - 'basic': the map itself, one-hot(y) for real and s(x) for fake (D = C).
  - 'product': the image masked by the map: channel k·C + c is image channel k times class map
    c (D = 3·C; k-major, all classes of the first image channel first).
  - 'scaling': real is the ground truth softened towards the prediction so that exact 0/1 values
    give nothing away: at a pixel of label l, ȳ_l = max(τ, s_l) and ȳ_c = s_c·(1 − ȳ_l)/(1 − s_l)
    for c ≠ l (τ = 0.9 in the paper); it sums to 1, puts ≥ τ on l, and is s itself where
    s_l ≥ τ. Fake is s(x) (D = C).
A pixel whose label is the ignore label (or any value outside [0, C)) gets the all-zero vector
in real and fake alike, so it tells the adversary nothing. ``real_input`` treats ``probs`` as a
constant (``stop_gradient``): the real map is a target, never a path into the segmenter.

Architectures (every hidden conv is followed by ReLU, 'same' padding, no BatchNorm or dropout,
as in the paper; pools are 2×2 stride 2 max-pools, written "|"):
  - largefov: 3×3 96, 3×3 128, 3×3 128 | 3×3 256, 3×3 256 | 3×3 512, 3×3 out (34×34 field of
    view over the map, the paper's LargeFOV).
  - largefov_light: 3×3 96, 3×3 128, 3×3 128 | 3×3 128, 3×3 128 | 3×3 256, 3×3 out (34×34).
  - smallfov: 3×3 96, 1×1 128 | 3×3 256, 1×1 256 | 3×3 512, 1×1 out (18×18).
  - smallfov_light: 3×3 96, 1×1 128 | 3×3 128, 1×1 128 | 3×3 256, 1×1 out (18×18).
  - stanford (the paper's Stanford Background net): label map → 5×5 64; image → 5×5 16 →
    5×5 64; concatenated (128) → 3×3 128 | 3×3 256 | 3×3 512, 3×3 out.
The VOC layers are the paper's table as two independent public reimplementations (Chainer,
TensorFlow) list it, and they give the paper's fields of view, 34×34 and 18×18; the field of
view is what fixes the output layer's kernel (3×3 for LargeFOV: a 1×1 output would give 26×26).
The Stanford layers follow a TensorFlow reimplementation. The paper's Stanford segmenter
(Farabet et al.) emits maps at a quarter of the image's resolution, and a PyTorch
reimplementation keeps a 2×2 max-pool after each image-branch conv, presumably the paper's way
of bringing the image down to the maps' size; flaxseg's maps come at the image's size, so the
image branch here has no pools.

Image branch of the VOC nets (``use_image``): the paper's VOC nets take the map alone (feeding
the image along with the 'basic' map made no difference there, and the paper lists no layers
for it), so this is our choice, modelled on its Stanford net: image → 3×3 16 → 3×3 64,
concatenated with the label branch after the net's first conv (96 + 64 channels into the
second conv). ``use_image=None`` means the paper's choice: the image branch for 'stanford' with
'basic' or 'scaling', none otherwise ('product' already carries the image).

One logit instead of the paper's two-way softmax: the paper scores {real, fake} per location
and averages over space. The output layer here has one channel, the logit of 'real', and the
adversary returns its spatial mean; σ(mean) is the paper's softmax probability of 'real' when
the two-way scores z_real, z_fake are averaged before the softmax (as the reimplementations do),
because softmax over two scores is σ(z_real − z_fake), the difference of two linear convs is one
linear conv (weights w_real − w_fake, bias b_real − b_fake), and the mean commutes with it. The
second output channel is a redundant parametrisation; dropping it halves the last layer.

Sizes: any H, W ≥ 1 (the pools round up, ceil mode, so even a 1×1 map passes); the output is
[B] float32 whatever the compute ``dtype``. Parameters are float32. ``width`` scales every hidden
conv (max(1, round(width·features))) for tiny test nets.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import ConvBNAct, Dtype, check_at_least, check_choice, max_pool

ENCODINGS = ("basic", "product", "scaling")
DEFAULT_TAU = 0.9
IGNORE_LABEL = 255
IMAGE_CHANNELS = 3

# A layer is (features, kernel size); POOL is a 2×2 stride-2 max-pool (ceil mode).
POOL = "pool"
Layer = tuple[int, int] | str


@dataclasses.dataclass(frozen=True)
class AdversarySpec:
    """One adversary's layers: ``label_branch`` on the encoded map, ``image_branch`` on the
    image (used only with ``use_image``), concatenated, then ``trunk`` and a one-channel
    ``output_kernel``×``output_kernel`` conv. ``image_by_default``: the paper's choice of
    ``use_image`` for the 'basic' and 'scaling' encodings."""

    label_branch: tuple[Layer, ...]
    image_branch: tuple[Layer, ...]
    trunk: tuple[Layer, ...]
    output_kernel: int
    image_by_default: bool = False


# The VOC nets' image branch is ours (see the module docstring), the rest is the paper's.
_VOC_IMAGE_BRANCH = ((16, 3), (64, 3))

LARGEFOV = AdversarySpec(
    ((96, 3),), _VOC_IMAGE_BRANCH, ((128, 3), (128, 3), POOL, (256, 3), (256, 3), POOL, (512, 3)), 3
)
LARGEFOV_LIGHT = AdversarySpec(
    ((96, 3),), _VOC_IMAGE_BRANCH, ((128, 3), (128, 3), POOL, (128, 3), (128, 3), POOL, (256, 3)), 3
)
SMALLFOV = AdversarySpec(
    ((96, 3),), _VOC_IMAGE_BRANCH, ((128, 1), POOL, (256, 3), (256, 1), POOL, (512, 3)), 1
)
SMALLFOV_LIGHT = AdversarySpec(
    ((96, 3),), _VOC_IMAGE_BRANCH, ((128, 1), POOL, (128, 3), (128, 1), POOL, (256, 3)), 1
)
STANFORD = AdversarySpec(
    ((64, 5),),
    ((16, 5), (64, 5)),
    ((128, 3), POOL, (256, 3), POOL, (512, 3)),
    3,
    image_by_default=True,
)


# ----------------------------------------------------------------------------- input encodings


def _check_encoding(encoding: str) -> None:
    check_choice(encoding, ENCODINGS, "adversarial encoding")


def _check_tau(tau: float) -> None:
    if isinstance(tau, (int, float)) and not 0.0 < tau <= 1.0:
        raise ValueError(
            f"tau (the scaling encoding's least mass on the true class) must be in "
            f"(0, 1], got {tau!r}."
        )


def input_channels(encoding: str, num_classes: int) -> int:
    """Channels of the adversary's input: C ('basic', 'scaling') or 3·C ('product')."""
    _check_encoding(encoding)
    check_at_least("num_classes", num_classes)
    return IMAGE_CHANNELS * num_classes if encoding == "product" else num_classes


def _valid(labels: jax.Array, num_classes: int, ignore_label: int) -> jax.Array:
    """[B, H, W, 1] float32: 1 where the pixel has a class in [0, C), 0 where it is ignored."""
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
    return valid[..., None].astype(jnp.float32)


def _product(image: jax.Array, maps: jax.Array) -> jax.Array:
    # [B, H, W, 3] × [B, H, W, C] -> [B, H, W, 3·C], channel k·C + c = image_k · map_c.
    products = image.astype(jnp.float32)[..., :, None] * maps[..., None, :]
    return products.reshape(*maps.shape[:-1], image.shape[-1] * maps.shape[-1])


def _check_shapes(image: jax.Array, labels: jax.Array, probs: jax.Array) -> None:
    if labels.shape != probs.shape[:-1] or image.shape[:-1] != labels.shape:
        raise ValueError(
            f"The adversary's inputs must share B, H, W: image {tuple(image.shape)}, labels "
            f"{tuple(labels.shape)}, probs {tuple(probs.shape)}."
        )


def scaled_ground_truth(labels: jax.Array, probs: jax.Array, tau: float = DEFAULT_TAU) -> jax.Array:
    """The paper's 'scaling' target for valid ``labels`` (int [B, H, W]) and ``probs``
    ([B, H, W, C], summing to 1): ȳ_l = max(τ, s_l), ȳ_c = s_c·(1 − ȳ_l)/(1 − s_l) for c ≠ l.

    Where s_l ≥ τ the factor is 1 (ȳ = s); elsewhere it is (1 − τ)/(1 − s_l) with
    1 − s_l > 1 − τ ≥ 0, so no division by zero. Labels outside [0, C) give garbage here;
    ``real_input`` masks them.
    """
    _check_tau(tau)
    probs = probs.astype(jnp.float32)
    one_hot = jax.nn.one_hot(labels, probs.shape[-1], dtype=jnp.float32)
    true_prob = jnp.sum(probs * one_hot, axis=-1, keepdims=True)
    confident = true_prob >= tau
    scale = jnp.where(confident, 1.0, (1.0 - tau) / jnp.where(confident, 1.0, 1.0 - true_prob))
    return one_hot * jnp.maximum(tau, true_prob) + (1.0 - one_hot) * probs * scale


def real_input(
    image: jax.Array,
    labels: jax.Array,
    probs: jax.Array,
    *,
    encoding: str,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    tau: float = DEFAULT_TAU,
) -> jax.Array:
    """The adversary's input for the ground truth, float32 [B, H, W, D].

    'basic': one-hot(labels); 'product': image channel × one-hot products (3·C channels);
    'scaling': the τ-scaled ground truth (``scaled_ground_truth``), whose off-label mass follows
    ``probs``. Ignored pixels (label == ``ignore_label`` or outside [0, C)) get the zero vector.
    ``probs`` (the segmenter's softmax, [B, H, W, C]) only matters for 'scaling' and is held
    constant (``stop_gradient``). image: [B, H, W, 3] normalised float; labels: int [B, H, W].
    """
    _check_encoding(encoding)
    check_at_least("num_classes", num_classes)
    _check_tau(tau)
    _check_shapes(image, labels, probs)
    if probs.shape[-1] != num_classes:
        raise ValueError(f"probs has {probs.shape[-1]} classes but num_classes is {num_classes}.")
    valid = _valid(labels, num_classes, ignore_label)
    if encoding == "scaling":
        maps = scaled_ground_truth(labels, jax.lax.stop_gradient(probs), tau)
    else:
        maps = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    maps = maps * valid
    return _product(image, maps) if encoding == "product" else maps


def fake_input(
    image: jax.Array,
    labels: jax.Array,
    probs: jax.Array,
    *,
    encoding: str,
    ignore_label: int = IGNORE_LABEL,
) -> jax.Array:
    """The adversary's input for the segmenter's softmax ``probs`` ([B, H, W, C]), float32
    [B, H, W, D]: ``probs`` ('basic', 'scaling') or image channel × probs products ('product').
    ``labels`` only marks ignored pixels (label == ``ignore_label`` or outside [0, C)), which
    get the zero vector exactly as in ``real_input``. Gradients flow into ``probs``."""
    _check_encoding(encoding)
    _check_shapes(image, labels, probs)
    maps = probs.astype(jnp.float32) * _valid(labels, probs.shape[-1], ignore_label)
    return _product(image, maps) if encoding == "product" else maps


# ----------------------------------------------------------------------------- networks


class Adversary(nn.Module):
    """(image [B, H, W, 3], encoded map [B, H, W, D]) -> float32 logits [B] (> 0: 'real').

    Subclasses set ``SPEC`` and ``TITLE``; ``create_adversary`` builds them by name. ``train``
    changes nothing (no BatchNorm, no dropout) and is there for the common calling convention.
    """

    TITLE: ClassVar[str] = "adversary"
    SPEC: ClassVar[AdversarySpec]

    encoding: str = "basic"
    num_classes: int = 21
    use_image: bool | None = None
    width: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_encoding(self.encoding)
        check_at_least("num_classes", self.num_classes)
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width!r}.")
        super().__post_init__()

    @property
    def has_image_branch(self) -> bool:
        if self.use_image is None:
            return self.SPEC.image_by_default and self.encoding != "product"
        return bool(self.use_image)

    def _features(self, features: int) -> int:
        return max(1, round(self.width * features))

    def _layers(self, x: jax.Array, layers: Sequence[Layer], prefix: str) -> jax.Array:
        for i, layer in enumerate(layers):
            if layer == POOL:
                x = max_pool(x, 2, 2, ceil_mode=True)
                continue
            features, kernel = layer
            x = ConvBNAct(
                self._features(features),
                kernel,
                use_bn=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"{prefix}{i}",
            )(x)
        return x

    @nn.compact
    def __call__(self, image: jax.Array | None, encoded: jax.Array, train: bool = False) -> Any:
        del train  # no BatchNorm or dropout
        expected = input_channels(self.encoding, self.num_classes)
        if encoded.ndim != 4 or encoded.shape[-1] != expected:
            raise ValueError(
                f"The {self.TITLE} adversary for the {self.encoding!r} encoding of "
                f"{self.num_classes} classes takes [B, H, W, {expected}] maps, got "
                f"{tuple(encoded.shape)}."
            )
        spec = self.SPEC
        x = self._layers(encoded.astype(self.dtype), spec.label_branch, "label")
        if self.has_image_branch:
            if image is None or image.shape[:3] != encoded.shape[:3]:
                shape = None if image is None else tuple(image.shape)
                raise ValueError(
                    f"The {self.TITLE} adversary's image branch needs an image of the map's "
                    f"B, H, W {tuple(encoded.shape[:3])}, got {shape}."
                )
            y = self._layers(image.astype(self.dtype), spec.image_branch, "image")
            x = jnp.concatenate([x, y], axis=-1)
        x = self._layers(x, spec.trunk, "trunk")
        x = ConvBNAct(
            1,
            spec.output_kernel,
            use_bn=False,
            activation=None,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="output",
        )(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))


class LargeFOV(Adversary):
    TITLE = "LargeFOV"
    SPEC = LARGEFOV


class LargeFOVLight(Adversary):
    TITLE = "LargeFOV-light"
    SPEC = LARGEFOV_LIGHT


class SmallFOV(Adversary):
    TITLE = "SmallFOV"
    SPEC = SMALLFOV


class SmallFOVLight(Adversary):
    TITLE = "SmallFOV-light"
    SPEC = SMALLFOV_LIGHT


class StanfordBackground(Adversary):
    TITLE = "Stanford Background"
    SPEC = STANFORD


ADVERSARIES: dict[str, type] = {
    "largefov": LargeFOV,
    "largefov_light": LargeFOVLight,
    "smallfov": SmallFOV,
    "smallfov_light": SmallFOVLight,
    "stanford": StanfordBackground,
}


# The training settings that go with each adversary in Luc et al.'s experiments: λ, the weight
# of the segmenter's adversarial term on the paper's scale (a cross-entropy summed over each
# image's pixels plus λ·BCE), and the stride at which the adversary sees the label maps (the
# segmenter's output resolution: 1/8 for Dilated-8 on VOC, 1/4 for Farabet et al.'s Stanford
# net). flaxseg.training.adversarial's docstring says which of these the paper's text confirms
# (none could be read there) and where each comes from.
PAPER_DEFAULTS: dict[str, dict[str, float | int]] = {
    "largefov": {"weight": 1.0, "input_stride": 8},
    "largefov_light": {"weight": 1.0, "input_stride": 8},
    "smallfov": {"weight": 0.1, "input_stride": 8},
    "smallfov_light": {"weight": 1.0, "input_stride": 8},
    "stanford": {"weight": 1.0, "input_stride": 4},
}


def list_adversaries() -> list[str]:
    """Sorted names accepted by ``create_adversary``."""
    return sorted(ADVERSARIES)


def create_adversary(
    name: str,
    *,
    encoding: str,
    num_classes: int,
    use_image: bool | None = None,
    dtype: Dtype = jnp.float32,
    width: float = 1.0,
) -> nn.Module:
    """The adversary ``name`` for inputs of ``encoding`` with ``num_classes`` classes.

    ``module.apply({'params': p}, image, encoded, train=False)`` gives float32 logits [B].
    ``use_image``: whether the net also has an image branch (None: the paper's choice, see the
    module docstring). ``width`` scales every hidden conv (tests, tiny runs).
    """
    check_choice(name, list_adversaries(), "adversary network")
    return ADVERSARIES[name](
        encoding=encoding, num_classes=num_classes, use_image=use_image, width=width, dtype=dtype
    )
