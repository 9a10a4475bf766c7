"""minidiff.data: bundled sets and their split, toys, loaders for users' files, errors, batches."""
import gzip
import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from minidiff import backend, data
from minidiff.data import DataError


# ---------------------------------------------------------------- bundled sets

@pytest.mark.parametrize("name, size, levels", [("digits", 8, 17), ("mnist", 32, 256)])
def test_bundled_sets_have_the_documented_shape_range_and_levels(name, size, levels):
    images, labels = data.load_dataset(name, "all")
    assert images.dtype == np.float32 and images.shape[1:] == (1, size, size)
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.shape == (len(images),) and set(labels.tolist()) == set(range(10))
    assert data.grey_levels(name) == levels
    # Pixel values sit exactly on the data set's grey levels.
    steps = (images + 1) / 2 * (levels - 1)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)


def test_mnist_is_padded_with_background():
    images, _ = data.load_dataset("mnist", "all")
    border = np.concatenate([images[:, :, :2].ravel(), images[:, :, -2:].ravel(),
                             images[:, :, :, :2].ravel(), images[:, :, :, -2:].ravel()])
    assert (border == -1).all()


@pytest.mark.parametrize("name, n", [("digits", 1797), ("mnist", 5000)])
def test_split_is_disjoint_complete_about_90_10_and_stable(name, n):
    train, heldout = data.split_indices(n)
    assert len(np.intersect1d(train, heldout)) == 0
    assert sorted(np.concatenate([train, heldout]).tolist()) == list(range(n))
    assert len(heldout) == n // 10
    again_train, again_heldout = data.split_indices(n)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(heldout, again_heldout)

    all_images, all_labels = data.load_dataset(name, "all")
    train_images, train_labels = data.load_dataset(name, "train")
    heldout_images, _ = data.load_dataset(name, "heldout")
    np.testing.assert_array_equal(train_images, all_images[train])
    np.testing.assert_array_equal(train_labels, all_labels[train])
    np.testing.assert_array_equal(heldout_images, all_images[heldout])
    np.testing.assert_array_equal(data.load_dataset(name, "heldout", with_labels=False), heldout_images)


def test_heldout_mnist_mixes_labels_although_the_file_is_sorted():
    _, labels = data.load_dataset("mnist", "heldout")
    assert len(set(labels[:50].tolist())) == 10


def test_load_images_returns_metadata():
    images, labels, info = data.load_images("digits", "heldout")
    assert info == {"name": "digits", "image_size": 8, "channels": 1, "grey_levels": 17, "hflip": False,
                    "num_classes": 10}
    assert images.shape == (179, 1, 8, 8) and labels.shape == (179,)
    images, _, info = data.load_images("mnist", "train", channels=3)
    assert images.shape == (4500, 3, 32, 32) and info["channels"] == 3 and info["grey_levels"] == 256


def test_unknown_names_splits_and_sizes_list_what_is_known():
    with pytest.raises(DataError, match="digits, mnist, swissroll"):
        data.load_images("digitz")
    with pytest.raises(DataError, match="heldout"):
        data.load_dataset("digits", "validation")
    with pytest.raises(DataError, match="8x8"):
        data.load_images("digits", image_size=32)
    with pytest.raises(DataError, match="sample_toy"):
        data.load_images("moons")
    with pytest.raises(DataError, match="checkerboard"):
        data.sample_toy("spiral", 10)


# ---------------------------------------------------------------- synthetic

@pytest.mark.parametrize("name", data.TOY_DATASETS)
def test_toys_are_seeded_float32_and_about_unit_scale(name):
    x = data.sample_toy(name, 4000, np.random.default_rng(0))
    assert x.shape == (4000, 2) and x.dtype == np.float32
    assert np.all(np.abs(x.mean(axis=0)) < 0.4) and np.all((0.5 < x.std(axis=0)) & (x.std(axis=0) < 1.5))
    np.testing.assert_array_equal(x, data.sample_toy(name, 4000, backend.Generator(0)))
    np.testing.assert_array_equal(x, data.sample_toy(name, 4000, seed=0))
    assert not np.array_equal(x, data.sample_toy(name, 4000, 1))


