"""Compiled temporary memory of one training gradient with and without ``remat``, as a table.

  python benchmarks/remat_memory.py [--model=deeplabv3plus] [--backbone=resnet50]
      [--model_kwargs='{"base_width": 64}'] [--size=128] [--batch_size=4]
      [--keep_barriers=true]

Compiles ``value_and_grad`` of the cross-entropy (train mode, BatchNorm statistics mutable) for
``remat=False`` and ``remat=True`` and prints ``memory_analysis()``'s temporary and argument
sizes; nothing is run. ``--keep_barriers`` compiles with the option the training loop uses on CPU
when remat is on (``xla_disable_hlo_passes=cse_barrier_expander``): XLA's CPU pipeline otherwise
drops ``jax.checkpoint``'s optimisation barriers and merges the recomputation away.
"""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxseg import models  # noqa: E402
from flaxseg.training import loop  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "deeplabv3plus", "Registered model.")
flags.DEFINE_string("backbone", "resnet50", "Backbone.")
flags.DEFINE_string("model_kwargs", "{}", "JSON dict of further model arguments.")
flags.DEFINE_integer("size", 128, "Square input size.")
flags.DEFINE_integer("batch_size", 4, "Batch size.")
flags.DEFINE_integer("num_classes", 21, "Classes.")
flags.DEFINE_bool("keep_barriers", True, "Compile as the training loop does with remat on CPU.")


def _loss(model, params, batch_stats, images, labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(1)},
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates


def main(argv):
    del argv
    kwargs = dict(backbone=FLAGS.backbone, **json.loads(FLAGS.model_kwargs))
    images = jnp.zeros((FLAGS.batch_size, FLAGS.size, FLAGS.size, 3))
    labels = jnp.zeros(images.shape[:3], jnp.int32)
    rows = []
    for remat in (False, True):
        model = models.create_model(
            FLAGS.model, num_classes=FLAGS.num_classes, remat=remat, **kwargs
        )
        shapes = jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0), images[:1]
        )
        gradient = jax.jit(jax.value_and_grad(functools.partial(_loss, model), has_aux=True))
        options = loop.CPU_REMAT_COMPILER_OPTIONS if remat and FLAGS.keep_barriers else None
        compiled = gradient.lower(
            shapes["params"], shapes.get("batch_stats", {}), images, labels
        ).compile(options)
        memory = compiled.memory_analysis()
        rows.append((remat, memory.temp_size_in_bytes, memory.argument_size_in_bytes))
    device = jax.devices()[0]
    print(
        f"# {FLAGS.model} {kwargs}, batch {FLAGS.batch_size} of {FLAGS.size}², "
        f"{device.platform}, jax {jax.__version__}, keep_barriers={FLAGS.keep_barriers}"
    )
    print("| remat | temp MiB | arguments MiB |")
    print("|---|---|---|")
    for remat, temp, arguments in rows:
        print(f"| {remat} | {temp / 2**20:.1f} | {arguments / 2**20:.1f} |")


if __name__ == "__main__":
    app.run(main)
