"""Scaling on paper: the collectives of the compiled data-parallel train step, from its HLO.

  python benchmarks/scaling.py [--runs=8:513:8,64:513:64,8:257:8,8:513:16] [--dtype=bfloat16]
      [--backbone=resnet101] [--project_batches=1,2,4,8] [--hlo_dir=DIR] [--json_out=FILE]

Each run `devices:crop:global_batch` starts a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=<devices>` (the flag must be set before jax is
imported), builds DeepLab v3+ from `flaxseg/configs/deeplabv3plus_voc.py` with `--backbone`
(the recipe's ResNet-101 variant: weight decay 1e-4) exactly as the training loop does
(`spec.resolve_config` / `restore.build_model`, `loop.create_optimizer`, `loop.init_state`,
`loop.jit_train_step` over `sharding.create_mesh()`), and lowers and compiles the train step for
abstract inputs only (`jax.eval_shape` of `init_state`, `ShapeDtypeStruct`s with the batch
sharded over 'data'): nothing full-size is allocated. It then reads the optimised HLO
(`compiled.as_text()`): every all-reduce, all-gather, reduce-scatter, collective-permute and
all-to-all with the bytes of its operands (tuples summed, each element's dtype counted), and
`compiled.cost_analysis()` FLOPs of one device's program.

The parent prints: the collectives per kind; the collective bytes against the bytes of the
parameters and BatchNorm statistics; and the communication time of a ring all-reduce,
2·(n−1)/n · bytes / bandwidth, on TPU v5e ICI and H100 NVLink 4 beside the step's compute time
at the chip's dense bf16 peak (a lower bound: 100 % of peak). The link and chip figures are
constants below, with their sources.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "runs",
    ["8:513:8", "64:513:64", "8:257:8", "8:513:16"],
    "devices:crop:global_batch of each compile.",
)
flags.DEFINE_list(
    "project_batches", ["1", "2", "4", "8"], "Per-device batches of the projected table."
)
flags.DEFINE_string("backbone", "resnet101", "DeepLab v3+ backbone.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype (params f32).")
flags.DEFINE_string("hlo_dir", None, "Also write each compiled HLO text here.")
flags.DEFINE_string("json_out", None, "Write the runs' results as JSON to this file.")
flags.DEFINE_string("child", None, "Internal: run one devices:crop:batch and print JSON.")

# Bytes per element of the HLO element types that can appear in a collective.
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


# Link and chip figures, per chip (quoted in benchmarks/README.md):
#   TPU v5e: "Interchip Interconnect BW 1600 Gbps" = 200 GB/s, in another version of the page
#     "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip) 400 GBps" (4 ICI ports,
#     2D torus), i.e. 200 GB/s each way; "Peak compute per chip (bf16) 197 TFLOPs" —
#     https://cloud.google.com/tpu/docs/v5e
#   H100 SXM5: NVLink 4 "900 GB/s" per GPU (both directions: 450 GB/s each way); BF16 tensor
#     core 989.4 TFLOP/s dense, 1,978.9 with 2:4 sparsity —
#     https://glennklockwood.com/garden/processors/h100 and NVIDIA's table ("1,979 TFLOPS*,
#     *with sparsity, 1/2 lower without") at
#     https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html
HARDWARE = {
    "TPU v5e (ICI 200 GB/s each way)": {"bandwidth": 200e9, "peak_flops": 197e12},
    "H100 SXM (NVLink 450 GB/s each way)": {"bandwidth": 450e9, "peak_flops": 989e12},
}


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group that opens at text[start] ('(')."""
    depth = 0
    for index in range(start, len(text)):
        depth += text[index] in "([{"
        depth -= text[index] in ")]}"
        if depth == 0:
            return index + 1
    return len(text)


