"""Train-step and inference throughput of every registered model, as a table.

  python benchmarks/train_step_throughput.py [--models=deeplabv3plus,pspnet] [--size=513]
      [--batch_size=8] [--dtype=bfloat16] [--steps=10] [--tiny]

Measures the jitted train step (forward, backward, SGD update) and the eval forward on random
data already on the device, after one warm-up call that compiles; reports images/second and
milliseconds per step. `--tiny` uses the tests' tiny widths (for a CPU smoke run).
"""

import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from flaxseg import losses, models  # noqa: E402
from flaxseg.training import optim, steps  # noqa: E402
from flaxseg.training import state as state_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Models to time (default: all registered).")
flags.DEFINE_integer("size", 513, "Square input size.")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("steps", 10, "Timed steps after the warm-up.")
flags.DEFINE_bool("tiny", False, "Use the tests' tiny widths.")
flags.DEFINE_string("json_out", None, "Also write the rows as JSON to this file.")


def _time(fn, *args, steps):
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def benchmark(name, *, size, batch_size, dtype, steps_to_time, tiny):
    kwargs = {}
    if tiny:
        import tiny_models

        kwargs = dict(tiny_models.TINY_KWARGS[name])
    model = models.create_model(name, num_classes=21, dtype=dtype, **kwargs)
    tx = optim.create_optimizer(learning_rate=0.01)
    state = state_lib.create_train_state(model, tx, jax.random.key(0), (1, size, size, 3))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 21, (batch_size, size, size)), jnp.int32),
    }
    train = jax.jit(
        functools.partial(
            steps.train_step,
            loss_fn=losses.build_loss("cross_entropy", num_classes=21),
            ignore_label=255,
        ),
        donate_argnums=0,
    )
    evaluate = jax.jit(functools.partial(steps.eval_step, num_classes=21, ignore_label=255))

    key = jax.random.key(1)
    state, _ = train(state, batch, key)  # warm-up: compiles
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps_to_time):
        state, metrics = train(state, batch, key)
    jax.block_until_ready(metrics)
    train_s = (time.perf_counter() - start) / steps_to_time
    eval_s = _time(evaluate, state, batch, steps=steps_to_time)
    return {
        "model": name,
        "params": models.count_params(state.params),
        "train_img_s": batch_size / train_s,
        "train_ms": 1e3 * train_s,
        "eval_img_s": batch_size / eval_s,
    }


def main(argv):
    del argv
    names = FLAGS.models or models.list_models()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    device = jax.devices()[0]
    print(
        f"# {device.platform} {device.device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"{FLAGS.size}x{FLAGS.size}, batch {FLAGS.batch_size}, {FLAGS.dtype}"
        f"{', tiny widths' if FLAGS.tiny else ''}"
    )
    print(
        f"| {'model':<14} | {'params':>12} | {'train img/s':>11} | {'ms/step':>8} "
        f"| {'eval img/s':>10} |"
    )
    print(f"|{'-' * 16}|{'-' * 14}|{'-' * 13}|{'-' * 10}|{'-' * 12}|")
    rows = []
    for name in names:
        row = benchmark(
            name,
            size=FLAGS.size,
            batch_size=FLAGS.batch_size,
            dtype=dtype,
            steps_to_time=FLAGS.steps,
            tiny=FLAGS.tiny,
        )
        rows.append(row)
        print(
            f"| {name:<14} | {row['params']:>12,} | {row['train_img_s']:>11.2f} | "
            f"{row['train_ms']:>8.1f} | {row['eval_img_s']:>10.2f} |",
            flush=True,
        )
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    app.run(main)
