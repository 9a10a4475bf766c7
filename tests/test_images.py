"""minidiff.images: uint8 conversion, grid arithmetic, files that pillow reads back."""
import numpy as np
import pytest
from PIL import Image

from minidiff import images


def test_to_uint8_maps_the_data_range_and_layout():
    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0], dtype=np.float32).reshape(1, 1, 1, 7)
    out = images.to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 1)
    assert out.ravel().tolist() == [0, 64, 128, 191, 255, 255, 0]
    assert images.to_uint8(np.zeros((3, 4, 5))).shape == (4, 5, 3)    # one CHW image -> HWC


def test_digits_levels_survive_the_round_trip():
    levels = np.arange(17) / 16 * 2 - 1
    back = images.to_uint8(levels.reshape(1, 1, 1, 17)).ravel() / 127.5 - 1
    assert np.abs(back - levels).max() <= 1 / 255


@pytest.mark.parametrize("n, nrow, scale, padding", [(10, None, 1, 2), (7, 3, 4, 1), (1, None, 2, 0), (5, 8, 1, 3)])
def test_grid_size_arithmetic(n, nrow, scale, padding):
    h, w = 6, 5
    grid = images.make_grid(np.zeros((n, 3, h, w)), nrow=nrow, scale=scale, padding=padding)
    cols = min(n, nrow or int(np.ceil(np.sqrt(n))))
    rows = -(-n // cols)
    assert grid.shape == (rows * (h * scale + padding) + padding, cols * (w * scale + padding) + padding, 3)


def test_grid_places_images_row_major_and_upscales_small_ones():
    x = np.stack([np.full((1, 8, 8), v) for v in (-1.0, 0.0, 1.0)])
    grid = images.make_grid(x, nrow=2, padding=1, pad_value=7)       # 8x8 -> 8x upscale by default
    assert images.auto_scale(8) == 8 and grid.shape == (2 * 65 + 1, 2 * 65 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 66, 0] == 128 and grid[66, 1, 0] == 255
    assert grid[0, 0, 0] == 7 and grid[66, 66, 0] == 7                 # padding and the empty cell


def test_save_grid_writes_a_png_pillow_reads(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)
    images.save_grid(x, tmp_path / "g.png", scale=2, padding=2)
    with Image.open(tmp_path / "g.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (2 * 18 + 2, 2 * 18 + 2)
    images.save_grid(x[:, :1], tmp_path / "grey.png")
    with Image.open(tmp_path / "grey.png") as im:
        assert im.mode == "L"


def test_gif_has_one_frame_per_distinct_input(tmp_path):
    frames = [np.full((1, 4, 4), v) for v in np.linspace(-1, 1, 6)]
    images.save_gif(frames, tmp_path / "a.gif", duration_ms=50, hold_last_ms=500)
    with Image.open(tmp_path / "a.gif") as im:
        assert im.format == "GIF" and im.n_frames == 6 and im.size == (4 * 16 + 4, 4 * 16 + 4)
        assert im.info["duration"] == 50


def test_filmstrip_puts_frames_in_columns_with_labels(tmp_path):
    frames = [np.full((2, 3, 4, 4), v) for v in (-1.0, 1.0, 0.0)]
    strip = images.filmstrip(frames, tmp_path / "f.png", scale=1, padding=1)
    assert strip.size == (3 * 5 + 1, 2 * 5 + 1)
    pixels = np.asarray(strip)
    assert pixels[1, 1, 0] == 0 and pixels[1, 6, 0] == 255 and pixels[6, 11, 0] == 128
    labelled = images.filmstrip(frames, None, labels=["t=0", "t=500", "t=1000"], scale=1, padding=1)
    assert labelled.width == strip.width and labelled.height > strip.height


def test_plot_curve_writes_a_picture_and_survives_bad_values(tmp_path):
    xs = np.arange(200)
    ys = np.exp(-xs / 50) + 0.01
    ys[10] = np.nan
    out = images.plot_curve(xs, ys, tmp_path / "loss.png", title="loss", log_y=True, size=(320, 200))
    assert out.size == (320, 200)
    with Image.open(tmp_path / "loss.png") as im:
        arr = np.asarray(im.convert("RGB"))
    assert (arr < 100).any() and (arr == 255).any()                     # something drawn on white
    images.plot_curve([], [], tmp_path / "empty.png")
    images.plot_curve([0], [1.0], tmp_path / "one.png")


def test_nice_ticks_are_round_and_cover_the_range():
    assert images.nice_ticks(0, 1000) == [0, 200, 400, 600, 800, 1000]
    assert images.nice_ticks(0.013, 0.047) == [0.02, 0.03, 0.04]


def test_scatter_2d_draws_one_panel_per_set(tmp_path):
    rng = np.random.default_rng(0)
    pts = [rng.standard_normal((100, 2)), rng.standard_normal((50, 2))]
    paths = [None, rng.standard_normal((10, 5, 2))]
    out = images.scatter_2d(pts, tmp_path / "s.png", titles=["data", "samples"], paths=paths, panel=100)
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == out.size and im.width > 2 * 100


def _curve_pixels(tmp_path, ys, **kwargs):
    image = images.plot_curve(np.arange(1, len(ys) + 1), ys, tmp_path / "c.png", size=(320, 200), **kwargs)
    return np.asarray(image.convert("RGB")).astype(int)


def test_plot_curve_smooths_only_when_asked(tmp_path):
    assert images.smoothing_window(None, 1000) == images.smoothing_window(False, 1000) == 1
    assert images.smoothing_window(0, 1000) == 1 and images.smoothing_window(7, 1000) == 7
    assert images.smoothing_window(True, 1000) == 20 and images.smoothing_window(True, 60) == 1
    # A smooth curve of 1000 points (alpha_bar-like): drawn as it is, not as a lagged moving average.
    ys = np.cos(np.linspace(0, np.pi / 2, 1000)) ** 2
    plain = _curve_pixels(tmp_path, ys)
    assert np.array_equal(plain, _curve_pixels(tmp_path, ys, smooth=None))
    assert np.array_equal(plain, _curve_pixels(tmp_path, ys, smooth=False))
    assert not np.array_equal(plain, _curve_pixels(tmp_path, ys, smooth=100))
    assert not np.array_equal(plain, _curve_pixels(tmp_path, ys, smooth=True))
    # A step from 1 to 0 halfway: unsmoothed, the bold line falls at the step; with a causal moving
    # average of 200 points it reaches the bottom only 200 points later. Where the line is at
    # 3/4 of the way (750 of 1000 points), the plain curve is at the bottom and the average too;
    # at 55% the plain one is at the bottom and the average is still half way up.
    step = np.where(np.arange(1000) < 500, 1.0, 0.0)
    blue = np.array([0x1f, 0x77, 0xb4])

    def bold_rows(pixels, frac):
        # plot box: x from 70 to 300 px of 320 (see plot_curve's margins, at size 320 x 200)
        column = pixels[:, int(70 + frac * (300 - 70))]
        return np.flatnonzero(np.abs(column - blue).sum(axis=1) < 60)

    plain, smoothed = _curve_pixels(tmp_path, step), _curve_pixels(tmp_path, step, smooth=200)
    low = bold_rows(plain, 0.75).mean()
    assert abs(bold_rows(plain, 0.55).mean() - low) < 3                    # already at the bottom
    assert bold_rows(smoothed, 0.55).mean() < low - 20                     # the average lags behind
    assert abs(bold_rows(smoothed, 0.75).mean() - low) < 3


def test_filmstrip_draws_row_labels_in_a_left_margin():
    frames = [np.full((3, 1, 8, 8), v) for v in (-1.0, 1.0)]
    plain = images.filmstrip(frames, None, labels=["a", "b"])
    labelled = images.filmstrip(frames, None, labels=["a", "b"], row_labels=["beta x 0.5", "beta x 1", "beta x 2"])
    margin = labelled.width - plain.width
    assert margin > 20 and labelled.height == plain.height
    assert np.array_equal(np.asarray(labelled)[:, margin:], np.asarray(plain))     # the strip itself, moved right
    left = np.asarray(labelled.convert("L"))[:, :margin]
    for r in range(3):                         # dark text beside every row (rows of 8 x 8 px + 2 px padding)
        assert (left[2 + r * 66: (r + 1) * 66] < 100).any(), r
    with pytest.raises(ValueError, match="row labels"):
        images.filmstrip(frames, None, row_labels=["only one"])


def test_filmstrip_column_labels_fit_their_columns():
    frames = [np.zeros((1, 1, 8, 8))] * 3
    strip = images.filmstrip(frames, None, labels=["DDPM 1000", "DPM++ 20", "Heun 19"])
    grey = np.asarray(strip.convert("L"))
    text = grey[66 + 2:]                                                            # the label strip
    ink = np.flatnonzero((text < 128).any(axis=0))
    assert ink.min() > 0 and ink.max() < strip.width - 1                            # nothing cut at the edges
    for k in (1, 2):                                                                # a gap between labels
        assert not (text[:, k * 66 + 1] < 128).any(), k


def test_side_by_side_puts_titled_grids_next_to_each_other(tmp_path):
    a, b = np.full((16, 1, 8, 8), -1.0), np.full((16, 1, 8, 8), 1.0)
    image = images.side_by_side([a, b], tmp_path / "s.png", titles=["samples", "held-out digits"], gap=20)
    grid = 4 * 66 + 2
    assert image.size[0] == 2 * grid + 20 and grid < image.size[1] < grid + 40
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == image.size
    pixels = np.asarray(image.convert("L"))
    assert pixels[-10, 10] == 0 and pixels[-10, grid + 20 + 10] == 255            # a's grid left, b's right
    assert (pixels[: image.size[1] - grid, :grid] < 100).any()                      # a title above
