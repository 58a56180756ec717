"""Predicts segmentation maps for images with the model of a trained workdir.

python predict.py --workdir=/tmp/deeplabv3plus --out=/tmp/masks photo.jpg more/ [--save_probs]
    [--checkpoint=latest|best|STEP] [--scales=0.75,1.0,1.25] [--flip] [--window=513] [--crf]

For each image: <name>.png (palette PNG of class indices, the VOC colour map), <name>_overlay.png
(the image blended with the class colours, with a legend) and, with --save_probs,
<name>_probs.npy (float32 [H, W, C]). Unreadable files are named and skipped (exit code 1).
"""

import sys

from absl import app, flags

from flaxseg.serving import predict as predict_lib
from flaxseg.serving.options import parse_scales
from flaxseg.training import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
flags.DEFINE_string("out", None, "Folder to write the predictions to.", required=True)
flags.DEFINE_string(
    "checkpoint", "latest", "'latest', 'best' (by validation mIoU) or a step number."
)
flags.DEFINE_bool("save_probs", False, "Also write class probabilities as <name>_probs.npy.")
flags.DEFINE_float("alpha", 0.5, "Weight of the class colours in the overlay, in [0, 1].")
flags.DEFINE_list("scales", ["1.0"], "Test-time scales; softmax averaged over them.")
flags.DEFINE_boolean("flip", False, "Also average the horizontally flipped image's softmax.")
flags.DEFINE_integer("window", None, "Sliding-window side in pixels (default: whole images).")
flags.DEFINE_float("overlap", 0.33, "Overlap of neighbouring sliding windows, in [0, 1).")
flags.DEFINE_boolean("crf", False, "Refine the probabilities with the dense CRF (DeepLab v2).")


def _predict(paths):
    return predict_lib.predict_files(
        FLAGS.workdir,
        paths,
        FLAGS.out,
        checkpoint=FLAGS.checkpoint,
        save_probs=FLAGS.save_probs,
        alpha=FLAGS.alpha,
        scales=parse_scales(FLAGS.scales),
        flip=FLAGS.flip,
        window=FLAGS.window,
        overlap=FLAGS.overlap,
        crf=FLAGS.crf,
    )


def main(argv):
    cli.enable_compilation_cache()
    cli.quiet_library_logs()
    summary = cli.run_or_exit("predict.py", _predict, argv[1:])
    print(
        f"checkpoint step {summary['step']}: wrote {len(summary['written'])} predictions to "
        f"{FLAGS.out}"
        + (f", skipped {len(summary['skipped'])} unreadable" if summary["skipped"] else "")
    )
    if summary["skipped"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
