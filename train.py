"""Trains a segmentation model.

    python train.py --model=fcn8s --dataset=synthetic --workdir=/tmp/fcn8s
    python train.py --config=flaxseg/configs/deeplabv3plus_voc.py --manual_dir=~/voc \\
        --workdir=runs/dlv3p

Without --config the defaults of flaxseg/configs/default.py apply; --config names a recipe file
(flaxseg/configs/*_voc.py). Flags override the config; every field is --config.<field>=<value>.
Running the same command again resumes from the latest checkpoint in --workdir.
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from flaxseg.training import cli, distributed, loop, reporting

FLAGS = flags.FLAGS
try:  # the flag applies --config.<field> overrides as it is defined
    config_flags.DEFINE_config_file(
        "config",
        str(Path(__file__).resolve().parent / "flaxseg" / "configs" / "default.py"),
        "Training configuration file (a recipe in flaxseg/configs/).",
        lock_config=True,
    )
except (AttributeError, KeyError) as error:
    cli.unknown_config_field(error, sys.argv)
flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and TensorBoard logs; default runs/<model>."
)
flags.DEFINE_string("model", None, "Model name (flaxseg.models.list_models()).")
flags.DEFINE_string("backbone", None, "Backbone name; default: the model's own.")
flags.DEFINE_string(
    "model_kwargs",
    None,
    "JSON dict of extra model arguments, merged into the config's, e.g. '{\"base_width\": 16}'.",
)
flags.DEFINE_string("dataset", None, "Dataset name (flaxseg.data.list_datasets()).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
flags.DEFINE_string("manual_dir", None, "Folder holding the dataset's archives or folders.")
flags.DEFINE_integer("steps", None, "Number of training steps.")
flags.DEFINE_integer("batch_size", None, "Global batch size.")
flags.DEFINE_integer("crop_size", None, "Square training crop size in pixels.")
flags.DEFINE_float("lr", None, "Base learning rate.")
flags.DEFINE_integer("output_stride", None, "Output stride (DeepLab/PSPNet models): 8, 16 or 32.")
flags.DEFINE_string(
    "pretrained", None, "Backbone weights (.pth/.pt/.safetensors, torchvision/timm)."
)
flags.DEFINE_string(
    "init_from", None, "Workdir of another run whose matching parameters start this one."
)
flags.DEFINE_integer(
    "seed", None, "Random seed (initialisation, data order, augmentation, dropout)."
)
flags.DEFINE_string(
    "adversarial", None, "Adversarial training with this input encoding: basic, product, scaling."
)
flags.DEFINE_string("adversary", None, "Adversary network (flaxseg.models.adversarial).")
flags.DEFINE_string(
    "parallel",
    None,
    "Data parallelism: 'jit' (one program over the device mesh, the default) or 'pmap' "
    "(jax.pmap with cross-device sums and synchronised BatchNorm; the same update).",
)
flags.DEFINE_float("adv_weight", None, "Weight λ of the segmenter's adversarial loss.")
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id

_OVERRIDES = (
    "model",
    "backbone",
    "model_kwargs",
    "dataset",
    "data_dir",
    "manual_dir",
    "steps",
    "batch_size",
    "crop_size",
    "lr",
    "seed",
    "output_stride",
    "pretrained",
    "init_from",
    "adversarial",
    "adversary",
    "adv_weight",
    "parallel",
)


def main(argv):
    del argv
    cli.enable_compilation_cache()
    cli.quiet_library_logs()
    cli.run_or_exit("train.py", distributed.initialize_from_flags, "train.py")
    overrides = {name: FLAGS[name].value for name in _OVERRIDES}
    config = cli.run_or_exit("train.py", cli.apply_overrides, FLAGS.config, overrides)
    workdir = FLAGS.workdir or f"runs/{config.model}"
    cli.run_or_exit("train.py", distributed.prepare_dataset, config)  # process 0 first
    summary = cli.run_or_exit("train.py", loop.train_and_evaluate, config, workdir)
    if not summary.get("preempted"):
        reporting.say(f"Checkpoints and TensorBoard files are in {Path(workdir).absolute()}.")
    reporting.say(summary["report"])  # process 0 only


if __name__ == "__main__":
    app.run(main)
