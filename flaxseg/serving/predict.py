"""Prediction on image files with a trained workdir's model (predict.py).

For each image: ``<name>.png``, a palette PNG of class indices with the dataset's colour map (the
VOC layout: any VOC tool reads it, ``np.asarray(Image.open(...))`` gives the indices);
``<name>_overlay.png``, the image blended with the class colours and a legend of the classes
present, at the image's size; optionally ``<name>_probs.npy``, float32 [H, W, C] class
probabilities. The model runs on the whole image at its own size (one compile per size).
"""

from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from flaxseg import data as data_lib
from flaxseg import inference
from flaxseg.inference.crf import dense_crf
from flaxseg.serving import restore

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# ----------------------------------------------------------------------------- the model


def inference_function(model):
    """``fn(variables, images) -> logits``: uint8 [B, H, W, 3] in, float32 [B, H, W, C] out,
    normalisation included; what predict.py runs and export.py serialises."""

    def logits_fn(variables, images):
        logits = model.apply(variables, data_lib.normalise(images), train=False)
        return logits.astype(jnp.float32)

    return logits_fn


# ----------------------------------------------------------------------------- input files


def list_images(paths: Sequence) -> list[Path]:
    """The image files named by ``paths``: files as given, folders by their files with an image
    extension (not recursively, sorted). One clear error for a missing path or an empty
    folder."""
    if not paths:
        raise ValueError("Give at least one image or folder to predict on.")
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise ValueError(
                    f"Folder {path} holds no images (files ending in "
                    f"{', '.join(IMAGE_EXTENSIONS)})."
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"Image or folder {path} does not exist.")
    return files


def load_image(path) -> tuple[np.ndarray, Optional[str]]:
    """(uint8 [H, W, 3] RGB, note): any mode PIL reads is converted to RGB, and the note (None
    for RGB input) says from what; EXIF orientation is applied, as image viewers do.
    Raises OSError (or ValueError) when the file is not a readable image."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        mode, note = image.mode, None
        if mode.startswith("I;16"):  # 16-bit grayscale: scale, PIL's convert would clip
            image = Image.fromarray(
                (np.asarray(image, np.float64) / 257.0).round().astype(np.uint8)
            )
        if mode != "RGB":
            alpha = "A" in mode or "transparency" in image.info
            note = f"{path}: converted from {mode} to RGB" + (
                " (transparency dropped)." if alpha else "."
            )
        return np.asarray(image.convert("RGB")), note


def output_names(files: Sequence[Path]) -> list[str]:
    """One output stem per input file: the file's stem, numbered where two inputs share one."""
    names, taken = [], set()
    for path in files:
        name, number = path.stem, 1
        while name in taken:
            name, number = f"{path.stem}_{number}", number + 1
        taken.add(name)
        names.append(name)
    return names


# ----------------------------------------------------------------------------- output images