def test_mondrian_is_seeded_with_primary_colours_and_black_lines():
    image = data.mondrian(64, 3)
    assert image.shape == (3, 64, 64) and image.dtype == np.float32
    assert image.min() == -1.0 and image.max() == 1.0
    np.testing.assert_array_equal(image, data.mondrian(64, 3))
    pixels = {tuple(p) for p in np.round((image.reshape(3, -1).T.astype(np.float64) + 1) / 2, 2).tolist()}
    assert pixels <= {(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)} | {tuple(c) for c in data.PRIMARY_COLOURS}
    assert (image[:, 0] == -1).all() and (image[:, :, 0] == -1).all()     # the black frame
    assert data.mondrian(32, 3, channels=1).shape == (1, 32, 32)


# ---------------------------------------------------------------- users' files

def _write_pngs(folder, sizes, mode="RGB"):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_folder_of_png_and_jpeg_is_resized_cropped_and_scaled(tmp_path):
    folder = _write_pngs(tmp_path / "photos", [(20, 10), (12, 12)])
    Image.new("RGB", (30, 40), (255, 0, 0)).save(folder / "red.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    images, labels = data.load_path(folder, image_size=8)
    assert images.shape == (3, 3, 8, 8) and images.dtype == np.float32 and labels is None
    assert -1 <= images.min() and images.max() <= 1
    red = images[2]                            # sorted: im0.png, im1.png, red.jpg
    assert red[0].mean() > 0.9 and red[1].mean() < -0.9
    grey, _ = data.load_path(folder, image_size=8, channels=1)
    assert grey.shape == (3, 1, 8, 8)


def test_grey_folder_stays_grey_and_exact(tmp_path):
    folder = tmp_path / "grey"
    folder.mkdir()
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 17
    Image.fromarray(pixels).save(folder / "a.png")
    images, _ = data.load_path(folder)
    np.testing.assert_allclose(images[0, 0], pixels / 127.5 - 1, atol=1e-6)
    _, _, info = data.load_images(str(folder), "all")
    assert info["channels"] == 1 and info["image_size"] == 4 and info["hflip"] is True


def test_mixed_sizes_without_image_size_name_the_files(tmp_path):
    folder = _write_pngs(tmp_path / "mixed", [(8, 8), (9, 9)])
    with pytest.raises(DataError, match=r"im0\.png.*im1\.png.*--image-size"):
        data.load_path(folder)


def test_missing_empty_and_unreadable_inputs_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.npz: no such file"):
        data.load_path(tmp_path / "nowhere.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: the folder holds no images"):
        data.load_path(tmp_path / "empty")
    folder = _write_pngs(tmp_path / "broken", [(8, 8)])
    (folder / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="bad.png: cannot read this image"):
        data.load_path(folder)
    (tmp_path / "mystery.bin").write_bytes(b"hello world")
    with pytest.raises(DataError, match="mystery.bin: not a recognised format"):
        data.load_path(tmp_path / "mystery.bin")


@pytest.mark.parametrize("layout", ["NHWC", "NHW", "NCHW"])
def test_npy_layouts_and_uint8_scaling(tmp_path, layout):
    nhwc = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    array = {"NHWC": nhwc, "NHW": nhwc[..., 0], "NCHW": nhwc.transpose(0, 3, 1, 2)}[layout]
    np.save(tmp_path / "x.npy", array)
    images, labels = data.load_path(tmp_path / "x.npy")
    expected = nhwc.transpose(0, 3, 1, 2)[:, :1 if layout == "NHW" else 3] / 127.5 - 1
    np.testing.assert_allclose(images, expected, atol=1e-6)
    assert labels is None


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)])
def test_float_arrays_are_read_by_their_range(tmp_path, lo, hi):
    x = np.linspace(lo, hi, 2 * 4 * 4, dtype=np.float64).reshape(2, 4, 4)
    np.save(tmp_path / "f.npy", x)
    images, _ = data.load_path(tmp_path / "f.npy")
    assert images.dtype == np.float32
    assert images.min() == pytest.approx(-1) and images.max() == pytest.approx(1)