def parse_instruction(line: str):
    """(name, result type, opcode, operand text) of one HLO instruction line, or None."""
    head = _HEAD.match(line)
    if head is None:
        return None
    rest = line[head.end() :]
    if rest.startswith("("):  # a tuple type
        type_end = _balanced(rest, 0)
    else:
        type_end = rest.find(" ")
    result_type, rest = rest[:type_end], rest[type_end:].lstrip()
    opcode = re.match(r"[a-z][\w\-]*", rest)
    if opcode is None or rest[opcode.end() : opcode.end() + 1] != "(":
        return None
    operands_end = _balanced(rest, opcode.end())
    return head["name"], result_type, opcode.group(0), rest[opcode.end() + 1 : operands_end - 1]


def array_bytes(type_text: str) -> int:
    """Bytes of an HLO type: an array `f32[3,3,64]{...}` or a tuple of them."""
    total = 0
    for match in _ARRAY.finditer(type_text):
        if match["dtype"] not in DTYPE_BYTES:
            continue
        elements = 1
        for dim in filter(None, match["dims"].split(",")):
            elements *= int(dim)
        total += elements * DTYPE_BYTES[match["dtype"]]
    return total


def collectives(hlo_text: str) -> list[dict]:
    """Every collective of an HLO module: op kind, operand bytes, result bytes, operand count.

    Async pairs count once, at their `-start`. Operands printed as bare `%names` (as jax 0.10
    prints a compiled module) are looked up among the module's instructions."""
    types, found = {}, []
    parsed = [parse_instruction(line) for line in hlo_text.splitlines()]
    for instruction in filter(None, parsed):
        types[instruction[0]] = instruction[1]
    for line, instruction in zip(hlo_text.splitlines(), parsed):
        if instruction is None:
            continue
        name, result_type, opcode, operand_text = instruction
        op = opcode.removesuffix("-start")
        if op not in COLLECTIVES:
            continue
        operands = [
            re.sub(r"/\*.*?\*/", "", part).strip() for part in _split_operands(operand_text)
        ]
        operand_bytes = 0
        for operand in operands:
            if "[" in operand:  # typed operand: `f32[64]{0} %x`
                operand_bytes += array_bytes(operand)
            else:
                operand_bytes += array_bytes(types.get(operand.lstrip("%"), ""))
        result_bytes = array_bytes(result_type)
        if opcode.endswith("-start") and op != "all-reduce":
            # An async start's result tuple holds the operands and the result (and contexts).
            result_bytes -= operand_bytes
        found.append(
            {
                "op": op,
                "name": name,
                "operand_bytes": operand_bytes,
                "result_bytes": result_bytes,
                "operands": len(operands),
                "replica_groups": _replica_groups(line),
            }
        )
    return found


