"""Where a flaxseg step spends its time on CPU, beside the same step in PyTorch: a per-part table.

  python benchmarks/profile_cpu.py [--arch=deeplabv3_resnet50] [--size=257] [--batch_size=2]
      [--steps=3] [--threads=2] [--mode=train|eval] [--top=25] [--dump_hlo=PATH]
      [--noconv_by_taps] [--ab]

flaxseg: the jitted step (torch_compare's, same recipe) runs ``steps`` times under a
``jax.profiler`` trace; every executed XLA op (thunk) is attributed through the optimised HLO
(``Compiled.as_text()``) to a kind: convolution forward / input gradient / kernel gradient,
reduction fusions (BatchNorm statistics and their gradients, loss sums), elementwise fusions
(BN normalisation, ReLU, residual adds, SGD update), layout copies and transposes, dot (the
bilinear resizes are matmuls), max pooling — and to a region of the network (from the op's
module path: backbone, ASPP, head, resize, loss, optimiser). PyTorch: the same step under
``torch.profiler`` (self CPU time per aten op, mapped onto similar kinds) in a process of its own
(PyTorch's OpenMP threads and XLA's thread pool slow each other down in one process).

``--noconv_by_taps`` profiles with ``layers.CONV_BY_TAPS`` off (every convolution an XLA
convolution, as before that rewrite); ``--ab`` instead times flaxseg with the switch off and on,
interleaved, in one process.

The two columns are sums of op times per step. XLA may run independent ops concurrently and
PyTorch's times include its dispatcher, so each column's total is close to, not exactly, the
step's wall time (printed beside it).
"""

import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_compare  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", "deeplabv3_resnet50", torch_compare.TORCHVISION_ARCHS, "Model.")
flags.DEFINE_integer("size", 257, "Square input size.")
flags.DEFINE_integer("batch_size", 2, "Batch size.")
flags.DEFINE_integer("steps", 3, "Profiled steps after the warm-up.")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads (0: torch's default).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Profile the train step or inference.")
flags.DEFINE_integer("top", 25, "How many of flaxseg's most expensive ops to list.")
flags.DEFINE_string("dump_hlo", "", "Write the optimised HLO of the step to this file.")
flags.DEFINE_bool("torch_child", False, "Internal: profile torch alone in this process.")
flags.DEFINE_bool(
    "conv_by_taps", True, "False: profile with layers.CONV_BY_TAPS off (plain XLA convolutions)."
)
flags.DEFINE_bool(
    "ab",
    False,
    "Instead of profiling: time flaxseg with layers.CONV_BY_TAPS off and on, "
    "interleaved, --steps rounds (train and eval).",
)

KINDS = (
    "conv forward",
    "conv input grad",
    "conv kernel grad",
    "reduce fusion (BN stats / grads, loss sums)",
    "elementwise fusion (BN apply, ReLU, add, SGD)",
    "copy / transpose",
    "matmul forward (1x1 / per-tap convs)",
    "matmul backward (1x1 / per-tap convs)",
    "dot (bilinear resize)",
    "max-pool fwd/bwd",
    "other",
)

# ----------------------------------------------------------------------------- HLO parsing

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def parse_hlo(text: str):
    """{instruction name: (opcode, result shape, op_name metadata, opcodes inside if fused)}."""
    bodies, current = {}, None
    entries = []
    for line in text.splitlines():
        match = _COMPUTATION.match(line)
        if match and "=" not in line.split("{")[0]:
            current = match.group(1)
            bodies[current] = []
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, shape, opcode, rest = match.groups()
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            bodies[current].append(opcode)
            entries.append(
                (
                    name,
                    opcode,
                    shape,
                    op_name.group(1) if op_name else "",
                    calls.group(1) if calls else None,
                    "__ynn_fusion" in rest or "__xnn_fusion" in rest or "onednn" in rest,
                )
            )
    table = {}
    for name, opcode, shape, op_name, calls, library in entries:
        inner = set(bodies.get(calls, ())) if calls else set()
        table[name] = (opcode, shape, op_name, inner, library)
    return table


def _is_kernel_shape(shape: str) -> bool:
    dims = re.match(r"\w+\[([\d,]*)\]", shape)
    if not dims or not dims.group(1):
        return False
    sizes = [int(d) for d in dims.group(1).split(",")]
    # HWIO, or [O, H, W, I] as XLA lays out a kernel gradient
    return len(sizes) == 4 and any(sizes[i] == sizes[i + 1] <= 7 for i in (0, 1))


def op_kind(name: str, opcode: str, shape: str, op_name: str, inner: set) -> str:
    ops = inner | {opcode}
    if "convolution" in ops or ("dot" in ops and "conv_general_dilated" in op_name):
        if _is_kernel_shape(shape):
            return "conv kernel grad"
        return "conv input grad" if "transpose(" in op_name else "conv forward"
    if "dot" in ops and "resize" not in op_name:
        backward = "transpose(" in op_name or not op_name
        return f"matmul {'backward' if backward else 'forward'} (1x1 / per-tap convs)"
    if name.startswith(("transpose", "copy")) or opcode in {"copy", "transpose"}:
        return "copy / transpose"
    if "reduce-window" in ops or "select-and-scatter" in ops:
        return "max-pool fwd/bwd"
    if "dot" in ops:
        return "dot (bilinear resize)"
    if "reduce" in ops:
        return "reduce fusion (BN stats / grads, loss sums)"
    if ops <= {"copy", "transpose", "bitcast", "fusion", "parameter", "slice", "concatenate"}:
        return "copy / transpose"
    if opcode == "fusion" or opcode in {"add", "multiply", "maximum", "select", "subtract"}:
        return "elementwise fusion (BN apply, ReLU, add, SGD)"
    return "other"


def op_region(op_name: str) -> str:
    if not op_name:
        return "no source (XLA-made ops: kernel-gradient convs, their layouts)"
    if "_resize" in op_name or "resize" in op_name:
        return "bilinear resize"
    if re.search(r"log_softmax|take_along_axis|cross_entropy|_prepare|_safe_divide", op_name):
        return "loss"
    if re.search(r"/aux_head/", op_name):
        return "aux head"
    if re.search(r"/aspp/|/head_conv/|/classifier/|/head/", op_name):
        return "head (ASPP / FCN head)"
    if "/backbone/" in op_name:
        return "backbone"
    if "jvp(" in op_name or "transpose(" in op_name:
        return "model (other)"
    return "loss, metrics and optimiser (outside the model)"


# ----------------------------------------------------------------------------- flaxseg


def flaxseg_profile(train_fn, steps: int):
    """({hlo op: total ns over ``steps``}, wall seconds per step) of ``steps`` calls."""
    train_fn()
    directory = tempfile.mkdtemp(prefix="flaxseg_trace_")
    start = time.perf_counter()
    with jax.profiler.trace(directory):
        for _ in range(steps):
            train_fn()
    wall = (time.perf_counter() - start) / steps
    path = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0]
    totals = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    totals[stats["hlo_op"]] += event.duration_ns
    return totals, wall


