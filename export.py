"""Exports the model of a trained workdir as serialised StableHLO (jax.export).

python export.py --workdir=/tmp/deeplabv3plus --out=/tmp/deeplabv3plus.jax --height=513 --width=513

The function takes uint8 [B, H, W, 3] RGB images (normalisation included) and returns float32
logits [B, H, W, C]; B is symbolic (or --batch_size), H and W are --height/--width (symbolic
when omitted, where the model allows it). Load it with `flaxseg.export.load(FILE)`, which never
imports the model code. --saved_model=DIR also writes a TensorFlow SavedModel (needs TensorFlow).
"""

from absl import app, flags

from flaxseg.serving import export as export_lib
from flaxseg.training import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
flags.DEFINE_string("out", None, "File to write (and <file>.json beside it).", required=True)
flags.DEFINE_string(
    "checkpoint", "latest", "'latest', 'best' (by validation mIoU) or a step number."
)
flags.DEFINE_integer("height", None, "Fixed input height (symbolic when omitted with --width).")
flags.DEFINE_integer("width", None, "Fixed input width (symbolic when omitted with --height).")
flags.DEFINE_integer("batch_size", None, "Fixed batch size (default: symbolic).")
flags.DEFINE_list("platforms", None, "Platforms to lower for, e.g. cpu,cuda (default: this one).")
flags.DEFINE_string("saved_model", None, "Also write a TensorFlow SavedModel to this folder.")


def main(argv):
    del argv
    cli.enable_compilation_cache()
    cli.quiet_library_logs()
    metadata = cli.run_or_exit(
        "export.py",
        export_lib.export_workdir,
        FLAGS.workdir,
        FLAGS.out,
        checkpoint=FLAGS.checkpoint,
        height=FLAGS.height,
        width=FLAGS.width,
        batch_size=FLAGS.batch_size,
        platforms=FLAGS.platforms,
        saved_model=FLAGS.saved_model,
    )
    shape = ", ".join(str(d) for d in metadata["input"]["shape"])
    print(
        f"checkpoint step {metadata['step']}: wrote {FLAGS.out} (uint8 [{shape}] -> float32 "
        f"logits, {len(metadata['class_names'])} classes, {','.join(metadata['platforms'])})"
    )
    if FLAGS.saved_model:
        print(f"wrote the SavedModel {FLAGS.saved_model}")


if __name__ == "__main__":
    app.run(main)