def palette_image(indices: np.ndarray, colormap: np.ndarray) -> Image.Image:
    """A 'P' image whose pixel values are ``indices`` (uint8 [H, W]) and whose palette is
    ``colormap`` (uint8 [N ≤ 256, 3]): the SegmentationClass PNG layout of VOC."""
    image = Image.fromarray(np.asarray(indices, np.uint8), mode="P")
    image.putpalette(np.asarray(colormap, np.uint8)[:256].reshape(-1).tolist())
    return image


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def overlay_image(
    image: np.ndarray, indices: np.ndarray, colormap: np.ndarray, class_names, alpha: float = 0.5
) -> Image.Image:
    """``image`` (uint8 [H, W, 3]) blended with the colour of each pixel's class (weight
    ``alpha``) and, in the top-left corner, a legend of the classes present; same size as
    ``image``."""
    colours = data_lib.colorize(indices, colormap).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    overlay = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))
    present = [int(c) for c in np.unique(indices)]
    height, width = indices.shape
    size = max(8, min(height, width) // 24)
    font, draw = _font(size), ImageDraw.Draw(overlay)
    line = size + max(2, size // 4)
    labels = [class_names[c] if c < len(class_names) else f"class_{c}" for c in present]
    text_width = max(draw.textlength(label, font=font) for label in labels)
    draw.rectangle(
        (0, 0, int(line + text_width) + 2 * (line - size) + 2, line * len(present) + 2),
        fill=(0, 0, 0),
    )
    for row, (index, label) in enumerate(zip(present, labels)):
        top = 2 + row * line
        swatch = tuple(int(v) for v in colormap[index])
        draw.rectangle((2, top, 2 + size, top + size), fill=swatch, outline=(255, 255, 255))
        draw.text((line + 4, top), label, fill=(255, 255, 255), font=font)
    return overlay


# ----------------------------------------------------------------------------- the loop


def predict_files(
    workdir,
    paths: Sequence,
    out_dir,
    *,
    checkpoint: str = "latest",
    save_probs: bool = False,
    alpha: float = 0.5,
    progress: bool = True,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: Optional[int] = None,
    overlap: float = 0.33,
    crf: bool = False,
    log=print,
) -> dict:
    """Predicts every image named by ``paths`` (files or folders) with the model of ``workdir``
    and writes the outputs described in the module docstring to ``out_dir``.

    ``scales``/``flip``/``window``/``overlap``: test-time augmentation
    (`flaxseg.inference.predict_probs`); ``crf``: the dense CRF (`flaxseg.inference.dense_crf`,
    DeepLab v2's parameters) refines the probabilities. The palette PNG holds the argmax of the
    logits (of the final probabilities with augmentation or CRF).

    An unreadable file is reported through ``log`` and skipped; the others are still predicted.
    Returns {'step', 'written': [(input, palette png)], 'skipped': [(input, reason)],
    'notes': [sentence]}.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must lie in [0, 1], got {alpha}.")
    scales = inference.check_options(scales, window, overlap)
    files = list_images(paths)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out={out_dir} is a file, not a folder.")
    names = output_names(files)
    inputs = {path.resolve() for path in files}
    for name in names:
        for output in (f"{name}.png", f"{name}_overlay.png", f"{name}_probs.npy"):
            if (out_dir / output).resolve() in inputs:
                raise ValueError(
                    f"--out={out_dir} would overwrite the input image {out_dir / output}; "
                    "write the predictions to another folder."
                )
    restored = restore.restore_model(workdir, checkpoint, rgb=True)
    num_classes = restored["spec"]["num_classes"]
    if num_classes > 256:
        raise ValueError(f"A palette PNG holds at most 256 classes; the model has {num_classes}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    predict = _jit_predict(restored["model"], scales, flip, window, overlap)
    variables = restored["variables"]
    summary = {"step": restored["step"], "written": [], "skipped": [], "notes": []}
    if progress and len(files) > 1:
        from tqdm import tqdm

        iterator = tqdm(list(zip(files, names)), desc="predict", unit="image")
        if log is print:  # keep the bar whole
            log = iterator.write
    else:
        iterator = zip(files, names)
    for path, name in iterator:
        try:
            image, note = load_image(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            summary["skipped"].append((path, reason))
            log(f"Skipped {path}: not a readable image ({reason}).")
            continue
        if note:
            summary["notes"].append(note)
            log(note)
        probs, indices = (np.asarray(a)[0] for a in predict(variables, image[None]))
        if crf:
            probs = np.asarray(dense_crf(image, probs), np.float32)
            indices = np.argmax(probs, axis=-1)
        indices = indices.astype(np.uint8)
        palette_path = out_dir / f"{name}.png"
        palette_image(indices, restored["colormap"]).save(palette_path)
        overlay_image(image, indices, restored["colormap"], restored["class_names"], alpha).save(
            out_dir / f"{name}_overlay.png"
        )
        if save_probs:
            np.save(out_dir / f"{name}_probs.npy", probs.astype(np.float32))
        summary["written"].append((path, palette_path))
    return summary


def _jit_predict(model, scales, flip, window, overlap):
    """Jitted ``(variables, uint8 [1, H, W, 3]) -> (float32 probabilities [1, H, W, C], int32
    argmax [1, H, W])``: of the logits for plain inference, else of the averaged softmax."""
    logits_fn = inference_function(model)
    plain = tuple(scales) == (1.0,) and not flip and window is None

    @jax.jit
    def predict(variables, images):
        if plain:
            logits = logits_fn(variables, images)
            return jax.nn.softmax(logits, axis=-1), jnp.argmax(logits, axis=-1)
        probs = inference.predict_probs(
            lambda x: model.apply(variables, x, train=False),
            data_lib.normalise(images),
            scales=scales,
            flip=flip,
            window=window,
            overlap=overlap,
        )
        return probs, jnp.argmax(probs, axis=-1)

    return predict