def test_npz_prefers_images_then_arr_0_and_keeps_labels(tmp_path):
    x = np.zeros((4, 5, 5), np.uint8)
    np.savez(tmp_path / "a.npz", other=np.ones((2, 3, 3), np.uint8), images=x, labels=np.arange(4))
    images, labels = data.load_path(tmp_path / "a.npz")
    assert images.shape == (4, 1, 5, 5) and labels.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "b.npz", np.full((3, 4, 4, 3), 255, np.uint8))    # saved as arr_0
    images, labels = data.load_path(tmp_path / "b.npz", image_size=2)
    assert images.shape == (3, 3, 2, 2) and labels is None
    np.testing.assert_allclose(images, 1.0)


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 4), np.uint8), "not a stack of images"),
    (np.zeros((2, 5, 5, 7), np.uint8), "no channel axis"),
    (np.full((2, 4, 4), 300, np.int32), "outside 0..255"),
    (np.full((2, 4, 4), 3.0e3), "float pixels span"),
    (np.full((2, 4, 4), np.nan), "NaN"),
    (np.zeros((2, 4, 4), complex), "not pixels"),
    (np.zeros((0, 4, 4), np.uint8), "no pixels"),
])
def test_wrong_array_shapes_and_dtypes_name_the_file(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=f"bad.npy.*{message}"):
        data.load_path(tmp_path / "bad.npy")


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy: cannot read it as a NumPy array"):
        data.load_path(tmp_path / "obj.npy")


def _idx_bytes(array):
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("gzipped", [False, True])
def test_mnist_idx_files_with_sibling_labels(tmp_path, gzipped):
    x = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    y = np.arange(6, dtype=np.uint8)
    suffix, pack = (".gz", gzip.compress) if gzipped else ("", lambda b: b)
    (tmp_path / f"train-images-idx3-ubyte{suffix}").write_bytes(pack(_idx_bytes(x)))
    (tmp_path / f"train-labels-idx1-ubyte{suffix}").write_bytes(pack(_idx_bytes(y)))
    images, labels = data.load_path(tmp_path / f"train-images-idx3-ubyte{suffix}")
    np.testing.assert_allclose(images[:, 0], x / 127.5 - 1, atol=1e-6)
    assert labels.tolist() == list(range(6))


def test_truncated_idx_and_labels_file_are_explained(tmp_path):
    raw = _idx_bytes(np.zeros((3, 4, 4), np.uint8))
    (tmp_path / "short-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="short-idx3-ubyte: IDX header says shape"):
        data.load_path(tmp_path / "short-idx3-ubyte")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: .*labels file"):
        data.load_path(tmp_path / "t10k-labels-idx1-ubyte")


def _write_cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def test_cifar_batch_file_and_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    first = _write_cifar_batch(folder / "data_batch_1", 3, 0)
    _write_cifar_batch(folder / "data_batch_2", 2, 1)
    _write_cifar_batch(folder / "test_batch", 4, 2)
    images, labels = data.load_path(folder / "data_batch_1")
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == first[b"labels"]
    # Channel planes: the first 1024 bytes of a row are the red plane.
    np.testing.assert_allclose(images[0, 0].ravel(), first[b"data"][0, :1024] / 127.5 - 1, atol=1e-6)
    images, labels = data.load_path(tmp_path)       # the folder above: training batches only
    assert images.shape == (5, 3, 32, 32) and len(labels) == 5


def test_cifar_loader_refuses_pickles_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="data_batch_1: not a CIFAR-10 python batch.*refusing"):
        data.load_path(tmp_path / "data_batch_1")


def test_user_paths_get_the_same_split(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (30, 4, 4), dtype=np.uint8))
    train, _, info = data.load_images(str(tmp_path / "x.npy"), "train")
    heldout, _, _ = data.load_images(str(tmp_path / "x.npy"), "heldout")
    assert len(train) == 27 and len(heldout) == 3 and info["hflip"] is False
    np.save(tmp_path / "few.npy", np.zeros((5, 4, 4), np.uint8))
    with pytest.raises(DataError, match="few.npy: 5 images are too few"):
        data.load_images(str(tmp_path / "few.npy"), "heldout")


# ---------------------------------------------------------------- batches

def test_batches_cover_each_epoch_once_and_reshuffle():
    x = np.arange(10, dtype=np.float32)[:, None]
    batches = data.Batches(x, 5, rng=0)
    epoch1 = np.concatenate([next(batches) for _ in range(2)]).ravel()
    epoch2 = np.concatenate([next(batches) for _ in range(2)]).ravel()
    assert sorted(epoch1.tolist()) == sorted(epoch2.tolist()) == list(range(10))
    assert not np.array_equal(epoch1, epoch2)


