"""flaxseg vs torchvision on the same hardware: one SGD train step and one inference forward of
DeepLab v3 / FCN with torchvision's exact architecture (ResNet-50, output stride 8, aux head).

  python benchmarks/vs_torchvision.py [--arch=deeplabv3_resnet50] [--size=257] [--batch_size=2]
      [--steps=3] [--threads=0]

Both sides start from the same random weights (converted with flaxseg.weights), use float32, SGD
momentum 0.9, cross-entropy with ignore 255 and aux weight 0.5 as torchvision's reference recipe
does, and are timed after a warm-up step (JAX compiles there). Prints a table; needs torch and
torchvision (the test requirements).
"""

import sys
from pathlib import Path

import jax
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_compare  # noqa: E402

from flaxseg import weights  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", "deeplabv3_resnet50", ["deeplabv3_resnet50", "fcn_resnet50"], "Model.")
flags.DEFINE_integer("size", 257, "Square input size.")
flags.DEFINE_integer("batch_size", 2, "Batch size.")
flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up.")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default).")


def main(argv):
    del argv
    import torch

    torchvision = torch_compare.import_torchvision()
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    torch.manual_seed(0)
    builder = getattr(torchvision.models.segmentation, FLAGS.arch)
    reference = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    model, variables = weights.convert_torchvision(FLAGS.arch, reference.state_dict())
    images, labels = torch_compare.random_batch(FLAGS.batch_size, FLAGS.size, FLAGS.size, 21)
    torch_train, torch_eval = torch_compare.torch_steps(reference, images, labels, 0.5)
    jax_train, jax_eval = torch_compare.flaxseg_steps(model, variables, images, labels, 21, 0.5)
    rows = [
        (
            f"{FLAGS.arch}, torch {torch.__version__}",
            torch_compare.timed(torch_train, FLAGS.steps),
            torch_compare.timed(torch_eval, FLAGS.steps),
        ),
        (
            f"{FLAGS.arch}, flaxseg (jax {jax.__version__})",
            torch_compare.timed(jax_train, FLAGS.steps),
            torch_compare.timed(jax_eval, FLAGS.steps),
        ),
    ]
    device = jax.devices()[0]
    torch_compare.print_table(
        f"{FLAGS.size}x{FLAGS.size}, batch {FLAGS.batch_size}, float32, {device.platform} "
        f"({device.device_kind}), torch threads {torch.get_num_threads()}",
        rows,
        FLAGS.batch_size,
    )


if __name__ == "__main__":
    app.run(main)