def _split_operands(text: str) -> list[str]:
    """Top-level comma-separated operands (shapes hold commas inside brackets and braces)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part for part in (*parts, current) if part.strip()]


def _replica_groups(line: str) -> str:
    """The replica_groups attribute as printed (`{{0,1,...}}`, `[1,8]<=[8]`, `mesh[...] {...}`)."""
    match = re.search(r"replica_groups=(.*?)(?:, [a-z_]+=|$)", line)
    return match.group(1) if match else ""


def summarise(found: list[dict]) -> dict:
    """{op: {'count', 'operand_bytes', 'result_bytes', 'largest', 'tuple_ops', 'operands',
    'under_1mb'}} over `found` (tuple ops: collectives combining several arrays)."""
    summary = {}
    for op in COLLECTIVES:
        rows = [row for row in found if row["op"] == op]
        if rows:
            summary[op] = {
                "count": len(rows),
                "operand_bytes": sum(r["operand_bytes"] for r in rows),
                "result_bytes": sum(r["result_bytes"] for r in rows),
                "largest": max(r["operand_bytes"] for r in rows),
                "tuple_ops": sum(r["operands"] > 1 for r in rows),
                "operands": sum(r["operands"] for r in rows),
                "under_1mb": sum(r["operand_bytes"] < 2**20 for r in rows),
            }
    return summary


def ring_allreduce_seconds(num_bytes: float, devices: int, bandwidth: float) -> float:
    """Time of a bandwidth-bound ring all-reduce: each device sends 2·(n−1)/n of the data."""
    return 2 * (devices - 1) / devices * num_bytes / bandwidth


# ---------------------------------------------------------------------------------------
# One compile (the child process).


def analyse(devices: int, crop: int, batch: int, dtype: str, backbone: str, hlo_dir) -> dict:
    """Compiles the training loop's train step for abstract inputs on this process's devices and
    returns the collectives, FLOPs and state sizes (a JSON-serialisable dict)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    sys.path.insert(0, str(ROOT))
    from flaxseg import models
    from flaxseg.configs import deeplabv3plus_voc
    from flaxseg.serving.restore import DTYPES, build_model
    from flaxseg.training import loop
    from flaxseg.training import spec as spec_lib
    from flaxseg.training.sharding import create_mesh, replicated

    assert jax.device_count() == devices, (jax.device_count(), devices)
    config = deeplabv3plus_voc.get_config()
    config.model.backbone = backbone
    config.weight_decay = 1e-4  # the recipe's ResNet-101 variant
    config.crop_size = crop
    config.batch_size = batch
    config.dtype = dtype
    config.eval_batch_size = devices  # validate_config wants a multiple of the devices
    config = spec_lib.resolve_config(config)
    spec_lib.validate_config(config)
    spec = spec_lib.model_spec(config)
    model = build_model(spec, DTYPES[config.dtype])
    mesh = create_mesh()
    tx, _ = loop.create_optimizer(config)

    start = time.perf_counter()
    state = jax.eval_shape(lambda: loop.init_state(model, tx, config, mesh))
    # Every leaf replicated, as init_state's out_shardings and the loop's step expect.
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), state
    )
    data = NamedSharding(mesh, PartitionSpec("data"))
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((batch, crop, crop), jnp.int32, sharding=data),
    }
    key = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(config.seed), 1))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))
    train_fn = loop.jit_train_step(config, mesh)
    lowered = train_fn.lower(state, batch_shapes, key)
    lowered_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lowered_s
    hlo = compiled.as_text()
    if hlo_dir:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"train_step_{devices}dev_{crop}px_b{batch}.hlo.txt").write_text(hlo)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    def tree_bytes(tree):
        return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))

    found = collectives(hlo)
    return {
        "devices": devices,
        "crop": crop,
        "batch": batch,
        "dtype": dtype,
        "backbone": backbone,
        "params": models.count_params(state.params),
        "param_bytes": tree_bytes(state.params),
        "batch_stats_bytes": tree_bytes(state.batch_stats),
        "param_arrays": len(jax.tree.leaves(state.params)),
        "batch_stats_arrays": len(jax.tree.leaves(state.batch_stats)),
        "flops_per_device": float(cost.get("flops", float("nan"))),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan"))),
        "lower_s": lowered_s,
        "compile_s": compile_s,
        "hlo_chars": len(hlo),
        "summary": summarise(found),
        "largest_ops": sorted(found, key=lambda r: -r["operand_bytes"])[:5],
        "replica_groups": sorted({r["replica_groups"] for r in found})[:4],
        "jax": jax.__version__,
    }


# ---------------------------------------------------------------------------------------
# The parent: one subprocess per run, then the tables.


def run_child(run: str) -> dict:
    devices = int(run.split(":")[0])
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable,
        __file__,
        f"--child={run}",
        f"--dtype={FLAGS.dtype}",
        f"--backbone={FLAGS.backbone}",
    ]
    if FLAGS.hlo_dir:
        command.append(f"--hlo_dir={FLAGS.hlo_dir}")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Run {run} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:,.1f}"