# ----------------------------------------------------------------------------- torch

_TORCH_KINDS = [
    (r"convolution_backward", "conv input grad + kernel grad"),
    (r"mkldnn_convolution|_convolution|^aten::convolution$|conv2d|_nnpack|slow_conv", "conv fwd"),
    (r"batch_norm", "BatchNorm (fwd + bwd)"),
    (r"upsample_bilinear", "bilinear resize"),
    (r"log_softmax|nll_loss|cross_entropy", "loss"),
    (r"max_pool", "max-pool fwd/bwd"),
    (r"_foreach|sgd|zero_", "optimiser (+ zero_grad)"),
    (
        r"relu|threshold|add|mul|copy|fill|clone|empty|cat|mean|sum|dropout|div|native_dropout",
        "elementwise / misc",
    ),
]


def torch_kind(name: str) -> str:
    for pattern, kind in _TORCH_KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def torch_profile(fn, steps: int):
    import torch

    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - start) / steps
    totals = collections.Counter()
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total * 1e3  # us -> ns
    return totals, wall


# ----------------------------------------------------------------------------- main


def ab_timing(setup) -> None:
    """Interleaved medians of flaxseg without and with ``layers.CONV_BY_TAPS``."""
    import statistics

    import torch

    from flaxseg.models import layers

    variants = {}
    for enabled in (False, True):
        layers.CONV_BY_TAPS = enabled
        fns = torch_compare.flaxseg_step_fns(*setup.jax_inputs)
        fns.train()  # traced and compiled with the switch as set
        fns.evaluate()
        variants[enabled] = fns
    layers.CONV_BY_TAPS = True
    # No torch rows: torch in a process with XLA's threads is not a fair measurement (see
    # torch_compare); vs_pytorch.py compares the frameworks.
    calls = {
        "flaxseg train, lax.conv": variants[False].train,
        "flaxseg train, conv_by_taps": variants[True].train,
        "flaxseg eval, lax.conv": variants[False].evaluate,
        "flaxseg eval, conv_by_taps": variants[True].evaluate,
    }
    times = {name: [] for name in calls}
    for _ in range(FLAGS.steps):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(
        f"# {FLAGS.arch}, {FLAGS.size}x{FLAGS.size}, batch {FLAGS.batch_size}, float32, torch "
        f"threads {torch.get_num_threads()}; medians of {FLAGS.steps} interleaved rounds; load "
        f"average after: {os.getloadavg()}"
    )
    print("| step | median ms | min ms | max ms |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(
            f"| {name} | {statistics.median(values) * 1e3:.0f} | {min(values) * 1e3:.0f} | "
            f"{max(values) * 1e3:.0f} |"
        )


