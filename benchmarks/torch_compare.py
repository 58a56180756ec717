"""What the flaxseg-vs-PyTorch benchmarks share: importing torchvision on CPU torch, one timing
rule, the two train/eval step pairs (same data, same SGD, same loss) and the table.

Both sides are timed after a warm-up call (JAX compiles there) as the mean of ``steps`` calls.
"""

import functools
import sys
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg import losses
from flaxseg.training import optim, steps
from flaxseg.training import state as state_lib


def import_torchvision():
    """torchvision on a CPU-only torch: its compiled-op registrations are stubbed (DESIGN.md)."""
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision

    return torchvision


def timed(fn, steps_to_time: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(steps_to_time):
        fn()
    return (time.perf_counter() - start) / steps_to_time


def random_batch(batch_size: int, height: int, width: int, num_classes: int, seed: int = 0):
    """NHWC float32 images and int32 labels (numpy)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch_size, height, width, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, (batch_size, height, width)).astype(np.int32)
    return images, labels


def torch_steps(
    module,
    images,
    labels,
    aux_loss_weight: float = 0.0,
    lr: float = 0.01,
    *,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
):
    """(train, eval) closures for a torch segmentation ``module``: SGD momentum 0.9, weight
    decay 1e-4, cross-entropy ignoring 255; a dict output's 'aux' adds ``aux_loss_weight`` × CE.

    ``device`` ('cpu', 'cuda'), ``amp`` (autocast to bfloat16: PyTorch's mixed precision, the
    counterpart of flaxseg's ``dtype=bfloat16``), ``channels_last`` (NHWC memory format) and
    ``compile`` (``torch.compile``) are the GPU comparison's settings; each call waits for the
    device to finish."""
    import contextlib

    import torch

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(device, memory_format=memory_format)
    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    images_t = images_t.contiguous(memory_format=memory_format)
    labels_t = torch.from_numpy(labels.astype(np.int64)).to(device)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    forward = torch.compile(module) if compile else module

    def autocast():
        if not amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)

    def synchronize():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def train():
        module.train()
        optimizer.zero_grad()
        with autocast():
            out = forward(images_t)
            if isinstance(out, dict):
                loss = criterion(out["out"].float(), labels_t)
                if "aux" in out:
                    loss = loss + aux_loss_weight * criterion(out["aux"].float(), labels_t)
            else:
                loss = criterion(out.float(), labels_t)
        loss.backward()
        optimizer.step()
        synchronize()

    def evaluate():
        module.eval()
        with torch.no_grad(), autocast():
            forward(images_t)
        synchronize()

    return train, evaluate


class FlaxsegSteps(NamedTuple):
    """flaxseg's jitted steps and closures that run them on one fixed batch."""

    train: Callable[[], None]  # one SGD step (the state is donated and replaced)
    evaluate: Callable[[], None]  # one inference forward
    train_jit: Any  # jax.jit(train_step): .lower(*train_args()).compile() for HLO / memory
    train_args: Callable[[], tuple]
    eval_jit: Any
    eval_args: Callable[[], tuple]


def flaxseg_step_fns(
    model, variables, images, labels, num_classes: int, aux_loss_weight=0.0, dtype=None
) -> FlaxsegSteps:
    """flaxseg's train step and inference forward with the same recipe as ``torch_steps``;
    ``dtype`` (e.g. ``jnp.bfloat16``) replaces the model's compute dtype."""
    if dtype is not None:
        model = model.clone(dtype=dtype)
    # Copies: the train step donates its state, and the caller may build further variants.
    state = state_lib.TrainState.create(
        apply_fn=model.apply,
        params=jax.tree.map(jnp.array, variables["params"]),
        tx=optim.create_optimizer(learning_rate=0.01),
        batch_stats=jax.tree.map(jnp.array, variables.get("batch_stats", {})),
    )
    train_step = jax.jit(
        functools.partial(
            steps.train_step,
            loss_fn=losses.build_loss("cross_entropy", num_classes=num_classes),
            ignore_label=255,
            aux_loss_weight=aux_loss_weight,
        ),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        lambda s, x: s.apply_fn({"params": s.params, "batch_stats": s.batch_stats}, x, train=False)
    )
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    key = jax.random.key(0)
    holder = {"state": state}

    def train():
        holder["state"], metrics = train_step(holder["state"], batch, key)
        jax.block_until_ready(metrics)

    def evaluate():
        jax.block_until_ready(eval_step(holder["state"], batch["image"]))

    return FlaxsegSteps(
        train,
        evaluate,
        train_step,
        lambda: (holder["state"], batch, key),
        eval_step,
        lambda: (holder["state"], batch["image"]),
    )


def flaxseg_steps(model, variables, images, labels, num_classes: int, aux_loss_weight=0.0):
    """(train, eval) closures for a flaxseg ``model`` with the same recipe as ``torch_steps``."""
    fns = flaxseg_step_fns(model, variables, images, labels, num_classes, aux_loss_weight)
    return fns.train, fns.evaluate


TORCHVISION_ARCHS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50")


class TorchSteps(NamedTuple):
    train: Callable[[], None]
    evaluate: Callable[[], None]
    module: Any


class Pair(NamedTuple):
    """The same network, weights and batch in PyTorch and in flaxseg."""

    name: str
    torch: TorchSteps
    jax: FlaxsegSteps
    num_params: int
    jax_inputs: tuple  # flaxseg_step_fns's arguments, to build more step variants


def torchvision_pair(arch: str, batch_size: int, size: int, aux_loss_weight: float = 0.5) -> Pair:
    """torchvision's ``arch`` (random weights, aux head) and its flaxseg twin
    (``weights.convert_torchvision``), with train/eval steps on one random batch."""
    import torch

    from flaxseg import weights

    torchvision = import_torchvision()
    torch.manual_seed(0)
    builder = getattr(torchvision.models.segmentation, arch)
    reference = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    model, variables = weights.convert_torchvision(arch, reference.state_dict())
    return _pair(
        f"torchvision {arch}", reference, model, variables, batch_size, size, aux_loss_weight
    )


def _pair(name, reference, model, variables, batch_size, size, aux_loss_weight=0.0) -> Pair:
    """The torch ``reference`` and its flaxseg twin, with steps on one random 21-class batch."""
    from flaxseg import models

    images, labels = random_batch(batch_size, size, size, 21)
    torch_train, torch_eval = torch_steps(reference, images, labels, aux_loss_weight)
    inputs = (model, variables, images, labels, 21, aux_loss_weight)
    return Pair(
        name,
        TorchSteps(torch_train, torch_eval, reference),
        flaxseg_step_fns(*inputs),
        models.count_params(variables),
        inputs,
    )


def smp_pair(arch: str, encoder: str, batch_size: int, size: int) -> Pair:
    """smp's ``arch`` on ``encoder`` (random weights) and its flaxseg twin
    (``weights.convert_smp``), with train/eval steps on one random batch."""
    import torch

    from flaxseg import weights

    import_torchvision()
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    reference = getattr(smp, arch)(encoder, encoder_weights=None, classes=21)
    model, variables = weights.convert_smp(arch, encoder, reference.state_dict())
    return _pair(f"smp {arch}({encoder})", reference, model, variables, batch_size, size)


def print_table(title: str, rows, batch_size: int) -> None:
    """``rows``: (name, train seconds per step, eval seconds per step[, extra columns dict])."""
    print(f"# {title}")
    print(f"| {'model':<40} | {'train img/s':>11} | {'eval img/s':>10} |")
    print(f"|{'-' * 42}|{'-' * 13}|{'-' * 12}|")
    for name, train_s, eval_s in rows:
        print(f"| {name:<40} | {batch_size / train_s:>11.2f} | {batch_size / eval_s:>10.2f} |")


# ----------------------------------------------------------------------------- one process each
# PyTorch's OpenMP threads and XLA's thread pool slow each other down badly when they share a
# process on a 2-core machine (measured: torchvision DeepLab v3-R50's train step 1.7 s alone,
# 11 s interleaved with flaxseg calls in one process). So each framework runs in its own worker
# process, and the parent alternates their calls: interleaved (load hits both alike) without
# sharing threads.


def parse_spec(spec: str) -> tuple[str, ...]:
    """``'tv:<arch>'`` -> ('tv', arch); ``'smp:<Arch>:<encoder>'`` -> ('smp', Arch, encoder)."""
    kind, *rest = spec.split(":")
    if (kind == "tv" and len(rest) == 1 and rest[0] in TORCHVISION_ARCHS) or (
        kind == "smp" and len(rest) == 2
    ):
        return (kind, *rest)
    raise ValueError(
        f"Model {spec!r} is not tv:<{'|'.join(TORCHVISION_ARCHS)}> or smp:<Arch>:<encoder>."
    )


def build_pair(spec: str, batch_size: int, size: int) -> Pair:
    """``torchvision_pair`` or ``smp_pair`` for a model spec (``parse_spec``)."""
    kind, *rest = parse_spec(spec)
    if kind == "tv":
        return torchvision_pair(rest[0], batch_size, size)
    return smp_pair(rest[0], rest[1], batch_size, size)


def build_torch_steps(spec: str, batch_size: int, size: int, **options):
    """(train, evaluate) of the torch model only (no flaxseg state in the process); ``options``
    go to ``torch_steps`` (device, amp, channels_last, compile)."""
    import torch

    kind, *rest = parse_spec(spec)
    torchvision = import_torchvision()
    torch.manual_seed(0)
    images, labels = random_batch(batch_size, size, size, 21)
    if kind == "tv":
        builder = getattr(torchvision.models.segmentation, rest[0])
        module = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
        return torch_steps(module, images, labels, 0.5, **options)
    import segmentation_models_pytorch as smp

    module = getattr(smp, rest[0])(rest[1], encoder_weights=None, classes=21)
    return torch_steps(module, images, labels, **options)


def serve_steps(
    train: Callable[[], None], evaluate: Callable[[], None], info: dict | None = None
) -> None:
    """Worker loop: warm both calls up, print ``info`` (a JSON line) and 'ready', then per stdin
    line 'train' / 'eval' print the call's seconds; 'quit' ends."""
    import json

    calls = {"train": train, "eval": evaluate}
    for fn in calls.values():
        fn()
    print(json.dumps(info or {}), flush=True)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            return
        start = time.perf_counter()
        calls[command]()
        print(f"{time.perf_counter() - start:.6f}", flush=True)


class StepWorker:
    """A worker process (``command`` runs ``serve_steps``) timing one framework's calls."""

    def __init__(self, command: list[str], env: dict | None = None):
        import subprocess

        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = {}  # the worker's JSON line before 'ready' (e.g. the step's FLOPs)
        for line in self.process.stdout:
            if line.startswith("{"):
                import json

                self.info = json.loads(line)
            if line.strip() == "ready":
                return
        raise RuntimeError(f"Worker {' '.join(command)} exited before it was ready.")

    def time(self, call: str) -> float:
        self.process.stdin.write(call + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait()
