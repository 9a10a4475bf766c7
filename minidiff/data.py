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
import gzip
import io
import os
import pickle
import struct
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
        images = _array_to_nchw(_np_load(path), path)
    elif _is_cifar_name(path.name):
        images, labels = _load_cifar([path])
    else:
        images, labels = _load_idx_images(path)     # checks the IDX magic number itself
    if labels is not None and (len(labels) != len(images) or (len(labels) and labels.min() < 0)):
        labels = None                                 # labels that do not line up (or are negative) are no labels
    images = _to_channels(images, channels, path) if channels else images
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
    index = {name: k for k, name in enumerate(names)}
    return host.asarray([index[f.relative_to(folder).parts[0]] for f in files], dtype=host.int64)


GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _open_image(file):
    try:
        image = Image.open(file)
        image.load()                        # decode now, so a truncated file fails here, with its name
        image = ImageOps.exif_transpose(image)   # phone photos are stored sideways plus an EXIF rotation
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{file}: cannot read this image ({e}); delete or re-save it") from None
    return image


def _load_image_files(files, source, image_size, channels):
    """Decode, convert, resize and crop image files into one (N, C, S, S) float32 array."""
    images = [_open_image(f) for f in files]
    if channels is None:                    # grey only if every image is grey
        channels = 1 if all(im.mode in GREY_MODES for im in images) else 3
    if image_size is None:
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = sorted(sizes)[:2]
            first = next(f for f, im in zip(files, images) if im.size == (w0, h0))
            other = next(f for f, im in zip(files, images) if im.size == (w1, h1))
            raise DataError(f"{source}: images have different sizes ({first.name} is {w0}x{h0}, "
                            f"{other.name} is {w1}x{h1}); pass --image-size to resize and crop them all")
        image_size = min(sizes.pop())       # non-square images are centre-cropped to a square
    out = host.empty((len(images), channels, image_size, image_size), dtype=backend.DTYPE)
    for i, image in enumerate(images):
        if image.mode.startswith("I"):     # 16-bit grey: keep the top 8 bits (convert('L') would clip)
            image = Image.fromarray((host.asarray(image, dtype=host.float64) / 256).clip(0, 255).astype(host.uint8))
        image = _resize_crop(image.convert("L" if channels == 1 else "RGB"), image_size)
        pixels = host.asarray(image, dtype=backend.DTYPE).reshape(image_size, image_size, channels)
        out[i] = pixels.transpose(2, 0, 1) / 127.5 - 1
    return out


def _resize_crop(image, size):
    """Resize so the shorter side is `size` (bicubic; box-filter when shrinking a lot), then centre-crop."""
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=2.0)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


# --- arrays

def _np_load(path):
    try:
        return host.load(path, allow_pickle=False)   # no pickle: an .npy/.npz never runs code
    except (ValueError, OSError, EOFError) as e:
        raise _unsupported(path, f"cannot read it as a NumPy array ({e})") from None


def _load_npz(path):
    """The `images` array (else `arr_0`, else the first) and `labels` if present."""
    with _np_load(path) as f:
        keys = list(f.keys())
        if not keys:
            raise _unsupported(path, "the .npz archive holds no arrays")
        key = "images" if "images" in keys else "arr_0" if "arr_0" in keys else keys[0]
        images = _array_to_nchw(f[key], f"{path} (array {key!r})")
        labels = f["labels"] if "labels" in keys and key != "labels" else None
    if labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
        labels = None
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
    out = host.empty((n, c, image_size, image_size), dtype=backend.DTYPE)
    for i in range(n):
        for j in range(c):
            plane = _resize_crop(Image.fromarray(images[i, j], mode="F"), image_size)
            out[i, j] = host.asarray(plane)
    return out.clip(-1, 1)   # bicubic overshoots a little at edges


# --- MNIST IDX

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path):
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":                  # the gzip magic number, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip file ({e}); download it again") from None
    return raw


def read_idx(path):
    """An IDX file (the MNIST format, gzipped or not) as a numpy array; checks magic and size."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise _unsupported(path, "not a recognised format (no IDX magic number 0x0000tt0d)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated; download the file again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = host.dtype(IDX_DTYPES[raw[2]])
    expected = int(host.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
                        f"holds {len(raw) - header}; the file is truncated or corrupt")
    return host.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _load_idx_images(path):
    """An IDX image file, with labels from its sibling (train-images-idx3 -> train-labels-idx1)."""
    images = read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path}: IDX array has shape {images.shape}, not (N, H, W) images "
                        f"(is this a labels file? pass the *-images-idx3-ubyte file)")
    labels = None
    sibling = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if sibling != path and sibling.exists():
        labels = read_idx(sibling).astype(host.int64)
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


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles: that is the format the dataset ships in.

    Unpickling can run arbitrary code, so this one only resolves the few globals a
    batch needs (numpy array reconstruction, bytes from Python 2) and refuses the rest.
    """
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar(files):
    """CIFAR-10 batch files -> (N, 3, 32, 32) float32 and int64 labels."""
    images, labels = [], []
    for file in files:
        try:
            batch = _CifarUnpickler(io.BytesIO(_read_maybe_gzip(file)), encoding="bytes").load()
            data = host.asarray(batch[b"data"])
            batch_labels = host.asarray(batch[b"labels"], dtype=host.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{file}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
                            f"use the files from cifar-10-python.tar.gz") from None
        if data.dtype != host.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{file}: CIFAR-10 data has shape {data.shape} and dtype {data.dtype}, "
                            f"expected (N, 3072) uint8")
        images.append(data.reshape(-1, 3, 32, 32))       # rows are R, G, B planes of 32x32
        labels.append(batch_labels)
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
