"""Images/second of the VOC training input pipeline (decode, scale, crop, flip, batch).

  python benchmarks/input_pipeline.py [--num_images=160] [--batch_size=16] [--crop_size=513]
      [--batches=30] [--warmup_batches=4] [--workers=0,1,all] [--profile] [--data_dir=DIR]

No dataset can be downloaded here, so the script writes a VOC 2012 folder of its own (VOC-sized
JPEGs, 500×375 or 375×500, with palette PNG labels, like VOCtrainval's JPEGImages and
SegmentationClass), builds it with the project's TFDS builder (`get_data_source('voc2012', ...,
manual_dir=...)`, array_record) into a temporary data_dir and times
`flaxseg.data.pipeline.create_train_iterator` exactly as `flaxseg.training.inputs` calls it.

Rows:
  * `1 core, 1 thread`: worker_count=0 and num_threads=1 with the process pinned to one CPU
    (`os.sched_setaffinity`): the pipeline's cost per core, whatever else the machine does.
  * `in-process, 4 threads`: worker_count=0 with the default 4 threads, all cores allowed.
  * `worker_count=N`: grain worker processes (`mp_prefetch`), N = 1 and N = all cores.
Columns: wall-clock images/s, that divided by the cores the row may use, and images per
CPU-second (user + system time of this process's threads and its worker processes during the
timed window): the last one is the cost per core even when other jobs share the machine.
Each row runs `--warmup_batches` untimed batches, then times `--batches` batches (several
epochs of the small set if need be; the pipeline repeats forever).
`--profile` adds a per-stage timing on one core, one example at a time (read and decode /
random rescale / crop, normalise and flip / batch) and cProfile's top functions of that loop.
"""

import copy
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from absl import app, flags
from PIL import Image, ImageDraw
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxseg import data as data_lib  # noqa: E402
from flaxseg.constants import IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from flaxseg.data import pipeline  # noqa: E402
from flaxseg.data.colormap import voc_colormap  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 160, "Training images of the generated VOC folder.")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_integer("crop_size", 513, "Square training crop.")
flags.DEFINE_integer("batches", 30, "Timed batches per row.")
flags.DEFINE_integer("warmup_batches", 4, "Untimed batches first (worker start-up, caches).")
flags.DEFINE_list("workers", ["0", "1", "all"], "Rows: 0 = in-process; 'all' = every core.")
flags.DEFINE_bool("profile", False, "Time each stage on one core and cProfile it.")
flags.DEFINE_string("data_dir", None, "Reuse (or build into) this TFDS data_dir.")

# VOC 2012 images are at most 500 px a side, mostly 500×375 landscape or 375×500 portrait.
VOC_SIZES = ((375, 500), (375, 500), (500, 375), (333, 500))


