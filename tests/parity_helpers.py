"""What the PyTorch parity tests share: torchvision on CPU torch, BatchNorm statistics moved off
0/1, layout changes, the relative error, and abstract shapes of flax modules.

Parity is measured as max |ours − reference| / max |reference| (relative to the reference's
scale), with BatchNorm running statistics and affine parameters randomised so that a
conversion that mixed up any of the four would show.
"""

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def import_torchvision():
    """torchvision on a CPU-only torch: its CUDA wheel's op registrations are stubbed
    (DESIGN.md); models work, compiled ops such as nms do not."""
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision

    return torchvision


def randomise_batchnorm(module, seed: int = 1):
    """Non-trivial running statistics and affine parameters in every BatchNorm2d of a torch
    ``module``; returns it in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                n = layer.num_features
                layer.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                layer.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                layer.weight.copy_(0.5 + torch.rand(n, generator=generator))
                layer.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return module.eval()


def images(size, seed: int = 0, batch: int = 1, channels: int = 3) -> np.ndarray:
    """Standard-normal NHWC float32 images of spatial ``size`` (height, width)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, *size, channels)).astype(np.float32)


def nhwc(tensor) -> np.ndarray:
    """A torch NCHW tensor as a numpy NHWC array."""
    return tensor.detach().permute(0, 2, 3, 1).numpy()


def relative_error(ours, reference, what: str = "") -> float:
    """max |ours − reference| / max |reference|, after checking the shapes agree."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, f"{what}: {ours.shape} != {reference.shape}"
    scale = np.abs(reference).max()
    assert scale > 0, what
    return float(np.abs(ours - reference).max() / scale)


def assert_close(ours, reference, what: str = "", tolerance: float = 1e-4) -> float:
    """``relative_error`` ≤ ``tolerance``; returns the error."""
    error = relative_error(ours, reference, what)
    assert error <= tolerance, f"{what}: relative max |Δ| {error:.3g} > {tolerance}"
    return error


def init_shapes(module, height: int = 64, width: int = 64, channels: int = 3):
    """``module.init``'s variables as abstract shapes (nothing compiled or allocated)."""
    return jax.eval_shape(
        functools.partial(module.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, height, width, channels)),
    )


def flat_shapes(tree, sep: str | None = None) -> dict:
    """{path tuple: shape} of a nested variables tree; with ``sep``, each path joined by it
    (``sep="/"``: {"backbone/conv1/kernel": shape})."""
    flat = traverse_util.flatten_dict(tree, sep=sep)
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def hwio(shape) -> tuple:
    """A torch OIHW kernel shape as flax's HWIO (other shapes unchanged)."""
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else tuple(shape)


def downsampled(n: int, times: int) -> int:
    """Size after ``times`` PyTorch stride-2 convs/pools with 'same'-style padding."""
    for _ in range(times):
        n = (n - 1) // 2 + 1
    return n