def torch_profile_in_subprocess():
    """torch_profile of the torch step alone in a fresh process: PyTorch's OpenMP threads and
    XLA's thread pool slow each other down when they share one (see torch_compare)."""
    import json
    import subprocess

    command = [
        sys.executable,
        __file__,
        "--torch_child",
        f"--arch={FLAGS.arch}",
        f"--size={FLAGS.size}",
        f"--batch_size={FLAGS.batch_size}",
        f"--steps={FLAGS.steps}",
        f"--threads={FLAGS.threads}",
        f"--mode={FLAGS.mode}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return collections.Counter(data["totals"]), data["wall"]


def main(argv):
    del argv
    import torch

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    if FLAGS.torch_child:
        import json

        train, evaluate = torch_compare.build_torch_steps(
            f"tv:{FLAGS.arch}", FLAGS.batch_size, FLAGS.size
        )
        totals, wall = torch_profile(train if FLAGS.mode == "train" else evaluate, FLAGS.steps)
        print(json.dumps({"totals": totals, "wall": wall}))
        return
    setup = torch_compare.torchvision_pair(FLAGS.arch, FLAGS.batch_size, FLAGS.size)
    if FLAGS.ab:
        ab_timing(setup)
        return
    from flaxseg.models import layers

    layers.CONV_BY_TAPS = FLAGS.conv_by_taps
    train = FLAGS.mode == "train"
    jitted, args = (
        (setup.jax.train_jit, setup.jax.train_args)
        if train
        else (
            setup.jax.eval_jit,
            setup.jax.eval_args,
        )
    )
    compiled_text = jitted.lower(*args()).compile().as_text()
    if FLAGS.dump_hlo:
        Path(FLAGS.dump_hlo).write_text(compiled_text)
    table = parse_hlo(compiled_text)
    jax_fn = setup.jax.train if train else setup.jax.evaluate
    del setup

    torch_totals, torch_wall = torch_profile_in_subprocess()
    jax_totals, jax_wall = flaxseg_profile(jax_fn, FLAGS.steps)
    steps = FLAGS.steps

    by_kind, by_region, library_ns = collections.Counter(), collections.Counter(), 0
    rows = []
    for op, ns in jax_totals.items():
        opcode, shape, op_name, inner, library = table.get(op, ("?", "?", "", set(), False))
        kind = op_kind(op, opcode, shape, op_name, inner)
        by_kind[kind] += ns
        by_region[op_region(op_name)] += ns
        library_ns += ns if library else 0
        rows.append((ns, op, kind, shape, op_name))
    torch_kinds = collections.Counter()
    for name, ns in torch_totals.items():
        if name.startswith("ProfilerStep"):
            continue
        torch_kinds[torch_kind(name)] += ns

    def ms(ns):
        return ns / 1e6 / steps

    print(
        f"# {FLAGS.arch} {FLAGS.mode} step, {FLAGS.size}x{FLAGS.size}, batch {FLAGS.batch_size}, "
        f"float32; jax {jax.__version__}, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}); layers.CONV_BY_TAPS={FLAGS.conv_by_taps}; "
        f"load average {os.getloadavg()}"
    )
    print(f"wall ms/step: flaxseg {jax_wall * 1e3:.0f}, torch {torch_wall * 1e3:.0f}")
    print(
        f"flaxseg sum of op times {ms(sum(jax_totals.values())):.0f} ms/step "
        f"(in library fusions, ynn/xnn/oneDNN: {ms(library_ns):.0f})"
    )
    print("\n## flaxseg by op kind")
    print(f"| {'kind':<48} | {'ms/step':>8} | {'share':>6} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 8}|")
    total = sum(by_kind.values()) or 1
    for kind in KINDS:
        print(f"| {kind:<48} | {ms(by_kind[kind]):>8.1f} | {by_kind[kind] / total:>6.1%} |")
    print("\n## flaxseg by region")
    print(f"| {'region':<48} | {'ms/step':>8} | {'share':>6} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 8}|")
    for region, ns in by_region.most_common():
        print(f"| {region:<48} | {ms(ns):>8.1f} | {ns / total:>6.1%} |")
    print("\n## torch by op kind (self CPU time)")
    print(f"| {'kind':<48} | {'ms/step':>8} |")
    print(f"|{'-' * 50}|{'-' * 10}|")
    for kind, ns in torch_kinds.most_common():
        print(f"| {kind:<48} | {ms(ns):>8.1f} |")
    print("\n## torch top aten ops")
    for name, ns in torch_totals.most_common(15):
        print(f"  {ms(ns):8.1f} ms  {name}")
    print(f"\n## flaxseg top {FLAGS.top} ops")
    for ns, op, kind, shape, op_name in sorted(rows, reverse=True)[: FLAGS.top]:
        print(f"  {ms(ns):8.1f} ms  {op:<32} {kind:<24.24} {shape:<28.28} {op_name[-70:]}")


if __name__ == "__main__":
    app.run(main)
