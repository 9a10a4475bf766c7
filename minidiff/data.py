"""Data for minidiff: host (numpy) float32 arrays in [-1, 1], images as NCHW.

Three kinds of data, one convention:
- bundled real digits, shipped in `assets/` so that training works offline:
  "digits" (UCI 8x8, 17 grey levels) and "mnist" (5,000 MNIST digits, padded to 32x32),
  each with a fixed train / held-out split (`split_indices`);
- synthetic data: 2-D toy distributions (`sample_toy`) and procedural "Mondrian" pictures;
- the user's own files (`load_path`): a folder of PNG/JPEG, .npz/.npy arrays,
  MNIST IDX files and CIFAR-10 python batches.
Everything here stays on the host; the trainer moves each batch to the active backend.
Bad input raises one `DataError` naming the file, the problem and what to do.
"""
import codecs
import contextlib
import gzip
import io
import math
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from . import backend

host = backend.host
ASSETS = Path(__file__).resolve().parent / "assets"

BUNDLED = {  # name -> (file in assets/, native side, grey levels)
    "digits": ("digits8x8.npz", 8, 17),   # UCI optical digits: pixel values 0..16
    "mnist": ("mnist5k.npz", 28, 256),    # MNIST: 0..255, padded to 32x32 on load
}
MNIST_PADDED_SIZE = 32  # 28 -> 32 so that three 2x downsamplings of the U-Net divide evenly
TOY_DATASETS = ("swissroll", "8gaussians", "moons", "checkerboard")
SPLITS = ("train", "heldout", "all")
SPLIT_SEED = 20200619     # the DDPM arXiv date; changing it changes which images are held out
HELDOUT_FRACTION = 0.1    # held-out = floor(n / 10): 179 of 1,797 digits, 500 of 5,000 MNIST
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Limits on what a file may make minidiff allocate (docs/DATA.md, "Limits"):
MEMORY_FRACTION = 4       # loaded images (float32) may take a quarter of the memory this process can have
MAX_CLASSES = 10_000      # labels 0 .. 9,999: each class costs the model an embedding row
MAX_IDX_DIMS = 4          # IDX images have 3 dimensions (N, H, W), labels 1
DEFLATE_MAX_RATIO = 1032  # no deflate stream (gzip, zip) expands more than 1032-fold
READ_CHUNK = 1 << 24      # compressed streams are read 16 MiB at a time


class DataError(ValueError):
    """Input data that minidiff cannot use; the message names the file and the fix."""


def known_datasets():
    """Names accepted by `load_images` besides a path: bundled sets, then toys."""
    return tuple(BUNDLED) + TOY_DATASETS


def _host_rng(rng):
    """A numpy Generator from None, an int seed, a backend.Generator or a numpy Generator."""
    if isinstance(rng, backend.Generator):
        return rng.host_rng()
    if isinstance(rng, host.random.Generator):
        return rng
    return host.random.default_rng(rng)


# ---------------------------------------------------------------- limits

def _size(n):
    """A byte count for people: '12,544 bytes', '290.8 MiB', '2.0 GiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} bytes"


def _address_space_left():
    """Bytes left under `ulimit -v` (RLIMIT_AS), or None when there is no such limit."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm") as f:            # the first field: pages of address space in use
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def memory_limit():
    """(bytes, why): how much memory one loaded data set may take, and where that figure comes from.

    A quarter (MEMORY_FRACTION) of the least of: this machine's physical memory, a cgroup
    (container) memory limit, and the address space left under `ulimit -v`; the rest leaves room for
    the copies made while converting, the model and the training step. Files are checked against
    it before anything is allocated, so a header that declares a huge array fails with this figure.
    """
    candidates = []
    try:
        candidates.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of this machine's memory"))
    except (AttributeError, OSError, ValueError):
        pass
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            candidates.append((int(text), "of this container's memory limit"))
    except OSError:
        pass
    left = _address_space_left()
    if left is not None:
        candidates.append((left, "of the address space left under ulimit -v"))
    total, where = min(candidates) if candidates else (16 << 30, "of an assumed 16 GiB of memory")
    return total // MEMORY_FRACTION, f"1/{MEMORY_FRACTION} of the {_size(total)} {where}"


def _check_fits(nbytes, source, what):
    """DataError unless `nbytes` (what `what` would take in memory) is within memory_limit()."""
    limit, why = memory_limit()
    if nbytes > limit:
        raise DataError(f"{source}: {what} would take {_size(nbytes)} in memory, more than the "
                        f"{_size(limit)} minidiff allows for data ({why}); use fewer or smaller images")


def _check_shape(shape, source):
    """A declared shape as a tuple of Python ints (no overflow), each non-negative."""
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DataError(f"{source}: invalid array shape {shape!r} in the file's header; the file is corrupt")
    return tuple(shape), math.prod(shape)


def _read_exact(stream, nbytes, source, check_end=True):
    """Exactly `nbytes` from `stream` as a uint8 array, read in chunks (memory grows only with what arrives).

    Fewer bytes: the file is truncated. With `check_end`, a byte beyond them is an error too: a
    compressed stream that expands past what its header declares is corrupt (or a decompression bomb).
    """
    out = host.empty(nbytes, dtype=host.uint8)
    view, got = memoryview(out), 0
    try:
        while got < nbytes:
            n = stream.readinto(view[got:got + min(nbytes - got, READ_CHUNK)])
            if not n:
                break
            got += n
        extra = stream.read(1) if check_end and got == nbytes else b""
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise DataError(f"{source}: cannot read its data ({e}); the file is corrupt, download or save it again") from None
    if got < nbytes:
        raise DataError(f"{source}: the header declares {_size(nbytes)} of data but the file holds only "
                        f"{_size(got)}; the file is truncated, download or save it again")
    if extra:
        raise DataError(f"{source}: the data goes on past the {_size(nbytes)} its header declares "
                        f"(a corrupt file or a decompression bomb); minidiff stopped reading it")
    return out


