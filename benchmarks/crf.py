"""Fully connected CRF time: flaxseg.inference.dense_crf (JAX, permutohedral lattice) against
pydensecrf2 (Krähenbühl's C++ densecrf) on the same machine, in one run, with DeepLab v2's VOC
parameters (10 iterations, bilateral 4/67/3, Gaussian 3/1).

  python benchmarks/crf.py [--height=375] [--width=500] [--classes=21] [--repeats=3]

Two synthetic images of the size of a VOC photo: 'smooth' (shaded regions with mild noise, like
a photo: few lattice vertices) and 'noise' (uniform random colours: the lattice's worst case).
The probabilities are a softmax of a noisy one-hot label map. flaxseg is timed after a
compiling warm-up call (printed as '1st call': compile and one run); pydensecrf's time includes
building its lattices, as a call of dense_crf does. Needs pydensecrf2 (requirements-test.txt).
"""

import datetime
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxseg.inference import dense_crf  # noqa: E402
from flaxseg.inference.crf import PROB_FLOOR  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("height", 375, "Image height.")
flags.DEFINE_integer("width", 500, "Image width.")
flags.DEFINE_integer("classes", 21, "Number of classes.")
flags.DEFINE_integer("repeats", 3, "Timed calls per implementation and image.")


def synthetic(kind: str, height: int, width: int, classes: int, seed: int = 0):
    """(image uint8 [H, W, 3], probs float32 [H, W, C])."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    labels = (xs * 4 // width + 4 * (ys * 3 // height)) % classes
    if kind == "noise":
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        palette = rng.integers(30, 226, (classes, 3))
        shade = 20 * np.sin(xs / 37.0)[..., None] + 15 * np.cos(ys / 23.0)[..., None]
        image = palette[labels] + shade + rng.normal(0, 4, (height, width, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
    logits = 2.0 * np.eye(classes)[labels] + rng.normal(0, 1.0, (height, width, classes))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return image, (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


def pydensecrf_crf(image, probs):
    import pydensecrf.densecrf as dcrf

    height, width, classes = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    unary = -np.log(np.clip(probs, PROB_FLOOR, 1.0)).reshape(-1, classes).T
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    return np.asarray(crf.inference(10)).T.reshape(height, width, classes)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv):
    del argv
    height, width, classes = FLAGS.height, FLAGS.width, FLAGS.classes
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"hardware: {cpu_name()}, {os.cpu_count()} cores, jax backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"versions: python {platform.python_version()}, jax {jax.__version__}, "
        f"jaxlib {metadata.version('jaxlib')}, numpy {np.__version__}, "
        f"pydensecrf2 {metadata.version('pydensecrf2')}"
    )
    print(
        f"\n{height}x{width} image, {classes} classes, 10 iterations, median of {FLAGS.repeats}\n"
    )
    print("| image  | implementation      | 1st call s | time s | label agreement | max abs dQ |")
    print("|--------|---------------------|------------|--------|-----------------|------------|")
    for kind in ("smooth", "noise"):
        image, probs = synthetic(kind, height, width, classes)
        start = time.perf_counter()
        jax.block_until_ready(dense_crf(image, probs))
        first_s = time.perf_counter() - start
        ours, ours_s = timed(
            lambda: np.asarray(jax.block_until_ready(dense_crf(image, probs))), FLAGS.repeats
        )
        ref, ref_s = timed(lambda: pydensecrf_crf(image, probs), FLAGS.repeats)
        agree = 100.0 * np.mean(ours.argmax(-1) == ref.argmax(-1))
        diff = float(np.abs(ours - ref).max())
        blank = "|               - |          - |"
        print(f"| {kind:6s} | pydensecrf2 (C++)   |          - | {ref_s:6.2f} {blank}")
        print(
            f"| {kind:6s} | {'flaxseg (jax, ' + jax.default_backend() + ')':19s} | {first_s:10.1f} "
            f"| {ours_s:6.2f} | {agree:14.3f}% | {diff:10.2e} |"
        )


if __name__ == "__main__":
    app.run(main)
