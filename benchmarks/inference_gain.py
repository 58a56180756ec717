"""What test-time augmentation and the dense CRF add to a DeepLab v1 model's validation mIoU.

Trains a small DeepLab-LargeFOV (DeepLab v1) on the synthetic VOC-layout set (or reuses the
checkpoint already in `--workdir`), then evaluates it five ways on the synthetic validation
set — plain, flip, multi-scale + flip, CRF, multi-scale + flip + CRF — exactly as eval.py's
`--scales/--flip/--crf` do, and prints a Markdown table of val mIoU, the change against plain,
the eval step's compile count and the seconds each evaluation took.

    python benchmarks/inference_gain.py --workdir=/tmp/flaxseg_inference_gain

The CRF's parameters are DeepLab v2's VOC values (flaxseg.inference.dense_crf defaults), not
tuned for the synthetic scenes; numbers from a tiny CPU model say what TTA and CRF do *here*.
"""

import json
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxseg.configs import deeplabv1_largefov_voc, default  # noqa: E402
from flaxseg.serving import checkpoints  # noqa: E402
from flaxseg.serving.options import InferenceOptions, parse_scales  # noqa: E402
from flaxseg.training import cli, evaluation, loop  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/flaxseg_inference_gain", "Training workdir (reused).")
flags.DEFINE_string("backbone", "vgg16_bn", "DeepLab v1 backbone ('vgg16' or 'vgg16_bn').")
flags.DEFINE_string(
    "model_kwargs",
    '{"base_width": 8, "fc_channels": 128, "dropout_rate": 0.1}',
    "DeepLab v1 arguments (tiny).",
)
flags.DEFINE_integer("steps", 1500, "Training steps (skipped when the workdir has a checkpoint).")
flags.DEFINE_integer("batch_size", 8, "Training batch size.")
flags.DEFINE_integer("crop_size", 96, "Training crop size.")
flags.DEFINE_float("lr", 0.1, "SGD learning rate (poly schedule).")
flags.DEFINE_list("scales", ["0.5", "0.75", "1.0", "1.25", "1.5", "1.75"], "TTA scales.")
flags.DEFINE_integer("seed", 0, "Training seed.")


def train(workdir: Path) -> float:
    config = cli.apply_overrides(
        default.get_config(),
        {
            "model": "deeplabv1",
            "backbone": FLAGS.backbone,
            "model_kwargs": FLAGS.model_kwargs,
            "steps": FLAGS.steps,
            "batch_size": FLAGS.batch_size,
            "crop_size": FLAGS.crop_size,
            "lr": FLAGS.lr,
            "seed": FLAGS.seed,
        },
    )
    config.dataset = "synthetic"
    # The paper's fc8 ×10 (bias ×20) and bias ×2 learning rates: from scratch, the N(0, 0.01²)
    # classifier otherwise keeps the whole net at the background prior for many steps.
    config.param_groups = deeplabv1_largefov_voc.get_config().param_groups
    config.eval_bucket_multiple = 160  # synthetic images are 96..160 px: one eval shape
    config.progress_bar = False
    config.log_every = max(1, FLAGS.steps // 10)
    config.eval_every = FLAGS.steps
    config.checkpoint_every = FLAGS.steps
    start = time.perf_counter()
    loop.train_and_evaluate(config, workdir)
    return time.perf_counter() - start


def main(argv):
    del argv
    cli.enable_compilation_cache()
    cli.quiet_library_logs()
    workdir = Path(FLAGS.workdir)
    saved = checkpoints.checkpoint_dir(workdir)
    trained = saved.is_dir() and any(path.name.isdigit() for path in saved.iterdir())
    train_seconds = None if trained else train(workdir)
    scales = parse_scales(FLAGS.scales)
    variants = [
        ("plain", InferenceOptions()),
        ("flip", InferenceOptions(flip=True)),
        ("multi-scale + flip", InferenceOptions(scales=scales, flip=True)),
        ("CRF", InferenceOptions(crf=True)),
        (
            "multi-scale + flip + CRF",
            InferenceOptions(scales=scales, flip=True, crf=True),
        ),
    ]
    rows = []
    for name, options in variants:
        start = time.perf_counter()
        summary = evaluation.evaluate_workdir(workdir, options=options)
        rows.append(
            {
                "inference": name,
                "miou": summary["miou"],
                "compilations": summary["compilations"],
                "seconds": time.perf_counter() - start,
                "step": summary["step"],
            }
        )
        print(f"{name}: mIoU {summary['miou']:.4f}", flush=True)
    trained_note = (
        f"trained here in {train_seconds:.0f} s" if train_seconds else "checkpoint reused"
    )
    print(
        f"\nDeepLab v1 ({FLAGS.backbone}, {FLAGS.model_kwargs}), step {rows[0]['step']} "
        f"({trained_note}); synthetic val (100 images); scales {','.join(map(str, scales))}"
    )
    print(
        f"| {'inference':<26} | {'val mIoU':>8} | {'Δ mIoU':>7} | {'compiles':>8} | "
        f"{'seconds':>7} |"
    )
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 9}|")
    for row in rows:
        delta = row["miou"] - rows[0]["miou"]
        print(
            f"| {row['inference']:<26} | {row['miou']:>8.4f} | {delta:>+7.4f} | "
            f"{row['compilations']:>8} | {row['seconds']:>7.0f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    app.run(main)
