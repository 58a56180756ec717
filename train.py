"""Trains a segmentation model.

    python train.py --model=fcn8s --dataset=synthetic --workdir=/tmp/fcn8s
    python train.py --model=deeplabv3plus --dataset=voc2012_aug --manual_dir=~/voc --workdir=runs/dlv3p

Running the same command again resumes from the latest checkpoint in --workdir.
Every field of flaxseg/configs/default.py can be set with --config.<field>=<value>.
"""

from absl import app, flags
from ml_collections import config_flags

from flaxseg.configs import default
from flaxseg.training import cli, loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_dict("config", default.get_config(), "Training configuration.")
flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and TensorBoard logs.", required=True
)
flags.DEFINE_string("model", None, "Model name (flaxseg.models.list_models()).")
flags.DEFINE_string("backbone", None, "Backbone name; default: the model's own.")
flags.DEFINE_string(
    "model_kwargs", None, "JSON dict of extra model arguments, e.g. '{\"base_width\": 16}'."
)
flags.DEFINE_string("dataset", None, "voc2012, voc2012_aug or synthetic.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
flags.DEFINE_string(
    "manual_dir", None, "Folder holding the VOC / SBD archives or their extracted folders."
)
flags.DEFINE_integer("steps", None, "Number of training steps.")
flags.DEFINE_integer("batch_size", None, "Global batch size.")
flags.DEFINE_integer("crop_size", None, "Square training crop size in pixels.")
flags.DEFINE_float("lr", None, "Base learning rate of the poly schedule.")
flags.DEFINE_integer("output_stride", None, "Output stride (DeepLab/PSPNet models): 8, 16 or 32.")
flags.DEFINE_string(
    "pretrained", None, "Backbone weights (.pth/.pt/.safetensors, torchvision/timm)."
)
flags.DEFINE_integer(
    "seed", None, "Random seed (initialisation, data order, augmentation, dropout)."
)

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
)


def main(argv):
    del argv
    cli.enable_compilation_cache()
    cli.quiet_library_logs()
    config = FLAGS.config
    for name in _OVERRIDES:
        if FLAGS[name].value is not None:
            config[name] = FLAGS[name].value
    summary = cli.run_or_exit("train.py", loop.train_and_evaluate, config, FLAGS.workdir)
    print(summary["report"])


if __name__ == "__main__":
    app.run(main)
