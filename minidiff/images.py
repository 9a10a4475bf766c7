"""Pictures with pillow only: sample grids, filmstrips, GIFs, loss curves and 2-D scatter plots.

Inputs are images in [-1, 1] as NCHW (or one CHW image) on either backend, or a
Tensor; everything is converted to uint8 on the host first (`to_uint8`). Plots are
drawn at twice their size and shrunk, a cheap way to antialias PIL's lines.
"""
import math

from PIL import Image, ImageDraw, ImageFont

from . import backend

host = backend.host
SUPERSAMPLE = 2
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _as_host(x):
    """A host numpy array from a numpy/cupy array, a Tensor (duck-typed by .data) or a list."""
    if not backend.is_array(x) and backend.is_array(getattr(x, "data", None)):
        x = x.data                     # a minidiff Tensor; images.py may not import tensor.py
    return backend.to_numpy(x)        # on cupy: a device-to-host copy, which waits for the GPU


def to_uint8(x):
    """[-1, 1] floats NCHW -> uint8 NHWC (CHW -> HWC), rounding as the DDPM code does."""
    x = _as_host(x)
    if x.dtype == host.uint8:
        return x
    x = ((x.astype(host.float32) + 1) * 127.5).round().clip(0, 255).astype(host.uint8)
    if x.ndim == 4:
        return x.transpose(0, 2, 3, 1)
    if x.ndim == 3:
        return x.transpose(1, 2, 0)
    return x


def _batch_uint8(images):
    """Images as uint8 NHWC: float input is NCHW (or CHW) in [-1, 1], uint8 input NHWC (or HWC)."""
    x = _as_host(images)
    if x.ndim == 3:
        x = x[None]                    # a single image
    if x.dtype != host.uint8:
        x = to_uint8(x)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected NCHW images with 1 or 3 channels, got shape {_as_host(images).shape}")
    return x


def auto_scale(size):
    """Default nearest-neighbour upscale: cells of about 64 px (8x for 8x8 digits, 2x for 32x32)."""
    return max(1, 64 // size)


def make_grid(images, nrow=None, scale=None, padding=2, pad_value=255):
    """Tile N images into one uint8 (H, W, C) array, `nrow` images per row, `padding` px between and around.

    Size: rows * (h * scale + padding) + padding by cols * (w * scale + padding) + padding,
    with cols = nrow (default ceil(sqrt(N))) and rows = ceil(N / cols).
    """
    x = _batch_uint8(images)
    n, h, w, c = x.shape
    scale = auto_scale(max(h, w)) if scale is None else int(scale)
    cols = min(n, nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)       # nearest neighbour keeps pixels crisp
    ch, cw = h * scale + padding, w * scale + padding
    grid = host.full((rows * ch + padding, cols * cw + padding, c), pad_value, dtype=host.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[padding + r * ch: (r + 1) * ch, padding + k * cw: (k + 1) * cw] = x[i]
    return grid


def _pil(array):
    """uint8 (H, W, 1 or 3) -> PIL image."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_grid(images, path, nrow=None, scale=None, padding=2, pad_value=255):
    """Write a PNG grid of images (see make_grid) and return the PIL image."""
    image = _pil(make_grid(images, nrow, scale, padding, pad_value))
    image.save(path)
    return image


def _font(size):
    try:
        return ImageFont.load_default(size=size)       # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()                # the small bitmap font


def _text_width(font, text):
    left, _, right, _ = font.getbbox(str(text))
    return right - left


def _label_font(cell, texts=(), fit=None):
    """The labels' font: about cell/5 px (10 to 16), shrunk (down to 8) until the widest of `texts` fits `fit` px."""
    size = max(10, min(16, int(cell / 5)))
    font = _font(size)
    while fit is not None and size > 8 and max((_text_width(font, t) for t in texts), default=0) > fit:
        size -= 1
        font = _font(size)
    return font


def filmstrip(frames, path=None, labels=None, scale=None, padding=2, pad_value=255, row_labels=None):
    """Frames side by side: each frame is a column, each image of a batch a row (Fig. 6 layout).

    `frames` is a list of CHW images or NCHW batches (all the same shape); `labels`
    (e.g. "t=1000") are written under the columns, `row_labels` (one per image of a
    batch, e.g. "beta x 2") left of the rows, in a margin as wide as the longest.
    Returns the PIL image, saved if `path`.
    """
    columns = [_batch_uint8(f) for f in frames]
    n = columns[0].shape[0]
    if any(col.shape != columns[0].shape for col in columns):
        raise ValueError("filmstrip frames must all have the same shape")
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"filmstrip has {n} rows but {len(row_labels)} row labels")
    # Interleave so that make_grid's row-major order puts frame k in column k.
    stacked = host.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])
    grid = make_grid(stacked, nrow=len(columns), scale=scale, padding=padding, pad_value=pad_value)
    image = _pil(grid).convert("RGB")
    cell_w = (grid.shape[1] - padding) / len(columns)
    cell_h = (grid.shape[0] - padding) / n
    left = 0
    if row_labels:
        row_font = _label_font(cell_h)
        left = max(_text_width(row_font, t) for t in row_labels) + 8
    bottom = 0
    if labels:
        font = _label_font(cell_w, labels, fit=cell_w - 2)
        bottom = getattr(font, "size", 11) + 8
    if left or bottom:
        full = Image.new("RGB", (left + image.width, image.height + bottom), "white")
        full.paste(image, (left, 0))
        draw = ImageDraw.Draw(full)
        for r, label in enumerate(row_labels or ()):
            draw.text((left - 4, padding + (r + 0.5) * cell_h - padding / 2), str(label), fill="black",
                      font=row_font, anchor="rm")
        for k, label in enumerate(labels or ()):
            draw.text((left + padding + (k + 0.5) * cell_w - padding / 2, image.height + 3), str(label),
                      fill="black", font=font, anchor="mt")
        image = full
    if path is not None:
        image.save(path)
    return image


