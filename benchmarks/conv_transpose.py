"""Transposed-convolution implementations on FCN's layers, as a Markdown table.

  python benchmarks/conv_transpose.py [--score_size=16] [--batch_size=8] [--channels=21]
      [--repeats=5] [--layers=up2,up2_pool4,up8,up32] [--torch=true]

Times ``layers.conv_transpose`` with each ``impl`` ('lax': ``jax.lax.conv_transpose``
differentiated by XLA; 'lax_subpixel_grad': the same forward with the sub-pixel derivatives of
its ``jax.custom_jvp``; 'subpixel': the patch-matrix form) and PyTorch's ``conv_transpose2d`` on
the same inputs (NCHW there), on the current JAX backend. With the default ``--score_size=16``
(the score map of a 500 px image in FCN-8s, whose conv1_1 pads by 100) the layers are FCN-8s's
upscore2 (16 → 34), upscore_pool4 (34 → 70) and upscore8 (70 → 568, k 16, s 8) and FCN-32s's
upscore (16 → 544, k 64, s 32), with random kernels, 21 classes, batch 8.

"fwd" is the jitted output; "fwd+bwd" the output and the gradients with respect to the input
and the kernel for a fixed cotangent (PyTorch: forward, then ``backward``). Each figure is the
median over ``--repeats`` of one call after a warm-up call; the variants are interleaved within
each repeat so that load from other processes spreads over all of them. The load average is
printed before and after, since on a shared machine it dominates the noise.
"""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxseg.models import layers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("score_size", 16, "Spatial size of the class-score map fed to upscore2.")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_integer("channels", 21, "Channels in and out (the classes).")
flags.DEFINE_integer("repeats", 5, "Timed calls per variant (median reported).")
flags.DEFINE_list("layers", ["up2", "up2_pool4", "up8", "up32"], "Layers to time.")
flags.DEFINE_bool("torch", True, "Also time torch.nn.functional.conv_transpose2d.")


def _layer_geometries(score_size: int) -> dict[str, tuple[str, int, int, int]]:
    """name -> (description, input size, kernel, stride); padding 0 (FCN crops instead)."""
    n2 = layers.transposed_conv_output_size(score_size, 4, 2, 0)
    n4 = layers.transposed_conv_output_size(n2, 4, 2, 0)
    return {
        "up2": ("FCN-8s upscore2", score_size, 4, 2),
        "up2_pool4": ("FCN-8s upscore_pool4", n2, 4, 2),
        "up8": ("FCN-8s upscore8", n4, 16, 8),
        "up32": ("FCN-32s upscore", score_size, 64, 32),
    }


def _jax_variants(impl: str, x, kernel, cotangent, stride: int):
    def f(x, w):
        return layers.conv_transpose(x, w, stride, 0, impl)

    forward = jax.jit(f)

    @jax.jit
    def forward_backward(x, w, cotangent):
        y, vjp = jax.vjp(f, x, w)
        return y, *vjp(cotangent)

    return {
        "fwd": lambda: jax.block_until_ready(forward(x, kernel)),
        "fwd+bwd": lambda: jax.block_until_ready(forward_backward(x, kernel, cotangent)),
        "to_numpy": lambda results: [np.asarray(r) for r in results],
    }


def _torch_variants(x, kernel, cotangent, stride: int):
    x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
    w = torch.from_numpy(np.array(kernel)).permute(2, 3, 0, 1).contiguous()
    ct = torch.from_numpy(np.array(cotangent)).permute(0, 3, 1, 2).contiguous()

    def forward():
        with torch.no_grad():
            return torch.nn.functional.conv_transpose2d(x, w, stride=stride)

    def forward_backward():
        x_, w_ = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = torch.nn.functional.conv_transpose2d(x_, w_, stride=stride)
        y.backward(ct)
        return y.detach(), x_.grad, w_.grad

    def to_numpy(results):  # back to NHWC / HWIO
        y, dx, dw = (r.numpy() for r in results)
        return [y.transpose(0, 2, 3, 1), dx.transpose(0, 2, 3, 1), dw.transpose(2, 3, 0, 1)]

    return {"fwd": forward, "fwd+bwd": forward_backward, "to_numpy": to_numpy}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv):
    del argv
    geometries = _layer_geometries(FLAGS.score_size)
    unknown = [name for name in FLAGS.layers if name not in geometries]
    if unknown:
        raise app.UsageError(
            f"Unknown --layers {', '.join(unknown)}; valid layers: {', '.join(geometries)}."
        )
    impls = list(layers.CONV_TRANSPOSE_IMPLS) + (["torch"] if FLAGS.torch else [])
    b, c = FLAGS.batch_size, FLAGS.channels
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"default impl here: {layers.default_conv_transpose_impl()!r}"
    )
    print(f"load average before: {_load()}\n")
    print("| layer | in → out px | k, s | impl | fwd ms | fwd+bwd ms | max rel. diff vs 'lax' |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in FLAGS.layers:
        description, n, k, s = geometries[name]
        out = layers.transposed_conv_output_size(n, k, s, 0)
        x = jnp.asarray(rng.normal(size=(b, n, n, c)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(k, k, c, c)) / (k // s) ** 2, jnp.float32)
        cotangent = jnp.asarray(rng.normal(size=(b, out, out, c)), jnp.float32)
        variants, differences = {}, {}
        for impl in impls:
            if impl == "torch":
                variants[impl] = _torch_variants(x, kernel, cotangent, s)
            else:
                variants[impl] = _jax_variants(impl, x, kernel, cotangent, s)
            # Warm-up (compilation) and the check that the variants compute the same thing.
            results = variants[impl]["to_numpy"](variants[impl]["fwd+bwd"]())
            variants[impl]["fwd"]()
            if impl == "lax":
                reference = results
            differences[impl] = max(
                float(np.abs(r - e).max() / np.abs(e).max())
                for r, e in zip(results, reference, strict=True)
            )
        times = {(impl, mode): [] for impl in impls for mode in ("fwd", "fwd+bwd")}
        for _ in range(FLAGS.repeats):
            for impl in impls:
                for mode in ("fwd", "fwd+bwd"):
                    times[impl, mode].append(_time(variants[impl][mode]))
        for impl in impls:
            fwd = statistics.median(times[impl, "fwd"])
            both = statistics.median(times[impl, "fwd+bwd"])
            print(
                f"| {description} | {n} → {out} | {k}, {s} | {impl} | {fwd:.1f} | {both:.1f} "
                f"| {differences[impl]:.1e} |",
                flush=True,
            )
        del variants
    print(f"\nload average after: {_load()}")


if __name__ == "__main__":
    app.run(main)
