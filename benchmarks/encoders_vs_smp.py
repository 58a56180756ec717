"""flaxseg against segmentation_models_pytorch (smp) with the same network: a U-Net (or another
smp architecture) on each of issue 8's encoders, same random weights (converted with
``flaxseg.weights.convert_smp``), same batch, resolution and float32, in one run.

  python benchmarks/encoders_vs_smp.py [--arch=Unet] [--encoders=resnet18,resnet34,...]
      [--size=160] [--batch_size=2] [--steps=3] [--threads=0]

Train = one SGD step (momentum 0.9, weight decay 1e-4, cross-entropy ignoring 255); eval = one
inference forward; both timed after a warm-up call (JAX compiles there). Needs torch, timm and
smp (the test requirements). Prints a table with the flaxseg/smp speed ratios.
"""

import sys
from pathlib import Path

import jax
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_compare  # noqa: E402

from flaxseg import models, weights  # noqa: E402

ENCODERS = [
    "resnet18",
    "resnet34",
    "resnext50_32x4d",
    "mobilenet_v2",
    "efficientnet-b0",
    "efficientnet-b1",
    "efficientnet-b2",
    "efficientnet-b3",
    "efficientnet-b4",
    "efficientnet-b5",
    "efficientnet-b6",
    "efficientnet-b7",
]

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", "Unet", "smp architecture class (Unet, DeepLabV3Plus, PSPNet, ...).")
flags.DEFINE_list("encoders", ENCODERS, "smp encoder names.")
flags.DEFINE_integer("size", 160, "Square input size (a multiple of 32, as smp needs).")
flags.DEFINE_integer("batch_size", 2, "Batch size.")
flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up.")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default).")


def main(argv):
    del argv
    import torch

    torch_compare.import_torchvision()
    import segmentation_models_pytorch as smp

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    images, labels = torch_compare.random_batch(FLAGS.batch_size, FLAGS.size, FLAGS.size, 21)
    rows, ratios = [], []
    for encoder in FLAGS.encoders:
        torch.manual_seed(0)
        reference = getattr(smp, FLAGS.arch)(encoder, encoder_weights=None, classes=21)
        model, variables = weights.convert_smp(FLAGS.arch, encoder, reference.state_dict())
        params = models.count_params(variables)
        torch_train, torch_eval = torch_compare.torch_steps(reference, images, labels)
        jax_train, jax_eval = torch_compare.flaxseg_steps(model, variables, images, labels, 21)
        torch_times = (
            torch_compare.timed(torch_train, FLAGS.steps),
            torch_compare.timed(torch_eval, FLAGS.steps),
        )
        jax_times = (
            torch_compare.timed(jax_train, FLAGS.steps),
            torch_compare.timed(jax_eval, FLAGS.steps),
        )
        rows.append((f"{encoder} ({params / 1e6:.1f} M), smp", *torch_times))
        rows.append((f"{encoder} ({params / 1e6:.1f} M), flaxseg", *jax_times))
        ratios.append((encoder, torch_times[0] / jax_times[0], torch_times[1] / jax_times[1]))
        del reference, model, variables
    device = jax.devices()[0]
    torch_compare.print_table(
        f"smp.{FLAGS.arch}, {FLAGS.size}x{FLAGS.size}, batch {FLAGS.batch_size}, float32, "
        f"{device.platform} ({device.device_kind}), torch {torch.__version__} threads "
        f"{torch.get_num_threads()}, jax {jax.__version__}",
        rows,
        FLAGS.batch_size,
    )
    print()
    print(f"| {'encoder':<18} | {'train flaxseg/smp':>17} | {'eval flaxseg/smp':>16} |")
    print(f"|{'-' * 20}|{'-' * 19}|{'-' * 18}|")
    for encoder, train_ratio, eval_ratio in ratios:
        print(f"| {encoder:<18} | {train_ratio:>16.2f}× | {eval_ratio:>15.2f}× |")


if __name__ == "__main__":
    app.run(main)
