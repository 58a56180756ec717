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
cli.check_config_groups(sys.argv)
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
for name, kind, help_text, _ in cli.SHORTCUTS:  # --model, --backbone, --model_kwargs, --steps, ...
    cli.FLAG_DEFINERS[kind](name, None, help_text)
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id


def main(argv):
    del argv
    cli.enable_compilation_cache()
    cli.quiet_library_logs()
    cli.run_or_exit("train.py", distributed.initialize_from_flags, "train.py")
    overrides = {name: FLAGS[name].value for name in cli.FIELDS}
    config = cli.run_or_exit("train.py", cli.apply_overrides, FLAGS.config, overrides)
    workdir = FLAGS.workdir or f"runs/{config.model.name}"
    cli.run_or_exit("train.py", distributed.prepare_dataset, config)  # process 0 first
    summary = cli.run_or_exit("train.py", loop.train_and_evaluate, config, workdir)
    if not summary.get("preempted"):
        reporting.say(f"Checkpoints and TensorBoard files are in {Path(workdir).absolute()}.")
    reporting.say(summary["report"])  # process 0 only


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