def side_by_side(batches, path=None, titles=None, nrow=None, scale=None, padding=2, gap=24):
    """Grids (see make_grid) of several batches left to right, each under its title, e.g. samples beside data.

    Returns the PIL image, saved if `path`.
    """
    grids = [_pil(make_grid(b, nrow=nrow, scale=scale, padding=padding)).convert("RGB") for b in batches]
    titles = [str(t) for t in titles] if titles is not None else [""] * len(grids)
    font = _font(16)
    top = getattr(font, "size", 11) + 12 if any(titles) else 0
    widths = [max(g.width, _text_width(font, t) + 8) for g, t in zip(grids, titles)]
    image = Image.new("RGB", (sum(widths) + gap * (len(grids) - 1), top + max(g.height for g in grids)), "white")
    draw = ImageDraw.Draw(image)
    x = 0
    for grid, title, width in zip(grids, titles, widths):
        image.paste(grid, (x + (width - grid.width) // 2, top))
        draw.text((x + width / 2, 4), title, fill="black", font=font, anchor="mt")
        x += width + gap
    if path is not None:
        image.save(path)
    return image


def save_gif(frames, path, duration_ms=100, loop=0, hold_last_ms=None, **grid_kwargs):
    """An animated GIF: each frame a CHW image, an NCHW batch (drawn as a grid) or a PIL image.

    `hold_last_ms` keeps the final frame up longer. Pillow merges consecutive
    identical frames, so a GIF can hold fewer frames than were passed.
    """
    pictures = [f if isinstance(f, Image.Image) else _pil(make_grid(f, **grid_kwargs)) for f in frames]
    if not pictures:
        raise ValueError("save_gif needs at least one frame")
    durations = [int(duration_ms)] * len(pictures)
    if hold_last_ms is not None:
        durations[-1] = int(hold_last_ms)
    pictures = [p.convert("RGB") for p in pictures]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations,
                     loop=loop, optimize=False)
    return pictures


# ---------------------------------------------------------------- plots

def nice_ticks(lo, hi, target=5):
    """About `target` round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v):
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}"
    return f"{v:g}"


class _Axes:
    """A plotting box on a supersampled canvas: maps data to pixels and draws frame, ticks and labels."""

    def __init__(self, draw, box, xlim, ylim, log_y=False, font=None):
        self.draw, self.box, self.log_y, self.font = draw, box, log_y, font
        self.xlim, self.ylim = xlim, ylim

    def px(self, x, y):
        (x0, y0, x1, y1), (a, b), (c, d) = self.box, self.xlim, self.ylim
        if self.log_y:
            y, c, d = math.log10(y), math.log10(c), math.log10(d)
        return x0 + (x - a) / (b - a) * (x1 - x0), y1 - (y - c) / (d - c) * (y1 - y0)

    def frame(self, xticks, yticks, grid=True):
        s = SUPERSAMPLE
        x0, y0, x1, y1 = self.box
        for t in xticks:
            x, _ = self.px(t, self.ylim[0] if not self.log_y else self.ylim[0])
            if grid:
                self.draw.line([(x, y0), (x, y1)], fill="#e6e6e6", width=s)
            self.draw.line([(x, y1), (x, y1 + 5 * s)], fill="black", width=s)
            self.draw.text((x, y1 + 7 * s), _fmt(t), fill="black", font=self.font, anchor="mt")
        for t in yticks:
            _, y = self.px(self.xlim[0], t)
            if grid:
                self.draw.line([(x0, y), (x1, y)], fill="#e6e6e6", width=s)
            self.draw.line([(x0 - 5 * s, y), (x0, y)], fill="black", width=s)
            self.draw.text((x0 - 7 * s, y), _fmt(t), fill="black", font=self.font, anchor="rm")
        self.draw.rectangle(self.box, outline="black", width=s)


def _log_ticks(lo, hi):
    """Powers of ten in [lo, hi]; with less than two decades also 2x and 5x."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1,) if b - a > 2 else (1, 2, 5)
    return [m * 10.0 ** e for e in range(a, b + 1) for m in mults if lo <= m * 10.0 ** e <= hi]


def smoothing_window(smooth, n):
    """plot_curve's moving-average window for `n` points: 1 (no smoothing) unless asked.

    smooth None, False or 0: 1; True: n // 50 (curves of 100+ points get a window of 2+); an int k: k.
    """
    if smooth is None or smooth is False:
        return 1
    if smooth is True:
        return max(1, n // 50)
    if int(smooth) < 0:
        raise ValueError(f"smooth must be None, True or a window of 0 or more points, got {smooth!r}")
    return max(1, int(smooth))


def _moving_average(ys, window):
    kernel = host.ones(window) / window
    padded = host.concatenate([host.full(window - 1, ys[0]), ys])   # causal, same length
    return host.convolve(padded, kernel, mode="valid")


def plot_curve(xs, ys, path, title="", xlabel="step", ylabel="loss", log_y=False, smooth=None,
               size=(640, 400)):
    """A line plot drawn with PIL (axes, ticks, labels), e.g. the training loss.

    Non-finite points (and non-positive ones on a log axis) are skipped. The line is the
    data itself unless `smooth` asks for a (causal) moving average, for noisy curves such
    as a loss: then the raw line is drawn faint and the average bold on top. `smooth` is
    None (default: no smoothing), True (len/50 points, so curves of 100+ points) or a
    window of k points (see smoothing_window). Returns the PIL image.
    """
    xs, ys = host.asarray(_as_host(xs), dtype=float), host.asarray(_as_host(ys), dtype=float)
    keep = host.isfinite(xs) & host.isfinite(ys) & ((ys > 0) if log_y else True)
    xs, ys = xs[keep], ys[keep]
    s = SUPERSAMPLE
    width, height = size[0] * s, size[1] * s
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, title_font = _font(11 * s), _font(14 * s)
    box = (70 * s, 36 * s, width - 20 * s, height - 50 * s)
    if len(xs) == 0:
        draw.text((width / 2, height / 2), "no finite data to plot", fill="black", font=title_font, anchor="mm")
    else:
        xlo, xhi = float(xs.min()), float(xs.max())
        xhi = xhi if xhi > xlo else xlo + 1
        ylo, yhi = float(ys.min()), float(ys.max())
        if log_y:
            ylo, yhi = ylo / 1.1, max(yhi * 1.1, ylo * 2)
            yticks = _log_ticks(ylo, yhi)
        else:
            margin = 0.05 * (yhi - ylo) or 0.5 * (abs(ylo) or 1)
            ylo, yhi = ylo - margin, yhi + margin
            yticks = [t for t in nice_ticks(ylo, yhi) if ylo <= t <= yhi]
        axes = _Axes(draw, box, (xlo, xhi), (ylo, yhi), log_y, font)
        axes.frame([t for t in nice_ticks(xlo, xhi) if xlo <= t <= xhi], yticks)
        window = smoothing_window(smooth, len(ys))
        points = [axes.px(x, y) for x, y in zip(xs, ys)]
        if window > 1:
            draw.line(points, fill="#a6c8e6", width=s)
            avg = _moving_average(ys, window)
            draw.line([axes.px(x, y) for x, y in zip(xs, avg)], fill=PALETTE[0], width=2 * s, joint="curve")
        elif len(points) > 1:
            draw.line(points, fill=PALETTE[0], width=2 * s, joint="curve")
        else:
            (x, y), r = points[0], 3 * s
            draw.ellipse((x - r, y - r, x + r, y + r), fill=PALETTE[0])
    draw.text((width / 2, 10 * s), title, fill="black", font=title_font, anchor="mt")
    draw.text(((box[0] + box[2]) / 2, height - 8 * s), xlabel, fill="black", font=font, anchor="md")
    label = Image.new("RGB", (box[3] - box[1], 16 * s), "white")        # y label, rotated
    ImageDraw.Draw(label).text((label.width / 2, 0), ylabel + (" (log)" if log_y else ""),
                               fill="black", font=font, anchor="mt")
    image.paste(label.rotate(90, expand=True), (4 * s, box[1]))
    image = image.resize(size, Image.LANCZOS)
    image.save(path)
    return image


def scatter_2d(points_list, path, colors=None, titles=None, lim=None, paths=None, panel=300, point_size=1.5):
    """Side-by-side scatter panels of (n, 2) point sets on shared axes (2-D toy data, samples).

    `paths` optionally gives, per panel, None or an array (steps, m, 2) of m
    trajectories drawn as lines (e.g. the reverse process x_T -> x_0); `lim` is the
    half-width of the square view (default: from the data). Returns the PIL image.
    """
    sets = [host.asarray(_as_host(p), dtype=float).reshape(-1, 2) for p in points_list]
    k = len(sets)
    colors = list(colors) if colors is not None else [PALETTE[i % len(PALETTE)] for i in range(k)]
    titles = list(titles) if titles is not None else [""] * k
    paths = list(paths) if paths is not None else [None] * k
    if lim is None:
        finite = host.concatenate([p[host.isfinite(p).all(axis=1)] for p in sets] or [host.zeros((0, 2))])
        lim = float(host.percentile(host.abs(finite), 99.5)) * 1.1 if len(finite) else 1.0
        lim = lim or 1.0
    s = SUPERSAMPLE
    margin_left, margin_top, margin_bottom, gap = 44 * s, 28 * s, 30 * s, 16 * s
    side = panel * s
    width = margin_left + k * side + (k - 1) * gap + 12 * s
    image = Image.new("RGB", (width, margin_top + side + margin_bottom), "white")
    draw = ImageDraw.Draw(image)
    font, title_font = _font(10 * s), _font(13 * s)
    ticks = [t for t in nice_ticks(-lim, lim, target=4) if -lim <= t <= lim]
    for i, (pts, colour, title, trajectories) in enumerate(zip(sets, colors, titles, paths)):
        x0 = margin_left + i * (side + gap)
        box = (x0, margin_top, x0 + side, margin_top + side)
        axes = _Axes(draw, box, (-lim, lim), (-lim, lim), font=font)
        axes.frame(ticks, ticks if i == 0 else [])
        if trajectories is not None:
            trajectories = host.asarray(_as_host(trajectories), dtype=float)
            for j in range(trajectories.shape[1]):
                line = [axes.px(*p) for p in host.clip(trajectories[:, j], -lim, lim)]
                draw.line(line, fill="#9a9a9a", width=s)
        r = point_size * s
        for x, y in pts:
            if abs(x) < lim and abs(y) < lim:            # drop (rather than pile on the frame) points outside
                cx, cy = axes.px(x, y)
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        draw.text(((box[0] + box[2]) / 2, 8 * s), title, fill="black", font=title_font, anchor="mt")
    image = image.resize((width // s, image.height // s), Image.LANCZOS)
    image.save(path)
    return image