def test_batches_state_round_trip_replays_the_same_batches():
    x = np.random.default_rng(0).standard_normal((7, 1, 2, 3)).astype(np.float32)
    batches = data.Batches(x, 3, backend.Generator(5), hflip=True)   # 7 % 3 != 0: batches cross epochs
    for _ in range(4):
        next(batches)
    state = batches.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [next(batches) for _ in range(5)]
    restored = data.Batches(x, 3, backend.Generator(99), hflip=True)
    restored.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(next(restored), want)
    with pytest.raises(DataError, match="same data and batch size"):
        data.Batches(x, 4, 0).load_state_dict(state)


def test_random_hflip_mirrors_about_half():
    x = np.arange(2 * 1 * 1 * 3, dtype=np.float32).reshape(2, 1, 1, 3).repeat(500, axis=0)
    flipped = data.random_hflip(x, 0)
    is_flipped = (flipped[:, 0, 0] == x[:, 0, 0, ::-1]).all(axis=1)
    assert ((flipped == x).all(axis=(1, 2, 3)) | is_flipped).all()
    assert 400 < is_flipped.sum() < 600


def test_folder_with_one_subfolder_per_class_is_labelled(tmp_path):
    root = tmp_path / "pets"
    root.mkdir()
    _write_pngs(root / "dog", [(8, 8)] * 3)
    _write_pngs(root / "cat", [(8, 8)] * 2)
    (root / "cat" / "deeper").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / "deeper" / "x.png")   # nested: still class "cat"
    assert data.class_folders(root) == ["cat", "dog"]
    images, labels = data.load_path(root)
    assert images.shape == (6, 3, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    _, _, info = data.load_images(str(root), "all")
    assert info["num_classes"] == 2
    Image.new("RGB", (8, 8)).save(root / "loose.png")   # an image outside the class folders: no labels
    assert data.class_folders(root) is None and data.load_path(root)[1] is None
    (tmp_path / "one").mkdir()
    only = _write_pngs(tmp_path / "one" / "images", [(8, 8)] * 2)   # a single subfolder is not a class layout
    assert data.load_path(only.parent)[1] is None


def test_num_classes_in_info():
    assert data.load_images("digits", "heldout")[2]["num_classes"] == 10
    assert data.num_classes(None) is None and data.num_classes(np.array([0, 4, 2])) == 5


# ---------------------------------------------------------------- hostile input: one DataError, bounded memory
# Each hostile file is a few bytes to a few MB made here; the ones that would need gigabytes if
# believed are loaded in a subprocess under a 1.5 GB address-space limit (ulimit -v), where a
# loader that allocated what a header claims would die of MemoryError instead of a DataError.

import json
import os
import subprocess
import sys
import zlib

from minidiff import cli

AS_LIMIT = 1536 << 20
_LIMITED = r"""
import json, resource, sys
from minidiff import data
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
for path in sys.argv[1:]:
    try:
        data.load_path(path, image_size={image_size})
        print(json.dumps(["loaded", ""]))
    except BaseException as e:
        print(json.dumps([type(e).__name__, str(e)]))
"""


def _load_limited(paths, image_size=None, limit=AS_LIMIT):
    """[(exception name, message)] of data.load_path on each path, in a process limited to `limit` bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _LIMITED.format(limit=limit, image_size=image_size),
                             *map(str, paths)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return [tuple(json.loads(line)) for line in result.stdout.splitlines()]


def _zeros_deflate(prefix, mib):
    """A raw deflate stream of `prefix` then `mib` MiB of zeros, about 1 KB per MiB: each fully flushed
    block of zeros is self-contained, so one is compressed and repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    piece = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return head + piece * mib + c.flush()


def _npy_header(shape, descr="|u1"):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _write_zip(path, members):
    """A zip archive of (name, raw deflate bytes or None, stored bytes, stated size[, CRC]) members; no zip64.

    The CRC defaults to 0: a bomb is refused before its end, where the CRC is checked."""
    out, central = bytearray(), bytearray()
    for name, deflated, stored, size, *crc in members:
        (body, method), size = (deflated, 8) if deflated is not None else (stored, 0), min(size, 2 ** 32 - 1)
        crc = crc[0] if crc else 0
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(body), size,
                               len(name), 0, 0, 0, 0, 0, len(out)) + name.encode()
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(body), size,
                           len(name), 0) + name.encode() + body
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def _gzip_of(raw_deflate):
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + raw_deflate + bytes(8)   # CRC and size 0: never reached