def check_labels(labels, n, source):
    """`labels` as int64 (n,), or DataError naming what is wrong: one integer class 0 .. MAX_CLASSES-1 per image."""
    labels = host.asarray(labels)
    fix = "fix or remove the labels (one integer class 0, 1, 2, ... per image)"
    if labels.dtype.kind not in "iu":
        raise DataError(f"{source}: labels have dtype {labels.dtype}, not integers; {fix}")
    if labels.ndim != 1:
        raise DataError(f"{source}: labels have shape {labels.shape}, not ({n},); {fix}")
    if len(labels) != n:
        raise DataError(f"{source}: {len(labels)} labels for {n} images; {fix}")
    if n and labels.min() < 0:
        raise DataError(f"{source}: label {labels.min()} is negative; {fix}")
    if n and labels.max() >= MAX_CLASSES:
        raise DataError(f"{source}: label {labels.max()} would make {int(labels.max()) + 1:,} classes, more "
                        f"than minidiff's limit of {MAX_CLASSES:,} (labels 0 .. {MAX_CLASSES - 1}); {fix}")
    return labels.astype(host.int64)


# ---------------------------------------------------------------- bundled digits

def grey_levels(name):
    """Number of distinct pixel values of a data set: 17 for digits, 256 for 8-bit images.

    bits/dim discretises each pixel into this many bins, so it must be the data's own
    count: 8x8 digits have 17 levels (0..16), anything loaded as 8-bit images has 256.
    """
    if name in BUNDLED:
        return BUNDLED[name][2]
    if name in TOY_DATASETS:
        raise DataError(f"{name!r} is continuous 2-D data: it has no grey levels (and no bits/dim)")
    return 256


def split_indices(n, seed=SPLIT_SEED, heldout_fraction=HELDOUT_FRACTION):
    """(train, heldout) index arrays: a seeded permutation of range(n), the last floor(f*n) held out.

    Both keep the permuted order, so the first k held-out images mix all labels even
    though mnist5k.npz is sorted by label. The same n always gives the same indices.
    """
    order = host.random.default_rng(seed).permutation(n)
    n_heldout = int(n * heldout_fraction)
    return order[: n - n_heldout], order[n - n_heldout:]


