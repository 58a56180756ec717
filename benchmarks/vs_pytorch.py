"""flaxseg against PyTorch with the same architecture and weights on the same machine, in one run:
train-step and inference images/s, compile time (cold and warm persistent cache) and peak memory.

  python benchmarks/vs_pytorch.py [--models=tv:fcn_resnet50,tv:deeplabv3_resnet50,...]
      [--size=257] [--smp_size=256] [--batch_size=2] [--repeats=3] [--threads=2]
      [--compile_models=smp:DeepLabV3Plus:resnet101,tv:deeplabv3_resnet50] [--skip_compile]
  On a GPU (flaxseg bf16 against PyTorch AMP channels_last, eager and torch.compile, and MFU):
  python benchmarks/vs_pytorch.py --models=smp:DeepLabV3Plus:resnet101 --size=513 --smp_size=512
      --batch_size=16 --precision=bfloat16 --channels_last [--torch_compile] --peak_tflops=989

Models: ``tv:<arch>`` is torchvision's segmentation model (random weights, aux head, aux weight
0.5) and its twin from ``weights.convert_torchvision``; ``smp:<Arch>:<encoder>`` is
segmentation_models_pytorch's and its twin from ``weights.convert_smp`` (smp needs sizes that
are multiples of 32: ``--smp_size``). Both frameworks: float32, the same batch, SGD momentum 0.9,
weight decay 1e-4, cross-entropy ignoring 255 (``torch_compare``); torch with
``torch.set_num_threads(--threads)``, XLA with its default threads.

Throughput: each framework runs in its own worker process (PyTorch's OpenMP threads and XLA's
thread pool slow each other down badly when they share a process: torchvision DeepLab v3-R50's
train step took 1.7 s alone and 11 s interleaved with flaxseg in one process). After one warm-up
call each (JAX compiles there), ``--repeats`` rounds alternate one call of torch train, flaxseg
train, torch eval, flaxseg eval, each timed inside its worker, so load from other processes hits
both sides alike; the table gives medians, flaxseg/torch speed ratios and the largest spread
(max − min) / median of any column.

Compile and memory (``--compile_models``), each in its own subprocess:
  * flaxseg cold: a fresh temporary ``JAX_COMPILATION_CACHE_DIR``; the time from calling the
    jitted train step to its first result (compilation plus one step); warm: a second process
    with the same cache directory. The step's own time is printed beside them.
  * flaxseg memory: ``Compiled.memory_analysis()`` of the train step (argument + output + temp
    bytes, minus aliased donated bytes: what XLA allocates for one step), and the peak RSS of
    the first train-step call over the RSS before it (Linux ``VmHWM`` after resetting it
    through ``/proc/self/clear_refs``) in the warm process, where that call loads the
    executable from the cache instead of compiling.
  * torch memory: the same peak-RSS-over-RSS-before of two train steps, in a process that only
    built the torch model (eager PyTorch has no compile step; torch.compile is the GPU part of
    the issue). RSS counts what the allocators keep, an upper bound on live tensors; the
    parameters, gradients of earlier steps and optimiser state already resident before the
    measured step are not in the delta.
"""

import json
import os
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
flags.DEFINE_enum(
    "precision",
    "float32",
    ["float32", "bfloat16"],
    "bfloat16: flaxseg computes in bfloat16 (--config.dtype=bfloat16), PyTorch under autocast to "
    "bfloat16 (AMP); parameters float32 on both sides.",
)
flags.DEFINE_string("torch_device", "", "PyTorch's device; '' = cuda when available, else cpu.")
flags.DEFINE_bool("channels_last", False, "PyTorch in the channels_last memory format.")
flags.DEFINE_bool("torch_compile", False, "PyTorch through torch.compile (default backend).")
flags.DEFINE_float(
    "peak_tflops",
    0.0,
    "The device's peak TFLOP/s at --precision (e.g. 989 for an H100/H200 SXM in bfloat16): adds "
    "flaxseg's model-FLOPs utilisation (XLA cost analysis FLOPs of the train step / its time).",
)
flags.DEFINE_string("child", "", "Internal: the subprocess role (worker_torch, worker_jax, ...).")
flags.DEFINE_string("child_model", "", "Internal: the model of a child measurement.")


def _size(spec: str) -> int:
    return FLAGS.smp_size if spec.startswith("smp:") else FLAGS.size


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}.")


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def _child_flags(spec: str) -> list[str]:
    return [
        f"--child_model={spec}",
        f"--size={FLAGS.size}",
        f"--smp_size={FLAGS.smp_size}",
        f"--batch_size={FLAGS.batch_size}",
        f"--threads={FLAGS.threads}",
        f"--precision={FLAGS.precision}",
        f"--torch_device={FLAGS.torch_device}",
        f"--channels_last={FLAGS.channels_last}",
        f"--torch_compile={FLAGS.torch_compile}",
    ]


def _torch_options() -> dict:
    import torch

    device = FLAGS.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(
        device=device,
        amp=FLAGS.precision == "bfloat16",
        channels_last=FLAGS.channels_last,
        compile=FLAGS.torch_compile,
    )