def test_zip_bomb_npz_members_are_refused_before_they_expand(tmp_path):
    header = _npy_header((2 << 30,))                      # 2 GiB of uint8 declared, 8 GiB as float32
    bomb = _write_zip(tmp_path / "bomb.npz", [("images.npy", _zeros_deflate(header, 2048), None,
                                               len(header) + (2 << 30))])
    assert bomb.stat().st_size < 3 << 20
    small = _npy_header((4, 4, 4))                         # declares 64 bytes, then 2 GiB more follow
    overflow = _write_zip(tmp_path / "overflow.npz", [("images.npy", _zeros_deflate(small + bytes(64), 2048), None,
                                                       len(small) + 64 + (2 << 30))])
    claim = _npy_header((28 << 30,))                       # 28 GiB declared in a 200-byte archive
    liar = _write_zip(tmp_path / "liar.npz", [("images.npy", _zeros_deflate(claim, 0), None, len(claim) + (28 << 30),
                                               zlib.crc32(claim))])
    results = _load_limited([bomb, overflow, liar])
    assert [r[0] for r in results] == ["DataError"] * 3, results
    assert "bomb.npz (array 'images'): its (2147483648,) uint8 array (as float32) would take 8.0 GiB in memory, " \
           "more than the" in results[0][1] and "address space left under ulimit -v" in results[0][1]
    assert "overflow.npz (array 'images'): the data goes on past the 64 bytes its header declares" in results[1][1]
    assert "liar.npz (array 'images'): its header declares a (30064771072,) uint8 array (28.0 GiB) but the " \
           "file holds at most" in results[2][1]


def test_huge_declared_npy_cifar_and_idx_fail_in_bounded_memory(tmp_path):
    (tmp_path / "huge.npy").write_bytes(_npy_header((10 ** 7, 32, 32, 3)) + bytes(100))
    R = np.ndarray.__reduce__(np.zeros(0))[0]

    class Direct:                                          # numpy.ndarray((10^7, 3072), uint8): 181 bytes
        def __reduce__(self):
            return np.ndarray, ((10 ** 7, 3072), np.dtype("u1"))

    class Reconstruct:                                     # _reconstruct(ndarray, (10^7, 3072), uint8)
        def __reduce__(self):
            return R, (np.ndarray, (10 ** 7, 3072), np.dtype("u1"))

    class State:                                           # an empty array whose state declares the shape
        def __init__(self, shape, dtype, raw):
            self.state = (1, shape, dtype, False, raw)

        def __reduce__(self):
            return R, (np.ndarray, (0,), b"b"), self.state

    pickles = {"data_batch_1": Direct(), "data_batch_2": Reconstruct(),
               "data_batch_3": State((10 ** 7, 3072), np.dtype("O"), [0]),
               "data_batch_4": State((2 ** 62, 2 ** 62), np.dtype("u1"), b"x")}
    for name, obj in pickles.items():
        (tmp_path / name).write_bytes(pickle.dumps({b"data": obj, b"labels": [0]}, protocol=2))
    assert (tmp_path / "data_batch_1").stat().st_size == 181
    (tmp_path / "test_batch").write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"abc")  # BINBYTES8 of 1 EiB
    idx = struct.pack(">BBBB3I", 0, 0, 8, 3, 16, 28, 28)   # declares 16 digits, then 2 GiB of zeros follow
    (tmp_path / "bomb-images-idx3-ubyte.gz").write_bytes(_gzip_of(_zeros_deflate(idx + bytes(16 * 784), 2048)))
    (tmp_path / "liar-images-idx3-ubyte.gz").write_bytes(gzip.compress(struct.pack(">BBBB3I", 0, 0, 8, 3, 10 ** 7, 28, 28)))
    names = ["huge.npy", *pickles, "test_batch", "bomb-images-idx3-ubyte.gz", "liar-images-idx3-ubyte.gz"]
    results = dict(zip(names, _load_limited([tmp_path / n for n in names])))
    assert {r[0] for r in results.values()} == {"DataError"}, results
    assert "huge.npy: its header declares a (10000000, 32, 32, 3) uint8 array (28.6 GiB) but the file holds at " \
           "most 100 bytes" in results["huge.npy"][1]
    assert "refusing to call numpy.ndarray" in results["data_batch_1"][1]
    assert "declares shape (10000000, 3072) (uint8, 28.6 GiB) but the whole pickle is" in results["data_batch_2"][1]
    assert "refusing a numpy object array" in results["data_batch_3"][1]
    assert "(4611686018427387904, 4611686018427387904) (uint8) but its data is 1 bytes" in results["data_batch_4"][1]
    assert "test_batch: not a CIFAR-10 python batch" in results["test_batch"][1]
    assert "the data goes on past the 12,544 bytes its header declares" in results["bomb-images-idx3-ubyte.gz"][1]
    assert "shape (10000000, 28, 28) (7.3 GiB) but a gzip file of" in results["liar-images-idx3-ubyte.gz"][1]