def _natural_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like uint8 image: smooth structure at four scales plus sensor-like noise, so that
    its JPEG has a photo's size and decoding cost (87 kB on average at quality 90 for 500×375),
    not the few kB of a flat synthetic scene."""
    image = np.full((height, width, 3), 128.0)
    for cells, amplitude in ((4, 60.0), (16, 40.0), (64, 25.0), (256, 12.0)):
        grid = rng.uniform(-1, 1, (max(2, height * cells // 500), max(2, width * cells // 500), 3))
        for channel in range(3):
            plane = Image.fromarray(grid[..., channel].astype(np.float32))
            image[..., channel] += amplitude * np.asarray(
                plane.resize((width, height), Image.Resampling.BICUBIC)
            )
    image += rng.normal(0.0, 14.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _label_map(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Background and 1-4 objects (ellipses, polygons) of VOC classes, a void band between."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for class_index in rng.choice(np.arange(1, 21), size=int(rng.integers(1, 5)), replace=False):
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        rx, ry = rng.uniform(0.1, 0.35) * width, rng.uniform(0.1, 0.35) * height
        if rng.random() < 0.5:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=int(class_index))
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 8))))
            points = [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]
            draw.polygon(points, fill=int(class_index))
    label = np.asarray(canvas).copy()
    boundary = ndimage.maximum_filter(label, size=3) != ndimage.minimum_filter(label, size=3)
    label[boundary] = IGNORE_LABEL
    return label


def write_voc_folder(root: Path, num_train: int, num_val: int = 8, seed: int = 0) -> float:
    """Writes root/VOCdevkit/VOC2012 (JPEGImages, SegmentationClass as palette PNGs, split
    lists); returns the mean JPEG size in bytes."""
    voc_root = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc_root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = voc_colormap().reshape(-1).tolist()
    jpeg_bytes = []
    for split, count in (("train", num_train), ("val", num_val)):
        ids = [f"2099_{split}_{index:06d}" for index in range(count)]
        for index, image_id in enumerate(ids):
            height, width = VOC_SIZES[index % len(VOC_SIZES)]
            buffer = io.BytesIO()
            Image.fromarray(_natural_image(height, width, rng)).save(
                buffer, format="JPEG", quality=90
            )
            (voc_root / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
            jpeg_bytes.append(len(buffer.getvalue()))
            mask = Image.fromarray(_label_map(height, width, rng))
            mask.putpalette(palette)
            mask.save(voc_root / "SegmentationClass" / f"{image_id}.png")
        (voc_root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return float(np.mean(jpeg_bytes))


def train_iterator(source, worker_count: int, num_threads: int):
    """The training iterator as `flaxseg.training.inputs.create_train_iterator` builds it."""
    return pipeline.create_train_iterator(
        source,
        batch_size=FLAGS.batch_size,
        crop_size=FLAGS.crop_size,
        seed=0,
        min_scale=0.5,
        max_scale=2.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_label=IGNORE_LABEL,
        worker_count=worker_count,
        shard_index=0,
        shard_count=1,
        num_threads=num_threads,
    )


def cpu_times() -> dict:
    """{pid: CPU seconds (user + system)} of this process (all its threads) and its live
    children (grain's workers; psutil comes with tensorflow-datasets and orbax)."""
    me = psutil.Process()
    times = {me.pid: sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            times[child.pid] = sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return times


def time_iterator(iterator, batches: int, warmup: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per batch over `batches` batches after `warmup` untimed ones.

    The CPU seconds are the pipeline's cost in core-seconds, whatever else the machine runs
    (processes that exit during the window lose their share)."""
    shape = (FLAGS.batch_size, FLAGS.crop_size, FLAGS.crop_size, 3)
    for _ in range(warmup):
        batch = next(iterator)
        assert batch["image"].shape == shape, batch["image"].shape
    start, cpu_start = time.perf_counter(), cpu_times()
    for _ in range(batches):
        batch = next(iterator)
    wall = time.perf_counter() - start
    cpu_end = cpu_times()
    cpu = sum(seconds - cpu_start.get(pid, 0.0) for pid, seconds in cpu_end.items())
    return wall / batches, cpu / batches


def stage_times(source, count: int) -> dict:
    """CPU milliseconds (this thread's CPU time, so other jobs on the machine do not count) per
    example of each stage, one example at a time in this thread: reading and
    decoding (the TFDS source), `train_transform` split into its PIL rescale (timed again alone
    with the same scale) and the rest, and stacking into a batch."""
    rng = np.random.default_rng(0)
    decode = transform = scale = stack = 0.0
    crops = []
    for index in range(count):
        start = time.thread_time()
        example = source[index % len(source)]
        decoded = time.thread_time()
        replay = copy.deepcopy(rng)  # train_transform's first draw is the scale
        image, label = pipeline.train_transform(
            example["image"], example["segmentation_mask"], rng, crop_size=FLAGS.crop_size
        )
        transformed = time.thread_time()
        pipeline._resize_pair(
            example["image"], example["segmentation_mask"][..., 0], replay.uniform(0.5, 2.0)
        )
        scaled = time.thread_time()
        crops.append((image, label))
        if len(crops) == FLAGS.batch_size:
            np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])
            crops = []
            stack += time.thread_time() - scaled
        decode += decoded - start
        transform += transformed - decoded
        scale += scaled - transformed
    return {
        "read + decode JPEG and PNG (TFDS source)": 1e3 * decode / count,
        "random rescale (PIL bilinear / nearest)": 1e3 * scale / count,
        "crop, normalise to float32, flip": 1e3 * (transform - scale) / count,
        "batch (np.stack)": 1e3 * stack / count,
    }


def load() -> float:
    return os.getloadavg()[0]


def main(argv):
    del argv
    import grain
    import jax
    import tensorflow_datasets as tfds

    cores = len(os.sched_getaffinity(0))
    temporary = None
    data_dir = FLAGS.data_dir
    if data_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="flaxseg_pipeline_bench_")
        data_dir = temporary.name
    manual_dir = Path(data_dir) / "manual"
    mean_jpeg = None
    if not (manual_dir / "VOCdevkit").is_dir():
        start = time.perf_counter()
        mean_jpeg = write_voc_folder(manual_dir, FLAGS.num_images)
        print(f"# wrote {FLAGS.num_images} VOC-size images in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    source = data_lib.get_data_source(
        "voc2012", "train", data_dir=str(Path(data_dir) / "tfds"), manual_dir=str(manual_dir)
    )
    print(
        f"# TFDS voc_segmentation/2012 ready in {time.perf_counter() - start:.1f} s, "
        f"{len(source)} train examples"
        + (f", mean JPEG {mean_jpeg / 1e3:.0f} kB" if mean_jpeg else "")
    )
    print(
        f"# {cores} cores, jax {jax.__version__}, grain {grain.__version__}, "
        f"tfds {tfds.__version__}, numpy {np.__version__}, batch {FLAGS.batch_size}, "
        f"crop {FLAGS.crop_size}, {FLAGS.batches} timed batches after {FLAGS.warmup_batches}"
    )

    rows = [("1 core, 1 thread (pinned)", 0, 1, 1)]
    for value in FLAGS.workers:
        workers = cores if value == "all" else int(value)
        if workers == 0:
            rows.append(("in-process, 4 threads", 0, 4, cores))
        else:
            rows.append((f"worker_count={workers}", workers, 4, cores))
    print(
        f"| {'pipeline':<26} | {'cores':>5} | {'img/s':>7} | {'img/s per core':>14} "
        f"| {'img per CPU-s':>13} | {'load avg':>8} |"
    )
    print(f"|{'-' * 28}|{'-' * 7}|{'-' * 9}|{'-' * 16}|{'-' * 15}|{'-' * 10}|")
    everything = os.sched_getaffinity(0)
    for name, workers, threads, used in rows:
        pinned = used == 1
        if pinned:
            os.sched_setaffinity(0, {min(everything)})
        try:
            iterator = train_iterator(source, workers, threads)
            seconds, cpu = time_iterator(iterator, FLAGS.batches, FLAGS.warmup_batches)
        except Exception as error:  # report a failing row (e.g. worker processes) and go on
            print(f"| {name:<26} | {used:>5} | failed: {type(error).__name__}: {error} |")
            continue
        finally:
            if pinned:
                os.sched_setaffinity(0, everything)
        del iterator
        images_per_second = FLAGS.batch_size / seconds
        print(
            f"| {name:<26} | {used:>5} | {images_per_second:>7.1f} | "
            f"{images_per_second / used:>14.1f} | {FLAGS.batch_size / cpu:>13.1f} "
            f"| {load():>8.2f} |",
            flush=True,
        )

    if FLAGS.profile:
        # Stages run here, in this thread, on one core: timed plainly, then again under
        # cProfile (which sees one thread only and slows what it sees).
        os.sched_setaffinity(0, {min(everything)})
        stages = stage_times(source, 64)
        profile = cProfile.Profile()
        profile.runcall(stage_times, source, 64)
        os.sched_setaffinity(0, everything)
        total = sum(stages.values())
        print("\n| stage (one example, 1 core) | CPU ms | share |")
        print("|---|---|---|")
        for stage, milliseconds in stages.items():
            print(f"| {stage} | {milliseconds:.2f} | {100 * milliseconds / total:.0f}% |")
        print(f"| total | {total:.2f} | ({1e3 / total:.1f} img/s) |")
        print("\ncProfile of the stage loop (64 examples, 1 core; top 12 by own time):")
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(12)
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    app.run(main)