def run_child() -> None:
    """One measurement or worker in this (fresh) process."""
    import torch
    import torch_compare

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    spec, size = FLAGS.child_model, _size(FLAGS.child_model)
    if FLAGS.child == "worker_torch":
        steps = torch_compare.build_torch_steps(spec, FLAGS.batch_size, size, **_torch_options())
        torch_compare.serve_steps(*steps)
        return
    if FLAGS.child == "worker_jax":
        fns = _flaxseg_steps(spec, size)
        cost = fns.train_jit.lower(*fns.train_args()).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        torch_compare.serve_steps(fns.train, fns.evaluate, {"flops": float(cost.get("flops", 0))})
        return
    if FLAGS.child == "memory_torch":
        train, _ = torch_compare.build_torch_steps(spec, FLAGS.batch_size, size, **_torch_options())
        before = _status_mib("VmRSS")
        _reset_peak_rss()
        for _ in range(2):
            train()
        print(json.dumps({"rss_before": before, "rss_peak": _status_mib("VmHWM")}))
        return
    import jax

    fns = _flaxseg_steps(spec, size)
    jax.block_until_ready(fns.train_args())
    before = _status_mib("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    fns.train()
    first = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    start = time.perf_counter()
    fns.train()
    step = time.perf_counter() - start
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
                "rss_before": before,
                "rss_peak": peak,
                "xla_bytes": xla_bytes,
                "temp_bytes": analysis.temp_size_in_bytes,
            }
        )
    )


def _flaxseg_steps(spec: str, size: int):
    """flaxseg's steps of the model pair, in --precision."""
    import jax.numpy as jnp
    import torch_compare

    pair = torch_compare.build_pair(spec, FLAGS.batch_size, size)
    if FLAGS.precision == "float32":
        return pair.jax
    return torch_compare.flaxseg_step_fns(*pair.jax_inputs, dtype=jnp.bfloat16)


def _child(kind: str, spec: str, cache_dir: str | None = None) -> dict:
    env = dict(os.environ)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    command = [sys.executable, __file__, f"--child={kind}", *_child_flags(spec)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"{kind} measurement of {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def throughput(specs) -> None:
    import jax
    import torch
    import torch_compare

    rows = []
    for spec in specs:
        torch_compare.parse_spec(spec)
        workers = {
            framework: torch_compare.StepWorker(
                [sys.executable, __file__, f"--child=worker_{framework}", *_child_flags(spec)]
            )
            for framework in ("torch", "jax")
        }
        calls = [(f, c) for c in ("train", "eval") for f in ("torch", "jax")]
        times = {call: [] for call in calls}
        for _ in range(FLAGS.repeats):
            for framework, call in calls:
                times[(framework, call)].append(workers[framework].time(call))
        for worker in workers.values():
            worker.close()
        median = {call: statistics.median(values) for call, values in times.items()}
        spread = max((max(v) - min(v)) / statistics.median(v) for v in times.values())
        flops = workers["jax"].info.get("flops", 0.0)
        mfu = None
        if FLAGS.peak_tflops:
            mfu = flops / median[("jax", "train")] / (FLAGS.peak_tflops * 1e12)
        rows.append((spec, median, spread, mfu))
        print(f"  {spec}: " + ", ".join(f"{f} {c} {median[(f, c)] * 1e3:.0f} ms" for f, c in calls))
    batch = FLAGS.batch_size
    torch_setting = ", ".join(
        f"{k}={v}" for k, v in _torch_options().items() if v not in (False, "")
    )
    print(
        f"\n# Throughput: batch {batch}, {FLAGS.precision}, {FLAGS.size}² (tv) / "
        f"{FLAGS.smp_size}² (smp), flaxseg on {jax.devices()[0].platform} (jax {jax.__version__}), "
        f"torch {torch.__version__} ({torch_setting}, threads {FLAGS.threads}); one worker "
        f"process per framework, calls alternated, medians of {FLAGS.repeats} rounds"
    )
    mfu_header = " flaxseg train MFU |" if FLAGS.peak_tflops else ""
    print(
        "| model | torch train img/s | flaxseg train img/s | train flaxseg/torch | "
        f"torch eval img/s | flaxseg eval img/s | eval flaxseg/torch | max spread |{mfu_header}"
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" if FLAGS.peak_tflops else ""))
    for spec, median, spread, mfu in rows:
        print(
            f"| {spec} | {batch / median[('torch', 'train')]:.2f} | "
            f"{batch / median[('jax', 'train')]:.2f} | "
            f"{median[('torch', 'train')] / median[('jax', 'train')]:.2f}× | "
            f"{batch / median[('torch', 'eval')]:.2f} | {batch / median[('jax', 'eval')]:.2f} | "
            f"{median[('torch', 'eval')] / median[('jax', 'eval')]:.2f}× | {spread:.0%} |"
            + (f" {mfu:.1%} |" if mfu is not None else "")
        )


def compile_and_memory(specs) -> None:
    rows = []
    for spec in specs:
        with tempfile.TemporaryDirectory(prefix="flaxseg_cache_") as cache_dir:
            cold = _child("jax", spec, cache_dir)
            warm = _child("jax", spec, cache_dir)
        torch_memory = _child("memory_torch", spec)
        rows.append((spec, cold, warm, torch_memory))
        print(f"  {spec}: cold {cold}, warm {warm}, torch {torch_memory}")
    mib = 2.0**20
    print(
        f"\n# Train-step compile time and memory: batch {FLAGS.batch_size}, float32, "
        f"{FLAGS.size}² (tv) / {FLAGS.smp_size}² (smp)"
    )
    print(
        "| model | cold: jit call → first result | warm | one step | XLA memory_analysis | "
        "flaxseg peak RSS − RSS before (warm) | torch peak RSS − RSS before |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec, cold, warm, torch_memory in rows:
        print(
            f"| {spec} | {cold['first_call_s']:.1f} s | {warm['first_call_s']:.1f} s | "
            f"{warm['step_s']:.1f} s | {warm['xla_bytes'] / mib:.0f} MiB "
            f"(temp {warm['temp_bytes'] / mib:.0f}) | "
            f"{warm['rss_peak'] - warm['rss_before']:.0f} MiB | "
            f"{torch_memory['rss_peak'] - torch_memory['rss_before']:.0f} MiB |"
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
