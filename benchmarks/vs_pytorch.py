"""flaxseg against PyTorch with the same architecture and weights on the same machine, in one run:
train-step and inference images/s, compile time (cold and warm persistent cache) and peak memory.

  python benchmarks/vs_pytorch.py [--models=tv:fcn_resnet50,tv:deeplabv3_resnet50,...]
      [--size=257] [--smp_size=256] [--batch_size=2] [--repeats=3] [--threads=2]
      [--compile_models=smp:DeepLabV3Plus:resnet101,tv:deeplabv3_resnet50] [--skip_compile]

Models: ``tv:<arch>`` is torchvision's segmentation model (random weights, aux head, aux weight
0.5) and its twin from ``weights.convert_torchvision``; ``smp:<Arch>:<encoder>`` is
segmentation_models_pytorch's and its twin from ``weights.convert_smp`` (smp needs sizes that
are multiples of 32: ``--smp_size``). Both frameworks: float32, the same batch, SGD momentum 0.9,
weight decay 1e-4, cross-entropy ignoring 255 (``torch_compare``); torch with
``torch.set_num_threads(--threads)``, XLA with its default threads.

Throughput: after one warm-up call each (JAX compiles there), ``--repeats`` rounds that time one
call of torch train, flaxseg train, torch eval, flaxseg eval in turn (interleaved, so load from
other processes hits both sides alike); the table gives the medians and flaxseg/torch ratios.

Compile and memory (``--compile_models``), each in its own subprocess:
  * flaxseg cold: a fresh temporary ``JAX_COMPILATION_CACHE_DIR``; the time from calling the
    jitted train step to its first result (compilation plus one step); warm: a second process
    with the same cache directory. The step's own time is printed beside them.
  * flaxseg memory: ``Compiled.memory_analysis()`` of the train step (argument + output + temp
    bytes, minus aliased donated bytes: what XLA allocates for one step) and the process's RSS
    high-water mark (``resource.getrusage``) over the mark after building the model and its
    variables, in the warm process (a cold one's mark includes the compiler's memory).
  * torch memory: the same RSS high-water delta over two train steps in a process that only
    built the torch model (eager PyTorch has no compile step; torch.compile is the GPU part of
    the issue). RSS counts what the allocator keeps, so it is an upper bound on live tensors.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_MODELS = [
    "tv:fcn_resnet50",
    "tv:deeplabv3_resnet50",
    "tv:deeplabv3_resnet101",
    "smp:DeepLabV3Plus:resnet50",
    "smp:Unet:resnet50",
    "smp:PSPNet:resnet50",
]

FLAGS = flags.FLAGS
flags.DEFINE_list("models", DEFAULT_MODELS, "tv:<arch> or smp:<Arch>:<encoder> entries.")
flags.DEFINE_integer("size", 257, "Square input size of the torchvision models.")
flags.DEFINE_integer("smp_size", 256, "Square input size of the smp models (multiple of 32).")
flags.DEFINE_integer("batch_size", 2, "Batch size.")
flags.DEFINE_integer("repeats", 3, "Interleaved timed rounds after the warm-up.")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads (0: torch's default).")
flags.DEFINE_list(
    "compile_models",
    ["smp:DeepLabV3Plus:resnet101", "tv:deeplabv3_resnet50"],
    "Models whose compile time and memory are measured in subprocesses.",
)
flags.DEFINE_bool("skip_throughput", False, "Only measure compile time and memory.")
flags.DEFINE_bool("skip_compile", False, "Only measure throughput.")
flags.DEFINE_string("child", "", "Internal: 'jax' or 'torch' subprocess measurement.")
flags.DEFINE_string("child_model", "", "Internal: the model of a child measurement.")


def _size(spec: str) -> int:
    return FLAGS.smp_size if spec.startswith("smp:") else FLAGS.size


def build_pair(spec: str):
    """torch_compare.Pair for a model spec (see the module docstring)."""
    import torch_compare

    kind, *rest = spec.split(":")
    if kind == "tv" and len(rest) == 1 and rest[0] in torch_compare.TORCHVISION_ARCHS:
        return torch_compare.torchvision_pair(rest[0], FLAGS.batch_size, _size(spec))
    if kind == "smp" and len(rest) == 2:
        return torch_compare.smp_pair(rest[0], rest[1], FLAGS.batch_size, _size(spec))
    raise ValueError(
        f"--models entry {spec!r} is not tv:<{'|'.join(torch_compare.TORCHVISION_ARCHS)}> or "
        "smp:<Arch>:<encoder>."
    )


def build_torch(spec: str):
    """(torch module, train closure) without any flaxseg state (for the torch memory child)."""
    import torch
    import torch_compare

    torchvision = torch_compare.import_torchvision()
    torch.manual_seed(0)
    kind, *rest = spec.split(":")
    images, labels = torch_compare.random_batch(FLAGS.batch_size, _size(spec), _size(spec), 21)
    if kind == "tv":
        builder = getattr(torchvision.models.segmentation, rest[0])
        module = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
        return torch_compare.torch_steps(module, images, labels, 0.5)[0]
    import segmentation_models_pytorch as smp

    module = getattr(smp, rest[0])(rest[1], encoder_weights=None, classes=21)
    return torch_compare.torch_steps(module, images, labels)[0]


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_child() -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    spec = FLAGS.child_model
    if FLAGS.child == "torch":
        train = build_torch(spec)
        before = _max_rss_bytes()
        for _ in range(2):
            train()
        print(json.dumps({"rss_delta": _max_rss_bytes() - before}))
        return
    import jax

    pair = build_pair(spec)
    fns = pair.jax
    del pair
    jax.block_until_ready(fns.train_args())
    before = _max_rss_bytes()
    start = time.perf_counter()
    fns.train()
    first = time.perf_counter() - start
    start = time.perf_counter()
    fns.train()
    step = time.perf_counter() - start
    rss_delta = _max_rss_bytes() - before
    analysis = fns.train_jit.lower(*fns.train_args()).compile().memory_analysis()
    xla_bytes = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    print(
        json.dumps(
            {
                "first_call_s": first,
                "step_s": step,
                "rss_delta": rss_delta,
                "xla_bytes": xla_bytes,
                "temp_bytes": analysis.temp_size_in_bytes,
            }
        )
    )


def _child(kind: str, spec: str, cache_dir: str | None = None) -> dict:
    env = dict(os.environ)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    command = [
        sys.executable,
        __file__,
        f"--child={kind}",
        f"--child_model={spec}",
        f"--size={FLAGS.size}",
        f"--smp_size={FLAGS.smp_size}",
        f"--batch_size={FLAGS.batch_size}",
        f"--threads={FLAGS.threads}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"{kind} measurement of {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def throughput(specs) -> None:
    import jax
    import torch

    rows = []
    for spec in specs:
        pair = build_pair(spec)
        calls = {
            "torch train": pair.torch.train,
            "flaxseg train": pair.jax.train,
            "torch eval": pair.torch.evaluate,
            "flaxseg eval": pair.jax.evaluate,
        }
        for fn in calls.values():
            fn()  # warm-up (JAX compiles here)
        times = {name: [] for name in calls}
        for _ in range(FLAGS.repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in times.items()}
        spread = {
            name: (max(values) - min(values)) / statistics.median(values)
            for name, values in times.items()
        }
        rows.append((spec, pair.num_params, median, spread))
        print(f"  {spec}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in median.items()))
        del pair, calls
    batch = FLAGS.batch_size
    print(
        f"\n# Throughput: batch {batch}, float32, {FLAGS.size}² (tv) / {FLAGS.smp_size}² (smp), "
        f"{jax.devices()[0].platform}, jax {jax.__version__}, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}); medians of {FLAGS.repeats} interleaved rounds"
    )
    print(
        "| model | params | torch train img/s | flaxseg train img/s | train ratio | "
        "torch eval img/s | flaxseg eval img/s | eval ratio | max spread |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, params, median, spread in rows:
        print(
            f"| {spec} | {params / 1e6:.1f} M | {batch / median['torch train']:.2f} | "
            f"{batch / median['flaxseg train']:.2f} | "
            f"{median['torch train'] / median['flaxseg train']:.2f}× | "
            f"{batch / median['torch eval']:.2f} | {batch / median['flaxseg eval']:.2f} | "
            f"{median['torch eval'] / median['flaxseg eval']:.2f}× | "
            f"{max(spread.values()):.0%} |"
        )


def compile_and_memory(specs) -> None:
    rows = []
    for spec in specs:
        with tempfile.TemporaryDirectory(prefix="flaxseg_cache_") as cache_dir:
            cold = _child("jax", spec, cache_dir)
            warm = _child("jax", spec, cache_dir)
        torch_memory = _child("torch", spec)
        rows.append((spec, cold, warm, torch_memory))
        print(f"  {spec}: cold {cold}, warm {warm}, torch {torch_memory}")
    mib = 2.0**20
    print(
        f"\n# Train-step compile time and memory: batch {FLAGS.batch_size}, float32, "
        f"{FLAGS.size}² (tv) / {FLAGS.smp_size}² (smp)"
    )
    print(
        "| model | cold: jit call → first result | warm | one step | XLA memory_analysis | "
        "flaxseg RSS Δ (warm) | torch RSS Δ |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec, cold, warm, torch_memory in rows:
        print(
            f"| {spec} | {cold['first_call_s']:.1f} s | {warm['first_call_s']:.1f} s | "
            f"{warm['step_s']:.1f} s | {warm['xla_bytes'] / mib:.0f} MiB "
            f"(temp {warm['temp_bytes'] / mib:.0f}) | {warm['rss_delta'] / mib:.0f} MiB | "
            f"{torch_memory['rss_delta'] / mib:.0f} MiB |"
        )


def main(argv):
    del argv
    if FLAGS.child:
        run_child()
        return
    import torch

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    print(f"load average at start: {os.getloadavg()}")
    if not FLAGS.skip_throughput:
        throughput(FLAGS.models)
        print(f"load average: {os.getloadavg()}")
    if not FLAGS.skip_compile:
        compile_and_memory(FLAGS.compile_models)
        print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    app.run(main)