def test_idx_headers_that_overflow_or_have_too_many_dimensions(tmp_path):
    (tmp_path / "wide-idx3-ubyte").write_bytes(struct.pack(">BBBB3I", 0, 0, 8, 3, *[2 ** 32 - 1] * 3) + bytes(5))
    with pytest.raises(DataError, match=r"wide-idx3-ubyte: IDX header says shape \(4294967295, 4294967295, "
                                        r"4294967295\) \(79,228,162,458,924,105,385,300,197,375 bytes\) but the file holds 5;"):
        data.load_path(tmp_path / "wide-idx3-ubyte")
    (tmp_path / "deep-idx3-ubyte").write_bytes(struct.pack(">BBBB", 0, 0, 8, 255) + struct.pack(">255I", *[2] * 255))
    with pytest.raises(DataError, match="deep-idx3-ubyte: IDX header declares 255 dimensions"):
        data.load_path(tmp_path / "deep-idx3-ubyte")
    (tmp_path / "cut-idx3-ubyte").write_bytes(struct.pack(">BBBB", 0, 0, 8, 3) + b"\x00\x00")
    with pytest.raises(DataError, match="cut-idx3-ubyte: IDX header is truncated"):
        data.load_path(tmp_path / "cut-idx3-ubyte")
    (tmp_path / "bad-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((2, 4, 4), np.uint8)))[:-12])
    with pytest.raises(DataError, match="bad-idx3-ubyte.gz: .*(corrupt|truncated)"):
        data.load_path(tmp_path / "bad-idx3-ubyte.gz")


def test_idx_labels_must_be_one_integer_per_image(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((3, 4, 4), np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros((3, 2), np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: labels have shape \(3, 2\), not \(3,\)"):
        data.load_path(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: 5 labels for 3 images"):
        data.load_path(tmp_path / "train-images-idx3-ubyte")


@pytest.mark.parametrize("labels, message", [
    (np.array([0, -1, 2, 1]), "label -1 is negative"),
    (np.array([0.0, 1.0, 2.0, 1.0]), "labels have dtype float64, not integers"),
    (np.zeros((4, 2), np.int64), r"labels have shape \(4, 2\), not \(4,\)"),
    (np.arange(3), "3 labels for 4 images"),
    (np.array([0, 1, 10 ** 6, 2]), "label 1000000 would make 1,000,001 classes, more than minidiff's limit of 10,000"),
    (np.array([0, 1, 10 ** 9, 2]), "label 1000000000 would make 1,000,000,001 classes"),
    (np.array([{"a": 1}] * 4, dtype=object), r"cannot read it as a NumPy array \(it is an object array"),
])
def test_npz_labels_are_checked_not_dropped(tmp_path, labels, message):
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 5, 5), np.uint8), labels=labels)
    with pytest.raises(DataError, match=rf"a.npz \(array 'labels'\): {message}"):
        data.load_path(tmp_path / "a.npz")


def test_cifar_labels_are_checked(tmp_path):
    for labels, message in [([0, 1, 10 ** 6], "label 1000000 would make"), ([0, 1.5, 2], "labels hold a float"),
                            ([0, 1], "2 labels for 3 images"), ([[0], [1], [2]], "labels hold a list"),
                            (7, "labels are a int")]:
        with open(tmp_path / "data_batch_1", "wb") as f:
            pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": labels}, f, protocol=2)
        with pytest.raises(DataError, match=f"data_batch_1: {message}"):
            data.load_path(tmp_path / "data_batch_1")


def test_folder_class_count_is_bounded(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        _write_pngs(tmp_path / "pets" / name if (tmp_path / "pets").exists() else
                    (tmp_path / "pets").mkdir() or tmp_path / "pets" / name, [(4, 4)])
    monkeypatch.setattr(data, "MAX_CLASSES", 2)
    with pytest.raises(DataError, match="pets: 3 class subfolders, more than minidiff's limit of 2 classes"):
        data.load_path(tmp_path / "pets")


@pytest.mark.parametrize("member", ["object", "truncated", "cut"])
def test_bad_npz_members_are_one_data_error(tmp_path, member):
    path = tmp_path / "x.npz"
    if member == "object":
        np.savez(path, images=np.array([None, 1], dtype=object))
        message = r"x.npz \(array 'images'\): cannot read it as a NumPy array \(it is an object array"
    elif member == "truncated":                            # the archive is whole, its member's data is short
        header = _npy_header((100, 10, 10))
        _write_zip(path, [("images.npy", None, header + bytes(10), len(header) + 10, zlib.crc32(header + bytes(10)))])
        message = r"x.npz \(array 'images'\): its header declares a \(100, 10, 10\) uint8 array .* holds at most 10 bytes"
    else:                                                  # the archive itself is cut short
        np.savez(path, images=np.zeros((4, 5, 5), np.uint8))
        path.write_bytes(path.read_bytes()[:-30])
        message = "x.npz: cannot read it as a NumPy .npz archive"
    with pytest.raises(DataError, match=message):
        data.load_path(path)


def test_the_memory_limit_is_stated_and_checked_before_allocating(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.zeros((10, 8, 8), np.uint8))
    monkeypatch.setattr(data, "memory_limit", lambda: (1000, "a test's limit"))
    with pytest.raises(DataError, match=r"x.npy: its \(10, 8, 8\) uint8 array \(as float32\) would take 2,560 bytes "
                                        r"in memory, more than the 1,000 bytes minidiff allows for data \(a test's limit\)"):
        data.load_path(tmp_path / "x.npy")
    monkeypatch.undo()
    limit, why = data.memory_limit()
    assert 0 < limit and why.startswith("1/4 of the ")


def test_an_image_folder_is_checked_against_the_limit_before_decoding(tmp_path, monkeypatch):
    folder = _write_pngs(tmp_path / "photos", [(8, 8)])
    with pytest.raises(DataError, match=r"photos: 1 images of 3x1000000x1000000 as float32 would take"):
        data.load_path(folder, image_size=10 ** 6)
    monkeypatch.setattr(data, "_decode_image", None)      # nothing is decoded before the check
    with pytest.raises(DataError, match="would take"):
        data.load_path(folder, image_size=10 ** 6, channels=3)


def _png_declaring(width, height):
    """A PNG of a few bytes whose header declares width x height pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bombs_are_one_data_error(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(_png_declaring(100_000, 100_000))
    with pytest.raises(DataError, match=r"bomb.png: refusing to decode it: .*10000000000 pixels.*MAX_IMAGE_PIXELS"):
        data.load_path(tmp_path / "bomb.png")
    with pytest.raises(DataError, match="bomb.png: refusing to decode it"):
        data.load_image(tmp_path / "bomb.png")
    folder = _write_pngs(tmp_path / "photos", [(40, 40), (64, 64)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 40x40 warns (> 1000), 64x64 fails (> 2000)
    for name in ("im0.png", "im1.png"):
        with pytest.raises(DataError, match=f"{name}: refusing to decode it.*Pillow's limit is 1,000 pixels"):
            data.load_path(folder / name, image_size=8)
    with pytest.raises(DataError, match="im0.png: refusing to decode it"):
        data.load_path(folder, image_size=8, channels=3)  # also when the modes are not read first


def test_photos_are_resized_as_they_are_decoded(tmp_path):
    """12 photos of 1600x1200 are 69 MB decoded; loading them at 32x32 holds one at a time.

    PNGs: a JPEG is decoded at 1/8 scale for 32x32 (draft mode), which would hide the retention."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (1600, 1200), (200, 40, 90)).save(folder / "p00.png", compress_level=1)
    for i in range(1, 12):
        (folder / f"p{i:02}.png").write_bytes((folder / "p00.png").read_bytes())
    script = ("import resource, sys\nfrom minidiff import data\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "images, _ = data.load_path(sys.argv[1], image_size=32)\n"
              "print(images.shape, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=60)
    shape, grown_kib = result.stdout.rsplit(" ", 1)
    assert shape == "(12, 3, 32, 32)", result.stderr
    assert int(grown_kib) < 32 << 10          # one decoded photo (5.8 MB) and its copies, not all 12 (the
    # loader before this test kept every decode: 16 photos of 2000x1500 grew its peak by 211 MB)


def test_jpeg_photos_decode_at_reduced_scale(tmp_path, monkeypatch):
    Image.new("RGB", (2000, 1500), (200, 40, 90)).save(tmp_path / "photo.jpg", quality=90)
    decoded = []
    real = data._decode_image
    monkeypatch.setattr(data, "_decode_image", lambda f, size=None: decoded.append(real(f, size).size) or real(f, size))
    image = data.load_image(tmp_path / "photo.jpg", image_size=32)
    assert decoded == [(250, 188)]                  # 1/8 scale: still at least 32 on both sides
    np.testing.assert_allclose((image[:, 16, 16] + 1) * 127.5, [200, 40, 90], atol=3)


def test_very_elongated_images_are_resized_without_a_huge_intermediate(tmp_path):
    Image.new("L", (2, 20_000), 128).save(tmp_path / "strip.png")    # resize-then-crop would make 32 x 320,000
    image = data.load_image(tmp_path / "strip.png", image_size=32, channels=1)
    assert image.shape == (1, 32, 32)
    np.testing.assert_allclose(image, 128 / 127.5 - 1, atol=1e-6)


def test_resumed_stream_positions_are_reduced_not_replayed():
    x = np.arange(7, dtype=np.float32)[:, None]
    batches = data.Batches(x, 3, rng=0)
    state = {**batches.state_dict(), "position": 10 ** 9 * 7 + 5, "epoch": 2}
    batches.load_state_dict(state)                        # O(1): no loop over 10^9 epochs
    assert (batches.epoch, batches.position) == (2 + 10 ** 9, 5)
    same = data.Batches(x, 3, rng=0)
    same.load_state_dict({**state, "position": 5, "epoch": 2 + 10 ** 9})
    np.testing.assert_array_equal(next(batches), next(same))
    for key, value in [("position", -1), ("epoch", 2.5), ("count", "3"), ("seed", None), ("position", True)]:
        with pytest.raises(DataError, match=f"saved batch state has {key} = .*not a non-negative integer"):
            data.Batches(x, 3, rng=0).load_state_dict({**state, key: value})
    with pytest.raises(DataError, match="saved batch state must hold seed, epoch, position"):
        data.Batches(x, 3, rng=0).load_state_dict({"seed": 1})
    restored = data.Batches(x, 3, rng=0)
    restored.load_state_dict({k: np.int64(v) if k != "seed" else np.array(v) for k, v in batches.state_dict().items()})
    assert restored.state_dict() == batches.state_dict()


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("minidiff")
    return err[0]


def test_cli_reports_hostile_data_in_one_line(tmp_path, capsys):
    (tmp_path / "bomb.png").write_bytes(_png_declaring(100_000, 100_000))
    assert cli.main(["forward", str(tmp_path / "bomb.png"), "--out", str(tmp_path / "f.png")]) == 2
    assert "bomb.png: refusing to decode it" in _one_error_line(capsys)
    assert not (tmp_path / "f.png").exists()
    np.savez(tmp_path / "labels.npz", images=np.zeros((20, 8, 8), np.uint8), labels=np.full(20, 10 ** 9))
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "labels.npz"),
                     "--conditional", "--steps", "1", "--no-progress"]) == 2
    assert "labels.npz (array 'labels'): label 1000000000 would make 1,000,000,001 classes" in _one_error_line(capsys)
    header = _npy_header((28 << 30,))
    _write_zip(tmp_path / "bomb.npz", [("images.npy", _zeros_deflate(header, 0), None, len(header) + (28 << 30),
                                         zlib.crc32(header))])
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "bomb.npz"),
                     "--steps", "1", "--no-progress"]) == 2
    assert "bomb.npz (array 'images'): its header declares" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()