def print_tables(results: list[dict]) -> None:
    print("\n### Collectives in the compiled train step (one device's program)\n")
    print(
        "| devices | crop | global batch | op | count | of which < 1 MiB | tuple ops (operands) "
        "| operand MB | largest MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for op, s in r["summary"].items():
            print(
                f"| {r['devices']} | {r['crop']} | {r['batch']} | {op} | {s['count']} | "
                f"{s['under_1mb']} | {s['tuple_ops']} ({s['operands']}) | "
                f"{_mb(s['operand_bytes'])} | {_mb(s['largest'])} |"
            )

    print("\n### Collective bytes against the state\n")
    print(
        "| devices | crop | global batch | params | param MB (f32) | BN stats MB | "
        "all collectives MB | ratio to params+BN | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        total = sum(s["operand_bytes"] for s in r["summary"].values())
        state_bytes = r["param_bytes"] + r["batch_stats_bytes"]
        print(
            f"| {r['devices']} | {r['crop']} | {r['batch']} | {r['params']:,} | "
            f"{_mb(r['param_bytes'])} | {_mb(r['batch_stats_bytes'])} | {_mb(total)} | "
            f"{total / state_bytes:.3f} | {r['compile_s']:.0f} |"
        )

    print("\n### Communication vs compute per step (ring all-reduce, dense bf16 peak)\n")
    print(
        "| hardware | devices | crop | per-device batch | all-reduce MB | comm ms | "
        "TFLOP per device | compute ms at peak | comm / compute |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        reduced = r["summary"].get("all-reduce", {}).get("operand_bytes", 0)
        for name, chip in HARDWARE.items():
            if name.startswith("H100") and r["devices"] > 8:
                continue  # 8 GPUs share one NVLink domain; more span nodes (InfiniBand)
            comm = ring_allreduce_seconds(reduced, r["devices"], chip["bandwidth"])
            compute = r["flops_per_device"] / chip["peak_flops"]
            print(
                f"| {name} | {r['devices']} | {r['crop']} | {r['batch'] // r['devices']} | "
                f"{_mb(reduced)} | {1e3 * comm:.2f} | {r['flops_per_device'] / 1e12:.3f} | "
                f"{1e3 * compute:.2f} | {comm / compute:.2f} |"
            )


def print_projection(results: list[dict], batches) -> None:
    """Comm / compute as the per-device batch grows: the bytes stay, the FLOPs scale."""
    base = {(r["devices"], r["crop"]): r for r in results if r["batch"] == r["devices"]}
    if not base:
        return
    print(
        "\n### Projected: per-device batch b (FLOPs = b × the per-device-batch-1 program's; "
        "all-reduce bytes unchanged)\n"
    )
    print("| hardware | devices | crop | b | comm ms | compute ms at peak | comm / compute |")
    print("|---|---|---|---|---|---|---|")
    for (devices, crop), r in sorted(base.items()):
        reduced = r["summary"].get("all-reduce", {}).get("operand_bytes", 0)
        for name, chip in HARDWARE.items():
            if name.startswith("H100") and devices > 8:
                continue
            comm = ring_allreduce_seconds(reduced, devices, chip["bandwidth"])
            for b in batches:
                compute = b * r["flops_per_device"] / chip["peak_flops"]
                print(
                    f"| {name} | {devices} | {crop} | {b} | {1e3 * comm:.2f} | "
                    f"{1e3 * compute:.2f} | {comm / compute:.2f} |"
                )


def main(argv):
    del argv
    if FLAGS.child:
        devices, crop, batch = (int(v) for v in FLAGS.child.split(":"))
        result = analyse(devices, crop, batch, FLAGS.dtype, FLAGS.backbone, FLAGS.hlo_dir)
        print(json.dumps(result))
        return
    results = []
    for run in FLAGS.runs:
        print(f"# compiling {run} (devices:crop:global batch) ...", flush=True)
        try:
            results.append(run_child(run))
        except RuntimeError as error:  # say why and go on with the other runs
            print(f"#   {error}", flush=True)
            continue
        r = results[-1]
        print(
            f"#   lowered in {r['lower_s']:.0f} s, compiled in {r['compile_s']:.0f} s, "
            f"HLO {r['hlo_chars'] / 1e6:.1f} M chars, replica groups {r['replica_groups']}",
            flush=True,
        )
    if not results:
        return
    first = results[0]
    print(
        f"\n# DeepLab v3+ ({first['backbone']}, OS 16), {first['dtype']} compute, f32 params, "
        f"jax {first['jax']}, {first['param_arrays']} parameter arrays, "
        f"{first['batch_stats_arrays']} BatchNorm statistic arrays"
    )
    print_tables(results)
    print_projection(results, [int(b) for b in FLAGS.project_batches])
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