def _select_split(images, labels, split, source):
    """Rows of `images`/`labels` belonging to `split` ("train", "heldout" or "all")."""
    if split not in SPLITS:
        raise DataError(f"{source}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split == "all":
        return images, labels
    train, heldout = split_indices(len(images))
    idx = train if split == "train" else heldout
    if len(idx) == 0:
        raise DataError(f"{source}: {len(images)} images are too few to hold out 10% "
                        f"for split {split!r}; use split 'all' or add images")
    return images[idx], (None if labels is None else labels[idx])


def pad_images(images, size, value=-1.0):
    """Centre NCHW images in a size x size canvas filled with `value` (-1 is black background)."""
    n, c, h, w = images.shape
    if h > size or w > size:
        raise DataError(f"cannot pad {h}x{w} images to the smaller size {size}")
    top, left = (size - h) // 2, (size - w) // 2
    out = host.full((n, c, size, size), value, dtype=backend.DTYPE)
    out[:, :, top:top + h, left:left + w] = images
    return out


def load_dataset(name, split="train", with_labels=True):
    """A bundled set as (images float32 (N, 1, H, W) in [-1, 1], labels int64 (N,)); images only if not with_labels.

    "digits": 8x8, scaled x / 16 * 2 - 1 (17 levels); "mnist": 28x28 scaled x / 255 * 2 - 1
    and padded with background to 32x32. `split` is "train" (90%), "heldout" (10%) or "all".
    """
    if name not in BUNDLED:
        raise DataError(f"unknown bundled data set {name!r}; known: {', '.join(BUNDLED)}")
    filename, _, levels = BUNDLED[name]
    with host.load(ASSETS / filename) as f:          # uint8 images (N, H, W), uint8 labels (N,)
        raw, labels = f["images"], f["labels"].astype(host.int64)
    images = (raw.astype(backend.DTYPE) / (levels - 1) * 2 - 1)[:, None]   # (N, 1, H, W)
    if name == "mnist":
        images = pad_images(images, MNIST_PADDED_SIZE)
    images, labels = _select_split(images, labels, split, f"bundled data set {name!r}")
    return (images, labels) if with_labels else images


def load_images(name, split="train", image_size=None, channels=None):
    """Images for training or evaluation: a bundled name or a path, with its metadata.

    Returns (images float32 NCHW in [-1, 1], labels or None, info); info is a dict with
    "name", "image_size", "channels", "grey_levels", "hflip" (the suggested default:
    on for natural photos as in the paper, off for digits and arrays) and "num_classes"
    (None without labels). Paths get the same
    seeded 90/10 split as the bundled sets, so evaluation never sees training images.
    """
    name = str(name)
    if name in TOY_DATASETS:
        raise DataError(f"{name!r} is a 2-D toy distribution, not images: use sample_toy({name!r}, n, rng)")
    if name in BUNDLED:
        images, labels = load_dataset(name, split)
        classes = num_classes(labels)   # 10: both splits hold every digit
        size = images.shape[-1]
        if image_size not in (None, size):
            raise DataError(f"bundled data set {name!r} is {size}x{size}; drop --image-size or set it "
                            f"to {size} (resizing would change its {grey_levels(name)} grey levels)")
        if channels not in (None, images.shape[1]):
            images = _to_channels(images, channels, f"bundled data set {name!r}")
        hflip = False
    else:
        path = Path(name).expanduser()
        if not path.exists() and os.sep not in name and "." not in name:
            # Looks like a misspelt data set name rather than a path.
            raise DataError(f"unknown data set {name!r}: use one of {', '.join(known_datasets())}, "
                            f"or the path of an image folder, .npz/.npy, MNIST IDX or CIFAR-10 batch")
        images, labels = load_path(path, image_size=image_size, channels=channels)
        classes = num_classes(labels)   # of the whole set: a split may miss a class
        images, labels = _select_split(images, labels, split, str(path))
        hflip = _looks_natural(path)
    info = {"name": name, "image_size": int(images.shape[-1]), "channels": int(images.shape[1]),
            "grey_levels": grey_levels(name), "hflip": hflip, "num_classes": classes}
    return images, labels, info


def num_classes(labels):
    """K for labels in 0 .. K-1 (the largest label + 1: a class missing from a split still counts), or None."""
    return None if labels is None or len(labels) == 0 else int(labels.max()) + 1


def _looks_natural(path):
    """True for photo-like sources (image folders, CIFAR), where the paper uses random flips."""
    if path.is_dir():
        return True
    return path.suffix.lower() in IMAGE_SUFFIXES or _is_cifar_name(path.name)


# ---------------------------------------------------------------- synthetic data

def sample_toy(name, n, rng=None, seed=None):
    """n points (n, 2) float32 from a 2-D toy distribution, about unit scale per axis.

    Randomness from `rng` (a Generator or a seed), or from `seed` when rng is None.
    """
    rng = _host_rng(seed if rng is None else rng)
    if name == "swissroll":
        t = 1.5 * host.pi * (1 + 2 * rng.random(n))         # the angle is also the radius
        x = host.stack([t * host.cos(t), t * host.sin(t)], axis=1) + 0.3 * rng.standard_normal((n, 2))
        x = x / 7.0                                          # raw std is about 7 per axis
    elif name == "8gaussians":
        angle = rng.integers(0, 8, n) * (host.pi / 4)
        centres = host.sqrt(2) * host.stack([host.cos(angle), host.sin(angle)], axis=1)
        x = centres + 0.1 * rng.standard_normal((n, 2))      # radius sqrt(2): per-axis variance ~1
    elif name == "moons":
        theta = host.pi * rng.random(n)
        upper = rng.random(n) < 0.5
        x = host.where(upper[:, None],
                       host.stack([host.cos(theta), host.sin(theta)], axis=1),
                       host.stack([1 - host.cos(theta), 0.5 - host.sin(theta)], axis=1))
        x = (x + 0.05 * rng.standard_normal((n, 2)) - [0.5, 0.25]) / 0.7
    elif name == "checkerboard":
        # A 4x4 board on [-2, 2]^2 with the dark squares filled: pick x uniformly, then y
        # in one of the two unit cells of its column whose parity matches.
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - 2 * rng.integers(0, 2, n) + host.floor(x1) % 2
        x = host.stack([x1, x2], axis=1) * (host.sqrt(3) / 2)   # uniform on [-2, 2] has std 2/sqrt(3)
    else:
        raise DataError(f"unknown toy data set {name!r}; known: {', '.join(TOY_DATASETS)}")
    return x.astype(backend.DTYPE)


PRIMARY_COLOURS = ((0.86, 0.12, 0.10), (0.10, 0.25, 0.70), (0.98, 0.82, 0.10))  # Mondrian's red, blue, yellow


def mondrian(size, rng=None, channels=3):
    """A procedural Mondrian picture (channels, size, size) float32 in [-1, 1].

    Recursively split the canvas by axis-aligned cuts, draw each cut as a black line
    and paint some rectangles in a primary colour, the rest white.
    """
    rng = _host_rng(rng)
    canvas = host.ones((size, size, 3))
    line = max(1, size // 32)
    min_side = max(4 * line, size // 6)
    rectangles, stack = [], [(0, 0, size, size)]     # (top, left, bottom, right)
    while stack:
        top, left, bottom, right = stack.pop()
        h, w = bottom - top, right - left
        can_cut = [d for d, side in (("h", h), ("v", w)) if side >= 2 * min_side]
        if not can_cut or (len(rectangles) + len(stack) > 2 and rng.random() < 0.35):
            rectangles.append((top, left, bottom, right))
            continue
        d = can_cut[rng.integers(len(can_cut))]
        if d == "h":
            cut = int(rng.integers(top + min_side, bottom - min_side + 1))
            stack += [(top, left, cut, right), (cut, left, bottom, right)]
        else:
            cut = int(rng.integers(left + min_side, right - min_side + 1))
            stack += [(top, left, bottom, cut), (top, cut, bottom, right)]
    for top, left, bottom, right in rectangles:
        if rng.random() < 0.4:
            canvas[top:bottom, left:right] = PRIMARY_COLOURS[rng.integers(len(PRIMARY_COLOURS))]
        # Black border on the far sides of every rectangle; with the frame below, every cut gets a line.
        canvas[max(bottom - line, 0):bottom, left:right] = 0
        canvas[top:bottom, max(right - line, 0):right] = 0
    canvas[:line], canvas[:, :line] = 0, 0
    image = canvas.transpose(2, 0, 1) * 2 - 1                # (3, size, size)
    if channels == 1:
        image = (image * host.array([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdims=True)
    elif channels != 3:
        raise DataError(f"mondrian: channels must be 1 or 3, not {channels}")
    return image.astype(backend.DTYPE)


# ---------------------------------------------------------------- the user's own files

def load_path(path, image_size=None, channels=None):
    """The user's images from `path` as (float32 NCHW in [-1, 1], labels or None).

    Accepts a folder of images (searched recursively; labelled when its images sit in two or more
    subfolders, one per class, see folder_labels), one image file, a .npz or .npy
    array, an MNIST IDX file (gzipped or not) or a CIFAR-10 python batch / the folder
    holding them. `image_size` resizes (shorter side) and centre-crops; `channels`
    converts to grey (1) or RGB (3); by default both are kept from the data.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the path (or use a bundled "
                        f"data set: {', '.join(BUNDLED)})")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"{path}: image size must be a positive integer, not {image_size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"{path}: channels must be 1 (grey) or 3 (RGB), not {channels!r}")
    labels = None
    if path.is_dir():
        batches = _cifar_batches_in(path)
        if batches:
            images, labels = _load_cifar(batches)
        else:
            files = _image_files_in(path)
            labels = folder_labels(path, files)
            return _load_image_files(files, path, image_size, channels), labels
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        return _load_image_files([path], path, image_size, channels), None
    elif path.suffix.lower() == ".npz":
        images, labels = _load_npz(path)
    elif path.suffix.lower() == ".npy":
        images = _array_to_nchw(_load_npy(path), path)
    elif _is_cifar_name(path.name):
        images, labels = _load_cifar([path])
    else:
        images, labels = _load_idx_images(path)     # checks the IDX magic number itself
    # Each loader has checked its labels (check_labels): integers, one per image, 0 .. MAX_CLASSES-1.
    if channels and channels != images.shape[1]:
        _check_fits(images.size // images.shape[1] * channels * images.itemsize, path,
                    f"its images with {channels} channels")
        images = _to_channels(images, channels, path)
    return _fit_array(images, image_size, path), labels


def _unsupported(path, why):
    return DataError(f"{path}: {why}. minidiff reads a folder of PNG/JPEG images, .npz/.npy arrays "
                     f"(NHWC or NHW, uint8 or float), MNIST IDX files and CIFAR-10 python batches")


# --- image files

def load_image(path, image_size=None, channels=3):
    """One image file as (channels, S, S) float32 in [-1, 1] (e.g. for the forward-process demo)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such image file; check the path")
    return _load_image_files([path], path, image_size, channels)[0]


def _image_files_in(folder):
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}), "
                        f"searched recursively; point --data at a folder with images in it")
    return files


def class_folders(folder, files=None):
    """The class names of an image folder: its subfolders, sorted, when every image lies in one
    of two or more of them (torchvision's ImageFolder layout); else None (no labels)."""
    folder = Path(folder)
    files = _image_files_in(folder) if files is None else files
    parts = [f.relative_to(folder).parts for f in files]
    if any(len(p) < 2 for p in parts):   # an image at the top level: not a class layout
        return None
    names = sorted({p[0] for p in parts})
    return names if len(names) >= 2 else None


def folder_labels(folder, files):
    """int64 labels of `files` (inside `folder`): the index of each one's class subfolder, or None."""
    names = class_folders(folder, files)
    if names is None:
        return None
    if len(names) > MAX_CLASSES:
        raise DataError(f"{folder}: {len(names):,} class subfolders, more than minidiff's limit of "
                        f"{MAX_CLASSES:,} classes; group the images into fewer subfolders")
    index = {name: k for k, name in enumerate(names)}
    return host.asarray([index[f.relative_to(folder).parts[0]] for f in files], dtype=host.int64)


GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


def _image_error(file, e):
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        limit = Image.MAX_IMAGE_PIXELS
        return DataError(f"{file}: refusing to decode it: {e.args[0] if e.args else e} (Pillow's limit is "
                         f"{limit:,} pixels for one image, PIL.Image.MAX_IMAGE_PIXELS); shrink the image")
    return DataError(f"{file}: cannot read this image ({e}); delete or re-save it")


def _open_image(file):
    """An image file opened lazily (its header read, its pixels not yet decoded).

    Pillow refuses images of more than MAX_IMAGE_PIXELS pixels (a decompression bomb: a small
    file that decodes to gigabytes) and warns above half of that; both become a DataError.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(file)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) + IMAGE_ERRORS as e:
            raise _image_error(file, e) from None


def _decode_image(file, size=None):
    """One image file decoded, turned upright by its EXIF orientation.

    With `size`, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that keeps both
    sides at least `size` (Pillow's draft mode): a 12-megapixel photo for 32x32 images decodes
    to 0.2 megapixels instead of 36 MB.
    """
    image = _open_image(file)
    with warnings.catch_warnings(), image:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if size is not None and image.format == "JPEG":
                image.draft(None, (size, size))
            image.load()                    # decode now, so a truncated file fails here, with its name
            return ImageOps.exif_transpose(image)   # phone photos are stored sideways plus an EXIF rotation
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) + IMAGE_ERRORS as e:
            raise _image_error(file, e) from None


def _load_image_files(files, source, image_size, channels):
    """Decode, convert, resize and crop image files into one (N, C, S, S) float32 array.

    One image at a time: each is decoded, resized into its row of the output and dropped, so
    memory is the output plus one decoded image (at most Pillow's MAX_IMAGE_PIXELS pixels).
    """
    if channels is None:                    # grey only if every image is grey (the mode is in the header)
        modes = []
        for f in files:
            with _open_image(f) as im:
                modes.append(im.mode)
        channels = 1 if all(mode in GREY_MODES for mode in modes) else 3
    size_given, out, first = image_size is not None, None, None
    if size_given:                          # known before decoding anything
        _check_fits(len(files) * channels * image_size * image_size * 4, source,
                    f"{len(files):,} images of {channels}x{image_size}x{image_size} as float32")
    for i, file in enumerate(files):
        image = _decode_image(file, image_size)
        if out is None:                     # the first image: the size is known, allocate the output
            first = (file, image.size)
            if not size_given:
                image_size = min(image.size)   # non-square images are centre-cropped to a square
                _check_fits(len(files) * channels * image_size * image_size * 4, source,
                            f"{len(files):,} images of {channels}x{image_size}x{image_size} as float32")
            out = host.empty((len(files), channels, image_size, image_size), dtype=backend.DTYPE)
        elif not size_given and image.size != first[1]:
            (w0, h0), (w1, h1) = first[1], image.size
            raise DataError(f"{source}: images have different sizes ({first[0].name} is {w0}x{h0}, "
                            f"{file.name} is {w1}x{h1}); pass --image-size to resize and crop them all")
        if image.mode.startswith("I"):     # 16-bit grey: keep the top 8 bits (convert('L') would clip)
            image = Image.fromarray((host.asarray(image) // 256).clip(0, 255).astype(host.uint8))
        image = _resize_crop(image.convert("L" if channels == 1 else "RGB"), image_size)
        pixels = host.asarray(image, dtype=backend.DTYPE).reshape(image_size, image_size, channels)
        out[i] = pixels.transpose(2, 0, 1) / 127.5 - 1
    return out


def _resize_crop(image, size):
    """Resize so the shorter side is `size` (bicubic; box-filter when shrinking a lot), then centre-crop.

    An image more than 4:1 is resized straight from the source region that the crop keeps, so
    that a 1 x 10^7 strip never becomes a 32 x 3.2 * 10^8 intermediate.
    """
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if new_w * new_h > 4 * size * size:
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side),
                                reducing_gap=2.0)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=2.0)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


# --- arrays

NPY_ERRORS = (ValueError, SyntaxError, TypeError, OSError, EOFError, zlib.error, zipfile.BadZipFile)


def _read_npy(stream, source, total, check_end):
    """One array in the .npy format from `stream`, never unpickled, its header checked before reading.

    `total` is the most bytes the stream can hold (the file's size, or what a zip member's
    compressed bytes can expand to): a header declaring more is a truncated or corrupt file,
    refused before anything is allocated; then the declared array must fit in memory_limit().
    """
    try:
        version = backend.npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = backend.npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = backend.npy_format.read_array_header_2_0(stream)
        else:                                  # 3.0 (a UTF-8 header): no public reader
            shape, fortran, dtype = backend.npy_format._read_array_header(stream, version)
        header = stream.tell()
    except NPY_ERRORS as e:
        raise _unsupported(source, f"cannot read it as a NumPy array ({e})") from None
    if dtype.hasobject:
        raise _unsupported(source, "cannot read it as a NumPy array (it is an object array: Python objects, "
                                   "which minidiff never unpickles; save plain numbers)")
    if dtype.itemsize == 0 or dtype.subdtype is not None:
        raise _unsupported(source, f"dtype {dtype} is not pixels (use uint8 or float)")
    shape, count = _check_shape(shape, source)
    nbytes = count * dtype.itemsize
    if nbytes > total - header:
        raise DataError(f"{source}: its header declares a {shape} {dtype} array ({_size(nbytes)}) but the "
                        f"file holds at most {_size(max(total - header, 0))} of data; it is truncated or "
                        f"corrupt, save it again")
    _check_fits(count * max(4, dtype.itemsize), source, f"its {shape} {dtype} array (as float32)")
    raw = _read_exact(stream, nbytes, source, check_end)
    try:
        array = raw.view(dtype)
        return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)
    except (ValueError, TypeError) as e:
        raise _unsupported(source, f"cannot read it as a NumPy array ({e})") from None


def _load_npy(path):
    """A .npy file's array (allow_pickle=False in effect: an .npy never runs code)."""
    with _open_file(path) as f:
        return _read_npy(f, path, os.fstat(f.fileno()).st_size, check_end=False)


def _read_npz_member(archive, info, source):
    """One member of an .npz (zip) archive, read lazily with a bound derived from its header."""
    if info.compress_type == zipfile.ZIP_STORED:
        total = min(info.file_size, info.compress_size)
    elif info.compress_type == zipfile.ZIP_DEFLATED:   # np.savez_compressed
        total = min(info.file_size, DEFLATE_MAX_RATIO * info.compress_size + 4096)
    else:                                              # bzip2, lzma: the stated size, then the memory limit
        total = info.file_size
    try:
        stream = archive.open(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as e:
        raise _unsupported(source, f"cannot read it as a NumPy array ({e})") from None
    with stream:
        return _read_npy(stream, source, total, check_end=True)


@contextlib.contextmanager
def _open_npz(path):
    """The zip archive of an .npz file (closed afterwards); a file that is no zip is a DataError."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise _unsupported(path, f"cannot read it as a NumPy .npz archive ({e})") from None
    with archive:
        yield archive


def _npz_members(archive):
    """{array name: zip member} of an .npz archive (np.savez stores array x as x.npy)."""
    return {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}


def read_arrays(path, names):
    """{name: array or None} for `names` of an .npz archive, and the names it holds; an .npy file's one
    array comes under names[0]. Each is read lazily through the bounded reader of the training data:
    never unpickled, its header checked against the file's size and memory_limit() before anything
    is allocated. A single array under another name stands for names[0] (np.savez(path, x=...))."""
    if not path.lower().endswith(".npz") and not zipfile.is_zipfile(path):
        return {names[0]: _load_npy(path), **{name: None for name in names[1:]}}, [names[0]]
    with _open_npz(path) as archive:
        members = _npz_members(archive)
        if names[0] not in members and len(members) == 1:
            members = {names[0]: next(iter(members.values()))}
        found = {name: _read_npz_member(archive, members[name], f"{path} (array {name!r})") if name in members
                 else None for name in names}
        return found, list(members)


def _load_npz(path):
    """The `images` array (else `arr_0`, else the first) and `labels` if present (checked: check_labels)."""
    with _open_npz(path) as archive:
        members = _npz_members(archive)
        if not members:
            raise _unsupported(path, "the .npz archive holds no arrays")
        key = "images" if "images" in members else "arr_0" if "arr_0" in members else next(iter(members))
        source = f"{path} (array {key!r})"
        images = _array_to_nchw(_read_npz_member(archive, members[key], source), source)
        labels = None
        if "labels" in members and key != "labels":
            source = f"{path} (array 'labels')"
            labels = check_labels(_read_npz_member(archive, members["labels"], source), len(images), source)
    return images, labels


def _array_to_nchw(a, source):
    """An NHWC / NHW / (unambiguous) NCHW array of pixels as float32 NCHW in [-1, 1].

    uint8 (and other integers in 0..255) are divided by 255. Floats are read by range:
    within [0, 1] -> [0, 1] data; within [-1, 1] with negatives -> already scaled;
    within [0, 255] -> 8-bit values.
    """
    shape = a.shape
    if a.ndim == 3:
        a = a[:, None]                                         # NHW -> N1HW
    elif a.ndim == 4:
        last, second = shape[-1] in (1, 3), shape[1] in (1, 3)
        if last:                                               # NHWC (also when both fit: the documented layout)
            a = a.transpose(0, 3, 1, 2)
        elif not second:
            raise _unsupported(source, f"shape {shape} has no channel axis of size 1 or 3 "
                                       f"(expected NHWC, NHW or NCHW)")
    else:
        raise _unsupported(source, f"shape {shape} is not a stack of images (expected (N, H, W, C) or (N, H, W))")
    if a.shape[0] == 0 or a.shape[2] == 0 or a.shape[3] == 0:
        raise _unsupported(source, f"shape {shape} holds no pixels")
    kind = a.dtype.kind
    if kind == "u" or kind == "i":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise _unsupported(source, f"integer pixels span {lo}..{hi}, outside 0..255")
        return a.astype(backend.DTYPE) / 127.5 - 1
    if kind != "f":
        raise _unsupported(source, f"dtype {a.dtype} is not pixels (use uint8 or float)")
    a = a.astype(backend.DTYPE)
    if not host.isfinite(a).all():
        raise _unsupported(source, "the array contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return a * 2 - 1
    if lo >= -1 and hi <= 1:
        return a
    if lo >= 0 and hi <= 255:
        return a / 127.5 - 1
    raise _unsupported(source, f"float pixels span {lo:g}..{hi:g}; expected [0, 1], [-1, 1] or [0, 255]")


def _to_channels(images, channels, source):
    """Grey <-> RGB for NCHW arrays (ITU-R 601 luma, as PIL's convert('L'))."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return host.repeat(images, 3, axis=1)
    if c == 3 and channels == 1:
        luma = host.array([0.299, 0.587, 0.114], dtype=backend.DTYPE)
        return (images * luma[:, None, None]).sum(axis=1, keepdims=True)
    raise DataError(f"{source}: cannot convert {c} channels to {channels}")


def _fit_array(images, image_size, source):
    """Resize + centre-crop float NCHW images to image_size (square by default) through PIL's float mode."""
    n, c, h, w = images.shape
    if image_size is None:
        image_size = min(h, w)
    if (h, w) == (image_size, image_size):
        return images
    _check_fits(n * c * image_size * image_size * 4, source,
                f"{n:,} images of {c}x{image_size}x{image_size} as float32")
    out = host.empty((n, c, image_size, image_size), dtype=backend.DTYPE)
    for i in range(n):
        for j in range(c):
            plane = _resize_crop(Image.fromarray(images[i, j], mode="F"), image_size)
            out[i, j] = host.asarray(plane)
    return out.clip(-1, 1)   # bicubic overshoots a little at edges


# --- MNIST IDX

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


GZIP_ERRORS = (OSError, EOFError, zlib.error)


def _open_file(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


def _is_gzip(f):
    """True if the open file starts with the gzip magic number, whatever it is called (rewinds it)."""
    magic = f.read(2)
    f.seek(0)
    return magic == b"\x1f\x8b"


def read_idx(path):
    """An IDX file (the MNIST format, gzipped or not) as a numpy array; checks magic and size.

    The header is checked before the data is read: at most MAX_IDX_DIMS dimensions, a size the file
    can hold (exactly its size, or at most DEFLATE_MAX_RATIO times it when gzipped) and that fits in
    memory_limit(); a gzip stream is decompressed in chunks and refused once it goes past that size.
    """
    path = Path(path)
    with _open_file(path) as f:
        size, gzipped = os.fstat(f.fileno()).st_size, _is_gzip(f)
        with (gzip.GzipFile(fileobj=f, mode="rb") if gzipped else f) as stream:
            return _read_idx_stream(stream, path, size, gzipped)


def _read_idx_stream(stream, path, size, gzipped):
    try:
        magic = stream.read(4)
        ndim = magic[3] if len(magic) == 4 else 0
        dims = stream.read(4 * ndim) if magic[:2] == b"\x00\x00" and ndim <= MAX_IDX_DIMS else b""
    except GZIP_ERRORS as e:
        raise DataError(f"{path}: corrupt gzip file ({e}); download it again") from None
    if len(magic) < 4 or magic[:2] != b"\x00\x00" or magic[2] not in IDX_DTYPES or ndim == 0:
        raise _unsupported(path, "not a recognised format (no IDX magic number 0x0000tt0d)")
    if ndim > MAX_IDX_DIMS:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions; MNIST images have 3 and labels 1 "
                        f"(minidiff reads at most {MAX_IDX_DIMS}); the file is corrupt, download it again")
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated; download the file again")
    header = 4 + 4 * ndim
    shape, count = _check_shape(struct.unpack(f">{ndim}I", dims), path)   # Python ints: no overflow
    dtype = host.dtype(IDX_DTYPES[magic[2]])
    expected = count * dtype.itemsize
    if not gzipped and size - header != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected:,} bytes) but the file "
                        f"holds {size - header:,}; the file is truncated or corrupt")
    if gzipped and expected > DEFLATE_MAX_RATIO * size:
        raise DataError(f"{path}: IDX header says shape {shape} ({_size(expected)}) but a gzip file of "
                        f"{_size(size)} expands to at most {_size(DEFLATE_MAX_RATIO * size)}; the file is "
                        f"truncated or corrupt, download it again")
    _check_fits(count * max(4, dtype.itemsize), path, f"its IDX array of shape {shape} (as float32)")
    return _read_exact(stream, expected, path, check_end=gzipped).view(dtype).reshape(shape)


def _load_idx_images(path):
    """An IDX image file, with labels from its sibling (train-images-idx3 -> train-labels-idx1)."""
    images = read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path}: IDX array has shape {images.shape}, not (N, H, W) images "
                        f"(is this a labels file? pass the *-images-idx3-ubyte file)")
    labels = None
    sibling = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if sibling != path and sibling.exists():
        labels = check_labels(read_idx(sibling), len(images), sibling)
    return _array_to_nchw(images, path), labels


# --- CIFAR-10 python batches

def _is_cifar_name(name):
    return name.startswith("data_batch_") or name == "test_batch"


def _cifar_batches_in(folder):
    """data_batch_1..5 in the folder or its cifar-10-batches-py subfolder (test_batch stays out)."""
    for candidate in (folder, folder / "cifar-10-batches-py"):
        batches = sorted(candidate.glob("data_batch_*")) if candidate.is_dir() else []
        if batches:
            return batches
    return []


_RECONSTRUCT = host.ndarray.__reduce__(host.zeros(0))[0]   # numpy's own (numpy.core or numpy._core)


class _PickledArray(host.ndarray):
    """An ndarray being rebuilt by _CifarUnpickler: its state is checked before numpy allocates it.

    numpy's __setstate__ allocates the declared shape before comparing it with the data for
    object arrays, and reports an overflowing shape as MemoryError; here the data must be plain
    bytes of exactly the declared size, which the pickle (so the file) really holds.
    """

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype, _, raw = state[-4:]
        if not isinstance(dtype, host.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError("refusing a numpy object array")
        if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
            raise pickle.UnpicklingError(f"malformed numpy array shape {shape!r}")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape) * dtype.itemsize:
            raise pickle.UnpicklingError(f"a numpy array declares shape {shape} ({dtype}) but its data "
                                         f"is {len(raw) if isinstance(raw, (bytes, bytearray)) else 'not'} bytes")
        super().__setstate__(state)


class _NdarrayName:
    """What `numpy.ndarray` means inside a CIFAR pickle: the subtype argument of _reconstruct, nothing more."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refusing to call numpy.ndarray (a batch never does)")


_NDARRAY = _NdarrayName()


class _CifarUnpickler(getattr(pickle, "_Unpickler", pickle.Unpickler)):
    """CIFAR-10's python batches are pickles: that is the format the dataset ships in.

    Unpickling can run arbitrary code, so this one only resolves the few globals a
    batch needs (numpy array reconstruction, bytes from Python 2) and refuses the rest.
    Each of them is a checked stand-in: no array larger than the pickle itself (whose size
    the file bounds), no object arrays, no codec but latin-1 (hex or base64 could double the
    data at each step). It is pickle's pure-Python unpickler: the C one allocates whatever
    length an opcode declares (8 bytes of a pickle can ask for exabytes) before reading it.
    """
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
               ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
               ("numpy", "ndarray"): "_ndarray", ("numpy", "dtype"): "_dtype", ("_codecs", "encode"): "_encode",
               ("numpy.core.numeric", "_frombuffer"): "_frombuffer",
               ("numpy._core.numeric", "_frombuffer"): "_frombuffer"}

    def __init__(self, raw):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.limit = len(raw)

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return _NDARRAY if self.ALLOWED[module, name] == "_ndarray" else getattr(self, self.ALLOWED[module, name])

    def _check(self, shape, dtype):
        dtype = self._dtype(dtype)
        if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
            raise pickle.UnpicklingError(f"malformed numpy array shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.limit:
            raise pickle.UnpicklingError(f"a numpy array declares shape {shape} ({dtype}, {_size(nbytes)}) "
                                         f"but the whole pickle is {_size(self.limit)}")
        return dtype

    def _reconstruct(self, subtype, shape, dtype):
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError("refusing to rebuild anything but a plain numpy array")
        return _RECONSTRUCT(_PickledArray, shape, self._check(shape, dtype))

    @staticmethod
    def _dtype(*args):
        dtype = host.dtype(*args)
        if dtype.hasobject:
            raise pickle.UnpicklingError("refusing a numpy object array")
        return dtype

    @staticmethod
    def _encode(obj, encoding="utf-8", errors="strict"):
        if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1":
            raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r} (a batch uses latin-1)")
        return codecs.encode(obj, encoding, errors)

    def _frombuffer(self, buf, dtype, shape, order):
        return host.frombuffer(buf, dtype=self._check(shape, dtype)).reshape(shape, order=order)


PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, LookupError, TypeError, ValueError, AttributeError,
                 struct.error, RecursionError, OverflowError)


def _read_cifar_file(file):
    """A batch file's bytes (gunzipped if gzipped), refused if its images would not fit in memory_limit()."""
    with _open_file(file) as f:
        size, gzipped = os.fstat(f.fileno()).st_size, _is_gzip(f)
        if not gzipped:
            _check_fits(4 * size, file, "its images (as float32)")
            return f.read()
        bound = min(DEFLATE_MAX_RATIO * size, memory_limit()[0] // 4)
        chunks, total = [], 0
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as stream:
                while total <= bound:
                    chunk = stream.read(min(READ_CHUNK, bound + 1 - total))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
        except GZIP_ERRORS as e:
            raise DataError(f"{file}: corrupt gzip file ({e}); download it again") from None
        if total > bound:
            _check_fits(4 * total, file, "its decompressed images (as float32, at least)")
            raise DataError(f"{file}: decompresses to more than {_size(bound)}, more than a gzip file of "
                            f"{_size(size)} can hold; the file is corrupt, download it again")
        return b"".join(chunks)


def _load_cifar(files):
    """CIFAR-10 batch files -> (N, 3, 32, 32) float32 and int64 labels (checked: check_labels)."""
    images, labels, rows = [], [], 0
    fix = "use the files from cifar-10-python.tar.gz"
    for file in files:
        try:
            batch = _CifarUnpickler(_read_cifar_file(file)).load()
            data, batch_labels = batch[b"data"], batch[b"labels"]
        except PICKLE_ERRORS as e:
            detail = str(e) or ("the pickle ends early" if isinstance(e, EOFError) else "malformed")
            raise DataError(f"{file}: not a CIFAR-10 python batch ({type(e).__name__}: {detail}); {fix}") from None
        if not isinstance(data, host.ndarray):
            raise DataError(f"{file}: CIFAR-10 data is a {type(data).__name__}, not a numpy array; {fix}")
        data = host.asarray(data)                          # the plain ndarray of a _PickledArray
        if data.dtype != host.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{file}: CIFAR-10 data has shape {data.shape} and dtype {data.dtype}, "
                            f"expected (N, 3072) uint8")
        if isinstance(batch_labels, (list, tuple)):
            odd = next((x for x in batch_labels if type(x) is not int), None)
            if odd is not None:
                raise DataError(f"{file}: labels hold a {type(odd).__name__}, not only integers; fix or "
                                f"remove the labels (one integer class 0, 1, 2, ... per image)")
        elif not isinstance(batch_labels, host.ndarray):
            raise DataError(f"{file}: labels are a {type(batch_labels).__name__}, not a list of integers; {fix}")
        try:
            batch_labels = host.asarray(batch_labels)
        except (OverflowError, ValueError) as e:
            raise DataError(f"{file}: labels are not integers ({e}); {fix}") from None
        rows += len(data)
        _check_fits(rows * 3 * 32 * 32 * 4, file, f"{rows:,} CIFAR-10 images (as float32)")
        images.append(data.reshape(-1, 3, 32, 32))       # rows are R, G, B planes of 32x32
        labels.append(check_labels(batch_labels, len(data), file))
    images = host.concatenate(images)
    return images.astype(backend.DTYPE) / 127.5 - 1, host.concatenate(labels)


# ---------------------------------------------------------------- batches for training

def random_hflip(images, rng=None):
    """Each NCHW image mirrored left-right with probability 1/2 (a copy; data augmentation)."""
    flip = _host_rng(rng).random(len(images)) < 0.5
    out = images.copy()
    out[flip] = images[flip, ..., ::-1]
    return out


class Batches:
    """An endless, reshuffled-every-epoch stream of batches whose position can be saved.

    Every batch is full: when an epoch runs out it continues into the next one's order.
    The order of epoch e and the flips of batch k come from counter-based seeds
    (seed, e) and (seed, k), so the state is three integers and restoring it replays
    exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, data, batch_size, rng=None, hflip=False, labels=None):
        if len(data) == 0:
            raise DataError("cannot draw batches from an empty data set")
        if batch_size < 1:
            raise DataError(f"batch size must be positive, not {batch_size}")
        if hflip and data.ndim != 4:
            raise DataError(f"horizontal flips need NCHW images, not shape {data.shape}")
        if labels is not None and len(labels) != len(data):
            raise DataError(f"{len(labels)} labels for {len(data)} data points")
        self.data, self.batch_size, self.hflip, self.labels = data, int(batch_size), hflip, labels
        self.seed = int(_host_rng(rng).integers(2 ** 63))   # one draw: our own stream from here on
        self.epoch, self.position, self.count = 0, 0, 0
        self._order = None

    def _epoch_order(self):
        if self._order is None:
            self._order = host.random.default_rng([self.seed, 0, self.epoch]).permutation(len(self.data))
        return self._order

    def next_indices(self):
        """Indices of the next batch (advances the stream)."""
        parts, need = [], self.batch_size
        while need:
            take = self._epoch_order()[self.position:self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(self.data):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        self.count += 1
        return host.concatenate(parts)

    def __iter__(self):
        return self

    def __next__(self):
        """The next batch; (batch, its labels) when the stream was given labels."""
        index = self.next_indices()
        batch = self.data[index]
        if self.hflip:
            batch = random_hflip(batch, host.random.default_rng([self.seed, 1, self.count]))
        return batch if self.labels is None else (batch, self.labels[index])

    def state_dict(self):
        """The stream position as plain ints (n and batch_size to catch a changed data set)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "count": self.count,
                "n": len(self.data), "batch_size": self.batch_size}

    def load_state_dict(self, state):
        """Continue exactly where `state_dict()` was taken.

        Every entry must be a non-negative integer. A position past the end of an epoch is
        reduced arithmetically (position p of epoch e is position p mod n of epoch e + p // n),
        so any saved state costs O(1); the stream never loops to catch up.
        """
        keys = ("seed", "epoch", "position", "count", "n", "batch_size")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise DataError(f"saved batch state must hold {', '.join(keys)}; the checkpoint is corrupt")
        values = {}
        for k in keys:
            v = state[k]
            if isinstance(v, host.ndarray) and v.ndim == 0:
                v = v[()]
            if isinstance(v, (bool, host.bool_)) or not isinstance(v, (int, host.integer)) or v < 0:
                raise DataError(f"saved batch state has {k} = {v!r}, not a non-negative integer; "
                                f"the checkpoint is corrupt")
            values[k] = int(v)
        if values["n"] != len(self.data) or values["batch_size"] != self.batch_size:
            raise DataError(f"saved batch state is for {values['n']} images in batches of "
                            f"{values['batch_size']}, but this data set has {len(self.data)} images in "
                            f"batches of {self.batch_size}; resume with the same data and batch size")
        self.seed, self.count = values["seed"], values["count"]
        self.epoch = values["epoch"] + values["position"] // len(self.data)
        self.position = values["position"] % len(self.data)
        self._order = None
