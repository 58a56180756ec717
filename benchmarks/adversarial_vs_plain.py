"""Adversarial training (Luc et al. 2016) against plain training: same model, data, steps, seeds.

Trains the model on the synthetic VOC-layout set with the plain loss and with `--adversarial`,
once per seed for each, and prints a table of validation mIoU over all pixels and over a trimap
band of `--band` pixels around the ground-truth class boundaries (where the paper expects the
adversarial term to help: it sees label maps as a whole and penalises implausible shapes), per
seed and as mean ± standard deviation (and min–max) over the seeds.

    python benchmarks/adversarial_vs_plain.py --steps=300 --seeds=0,1,2 --workdir=/tmp/adv_bench

λ and the adversary's input stride default to the adversary's paper values
(`flaxseg.models.adversarial.PAPER_DEFAULTS`), λ on the paper's scale (`adv_normalization`).
Numbers on CPU with tiny widths say whether the term helps *this* setting, not the paper's.
"""

import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxseg.configs import default  # noqa: E402
from flaxseg.training import cli, evaluation, loop, spec  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/flaxseg_adversarial_benchmark", "Where both runs go.")
flags.DEFINE_string("model", "deeplabv3plus", "Segmenter.")
flags.DEFINE_string("backbone", "resnet50", "Its backbone.")
flags.DEFINE_string(
    "model_kwargs",
    '{"base_width": 8, "aspp_channels": 64, "decoder_channels": 64, "low_level_channels": 16}',
    "Segmenter arguments (the README's quick-start model).",
)
flags.DEFINE_integer("steps", 300, "Training steps of each run.")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_integer("crop_size", 96, "Crop size.")
flags.DEFINE_float("lr", 0.05, "Segmenter learning rate.")
flags.DEFINE_string("adversarial", "scaling", "Encoding: basic, product or scaling.")
flags.DEFINE_string("adversary", "largefov_light", "Adversary network.")
flags.DEFINE_string("adversary_kwargs", '{"width": 0.25}', "Adversary arguments.")
flags.DEFINE_float("adv_weight", None, "λ (unset: the adversary's paper value).")
flags.DEFINE_string("adv_normalization", "pixels", "λ's scale: pixels (the paper's) or images.")
flags.DEFINE_integer(
    "adv_input_stride", None, "The adversary's input stride (unset: the adversary's paper value)."
)
flags.DEFINE_integer("adv_pretrain_steps", 50, "Adversary-only steps first.")
flags.DEFINE_integer(
    "band", 4, "Trimap half-width in pixels around class boundaries (0: no trimap evaluation)."
)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each trains one plain and one adversarial run.")


def band_labels(labels: np.ndarray, band: int, ignore_label: int) -> np.ndarray:
    """Labels kept within `band` pixels of a ground-truth class boundary, `ignore_label`
    elsewhere (padding and void stay ignored)."""
    kept = np.full_like(labels, ignore_label)
    for i, label in enumerate(labels):
        edges = np.zeros(label.shape, bool)
        edges[:, 1:] |= label[:, 1:] != label[:, :-1]
        edges[1:, :] |= label[1:, :] != label[:-1, :]
        near = scipy.ndimage.binary_dilation(edges, iterations=band)
        kept[i] = np.where(near, label, ignore_label)
    return kept


def run(name: str, overrides: dict) -> dict:
    config = spec.resolve_config(cli.apply_overrides(default.get_config(), overrides))
    config.dataset = "synthetic"
    config.progress_bar = False
    config.log_every = max(1, FLAGS.steps // 10)
    config.eval_every = FLAGS.steps
    config.checkpoint_every = FLAGS.steps
    start = time.perf_counter()
    summary = loop.train_and_evaluate(config, Path(FLAGS.workdir) / name)
    seconds = time.perf_counter() - start
    return {
        "run": name,
        "miou": summary["miou"],
        "trimap_miou": evaluation.evaluate_workdir(
            Path(FLAGS.workdir) / name,
            label_transform=functools.partial(
                band_labels, band=FLAGS.band, ignore_label=config.ignore_label
            ),
        )["miou"]
        if FLAGS.band
        else float("nan"),
        "seconds": seconds,
        "adv_weight": config.adv_weight if config.adversarial else None,
        "adv_input_stride": config.adv_input_stride if config.adversarial else None,
    }


def summarise(values) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f} " + (
        f"({values.min():.4f}–{values.max():.4f})"
    )


def main(argv):
    del argv
    cli.enable_compilation_cache()
    cli.quiet_library_logs()
    seeds = [int(seed) for seed in FLAGS.seeds]
    common = {
        "model": FLAGS.model,
        "backbone": FLAGS.backbone,
        "model_kwargs": FLAGS.model_kwargs,
        "steps": FLAGS.steps,
        "batch_size": FLAGS.batch_size,
        "crop_size": FLAGS.crop_size,
        "lr": FLAGS.lr,
    }
    adversarial = {
        **common,
        "adversarial": FLAGS.adversarial,
        "adversary": FLAGS.adversary,
        "adversary_kwargs": FLAGS.adversary_kwargs,
        "adv_weight": FLAGS.adv_weight,
        "adv_normalization": FLAGS.adv_normalization,
        "adv_input_stride": FLAGS.adv_input_stride,
        "adv_pretrain_steps": FLAGS.adv_pretrain_steps,
    }
    rows = []
    for seed in seeds:
        rows.append(run(f"plain_seed{seed}", {**common, "seed": seed}))
        rows.append(
            run(f"adversarial_{FLAGS.adversarial}_seed{seed}", {**adversarial, "seed": seed})
        )
        print(json.dumps(rows[-2:]), flush=True)
    adv = next(row for row in rows if row["adv_weight"] is not None)
    print(
        f"\n{FLAGS.model} ({FLAGS.backbone}), {FLAGS.steps} steps, batch {FLAGS.batch_size}, "
        f"crop {FLAGS.crop_size}, seeds {','.join(map(str, seeds))}; adversary {FLAGS.adversary} "
        f"{FLAGS.adversary_kwargs}, {FLAGS.adversarial} encoding, λ {adv['adv_weight']} "
        f"({FLAGS.adv_normalization}), input stride {adv['adv_input_stride']}, "
        f"{FLAGS.adv_pretrain_steps} pre-training steps; trimap band {FLAGS.band} px"
    )
    print(f"| {'run':<28} | {'val mIoU':>8} | {'trimap mIoU':>11} | {'seconds':>7} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 13}|{'-' * 9}|")
    for row in rows:
        print(
            f"| {row['run']:<28} | {row['miou']:>8.4f} | {row['trimap_miou']:>11.4f} | "
            f"{row['seconds']:>7.0f} |"
        )
    print(f"\nOver {len(seeds)} seeds, mean ± std (min–max):")
    print("| run | val mIoU | trimap mIoU | seconds |")
    print("|---|---|---|---|")
    for kind, chosen in (
        ("plain", [row for row in rows if row["adv_weight"] is None]),
        (f"adversarial ({FLAGS.adversarial})", [r for r in rows if r["adv_weight"] is not None]),
    ):
        seconds = [row["seconds"] for row in chosen]
        print(
            f"| {kind} | {summarise([row['miou'] for row in chosen])} | "
            f"{summarise([row['trimap_miou'] for row in chosen])} | "
            f"{min(seconds):.0f}–{max(seconds):.0f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    app.run(main)
