"""Evaluates the checkpoint in a workdir: per-class IoU, pixel accuracy and, last, `mIoU: 0.xxxx`.

python eval.py --workdir=/tmp/fcn8s [--split=validation] [--checkpoint=latest|best|STEP]
    [--scales=0.5,0.75,1.0,1.25,1.5,1.75] [--flip] [--window=513 --overlap=0.33] [--crf]
"""

from absl import app, flags

from flaxseg.serving.options import InferenceOptions, parse_scales
from flaxseg.training import cli, distributed, evaluation, reporting

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
flags.DEFINE_string("split", "validation", "Dataset split to evaluate.")
flags.DEFINE_string(
    "checkpoint", "latest", "'latest', 'best' (by validation mIoU) or a step number."
)
flags.DEFINE_string("data_dir", None, "TFDS data_dir, if different from training.")
flags.DEFINE_string("manual_dir", None, "Folder with the VOC archives, if different from training.")
flags.DEFINE_integer("batch_size", None, "Global evaluation batch size.")
flags.DEFINE_integer("output_stride", None, "Evaluate at another output stride (DeepLab models).")
flags.DEFINE_list("scales", ["1.0"], "Test-time scales; softmax averaged over them.")
flags.DEFINE_boolean("flip", False, "Also average the horizontally flipped images' softmax.")
flags.DEFINE_integer("window", None, "Sliding-window side in pixels (default: whole images).")
flags.DEFINE_float("overlap", 0.33, "Overlap of neighbouring sliding windows, in [0, 1).")
flags.DEFINE_boolean("crf", False, "Refine the probabilities with the dense CRF.")
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id


def _evaluate():
    options = InferenceOptions(
        scales=parse_scales(FLAGS.scales),
        flip=FLAGS.flip,
        window=FLAGS.window,
        overlap=FLAGS.overlap,
        crf=FLAGS.crf,
    )
    return evaluation.evaluate_workdir(
        FLAGS.workdir,
        split=FLAGS.split,
        checkpoint=FLAGS.checkpoint,
        data_dir=FLAGS.data_dir,
        manual_dir=FLAGS.manual_dir,
        batch_size=FLAGS.batch_size,
        output_stride=FLAGS.output_stride,
        options=options,
    )


def main(argv):
    del argv
    cli.enable_compilation_cache()
    cli.quiet_library_logs()
    cli.run_or_exit("eval.py", distributed.initialize_from_flags, "eval.py")
    summary = cli.run_or_exit("eval.py", _evaluate)
    reporting.say(  # process 0 only
        f"checkpoint step {summary['step']}, split {FLAGS.split}, eval step compiled "
        f"{summary['compilations']} times (one per image-size bucket)"
    )
    reporting.say(summary["report"])


if __name__ == "__main__":
    app.run(main)
