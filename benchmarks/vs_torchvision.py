"""flaxseg vs torchvision on the same hardware: one SGD train step and one inference forward of
DeepLab v3 / FCN with torchvision's exact architecture (ResNet-50, output stride 8, aux head).

  python benchmarks/vs_torchvision.py [--arch=deeplabv3_resnet50] [--size=257] [--batch_size=2]
      [--steps=3] [--threads=0]

Both sides start from the same random weights (converted with flaxseg.weights), use float32, SGD
momentum 0.9, cross-entropy with ignore 255 and aux weight 0.5 as torchvision's reference recipe
does, and are timed after a warm-up step (JAX compiles there). Prints a table; needs torch and
torchvision (the test requirements).
"""

import functools
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxseg import weights  # noqa: E402
from flaxseg.training import losses, optim, steps  # noqa: E402
from flaxseg.training import state as state_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", "deeplabv3_resnet50", ["deeplabv3_resnet50", "fcn_resnet50"], "Model.")
flags.DEFINE_integer("size", 257, "Square input size.")
flags.DEFINE_integer("batch_size", 2, "Batch size.")
flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up.")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default).")


def _import_torchvision():
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision

    return torchvision


def _timed(fn, steps):
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main(argv):
    del argv
    import torch

    torchvision = _import_torchvision()
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    torch.manual_seed(0)
    builder = getattr(torchvision.models.segmentation, FLAGS.arch)
    reference = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    model, variables = weights.convert_torchvision(FLAGS.arch, reference.state_dict())

    rng = np.random.default_rng(0)
    images = rng.normal(size=(FLAGS.batch_size, FLAGS.size, FLAGS.size, 3)).astype(np.float32)
    labels = rng.integers(0, 21, (FLAGS.batch_size, FLAGS.size, FLAGS.size)).astype(np.int32)

    # PyTorch.
    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    labels_t = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)

    def torch_train():
        reference.train()
        optimizer.zero_grad()
        out = reference(images_t)
        loss = criterion(out["out"], labels_t) + 0.5 * criterion(out["aux"], labels_t)
        loss.backward()
        optimizer.step()

    def torch_eval():
        reference.eval()
        with torch.no_grad():
            reference(images_t)

    # JAX.
    tx = optim.create_optimizer(learning_rate=0.01)
    state = state_lib.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
    )
    train = jax.jit(
        functools.partial(
            steps.train_step,
            loss_fn=losses.build_loss("cross_entropy", num_classes=21),
            ignore_label=255,
            aux_loss_weight=0.5,
        ),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        lambda s, x: s.apply_fn({"params": s.params, "batch_stats": s.batch_stats}, x, train=False)
    )
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    key = jax.random.key(0)
    holder = {"state": state}

    def jax_train():
        holder["state"], metrics = train(holder["state"], batch, key)
        jax.block_until_ready(metrics)

    def jax_eval():
        jax.block_until_ready(evaluate(holder["state"], batch["image"]))

    rows = [
        (
            "torch " + torch.__version__,
            _timed(torch_train, FLAGS.steps),
            _timed(torch_eval, FLAGS.steps),
        ),
        (
            "flaxseg (jax " + jax.__version__ + ")",
            _timed(jax_train, FLAGS.steps),
            _timed(jax_eval, FLAGS.steps),
        ),
    ]
    device = jax.devices()[0]
    print(
        f"# {FLAGS.arch}, {FLAGS.size}x{FLAGS.size}, batch {FLAGS.batch_size}, float32, "
        f"{device.platform} ({device.device_kind}), torch threads {torch.get_num_threads()}"
    )
    print(f"| {'framework':<24} | {'train img/s':>11} | {'eval img/s':>10} |")
    print(f"|{'-' * 26}|{'-' * 13}|{'-' * 12}|")
    for name, train_s, eval_s in rows:
        print(
            f"| {name:<24} | {FLAGS.batch_size / train_s:>11.2f} "
            f"| {FLAGS.batch_size / eval_s:>10.2f} |"
        )


if __name__ == "__main__":
    app.run(main)
