"""Sample-quality metrics, each reported beside the floor a perfect model reaches.

"The loss goes down" says little about samples. These numbers compare generated
samples with real data the model never saw (the held-out split), and every one
comes with the same number for *real* data at the same sample size (the floor):

2-D data (toy distributions)
- energy distance (Szekely & Rizzo 2013): 2E|X-Y| - E|X-X'| - E|Y-Y'|, which is
  the MMD with the distance-induced kernel (Sejdinovic et al. 2013); 0 iff X ~ Y;
- sliced Wasserstein-1 (Bonneel et al. 2015): the mean exact 1-D W1 over
  `num_projections` random directions drawn from a fixed seed.

Digit images (8x8 digits, 32x32 MNIST), through minidiff's own classifier
- Frechet distance in its feature space (Heusel et al. 2017, the FID recipe);
- class coverage: histogram of predicted classes, its entropy, max |p_k - 1/K|;
- mean confidence and the fraction of samples with confidence >= 0.9;
- precision / recall (Kynkaenniemi et al. 2019), k = 3 nearest-neighbour balls;
- memorisation: the share of samples that are near-copies of a training image
  (the ratio test of Yoon et al. 2023, see `memorization`);
- for samples drawn for requested labels (a class-conditional model), how often the
  classifier agrees with the label, per class (`label_agreement`).

The model's likelihood: bits/dim of the variational bound on held-out images (Ho et al.
2020, Table 2), `eval_likelihood`, summed over batches of diffusion.calc_bpd_loop.

All arithmetic is float64 on the host (`backend.host`): these are small matrices
and exactness matters more than speed.
May import: backend, data, images, classifier.
"""
import contextlib
import math
import os
import tempfile

from . import backend, data, images
from . import classifier as classifier_module  # `classifier` is evaluate_samples' argument

host = backend.host

POINT_DATASETS = data.TOY_DATASETS
IMAGE_DATASETS = ("digits", "mnist")
CONFIDENT = 0.9  # "confidently classified" threshold


# ---------------------------------------------------------------- distances

def pairwise_distances(a, b, chunk=2048):
    """Euclidean distances between the rows of a (n, d) and b (m, d): (n, m) float64.

    |a|^2 + |b|^2 - 2 a.b is one GEMM; clipped at 0 since rounding can go slightly negative.
    """
    a = host.asarray(a, dtype=host.float64).reshape(len(a), -1)
    b = host.asarray(b, dtype=host.float64).reshape(len(b), -1)
    bb = (b * b).sum(1)
    out = host.empty((len(a), len(b)))
    for i in range(0, len(a), chunk):  # chunks bound memory for big sets
        ai = a[i:i + chunk]
        d2 = (ai * ai).sum(1)[:, None] + bb[None, :] - 2.0 * ai @ b.T
        out[i:i + chunk] = host.sqrt(host.maximum(d2, 0.0))
    return out


def _kth_nn_distance(x, k):
    """Distance from each row of x to its k-th nearest *other* row (k >= 1): (n,)."""
    d = pairwise_distances(x, x)
    host.fill_diagonal(d, host.inf)  # exclude the point itself
    return host.partition(d, k - 1, axis=1)[:, k - 1]


# ---------------------------------------------------------------- 2-D metrics

def energy_distance(x, y):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo 2013).

    The V-statistic (all pairs, self-pairs included): exactly 0 for identical
    sets, >= 0 always, and slightly positive for two independent draws of the
    same distribution; that is the floor `evaluate_points` reports beside it.
    """
    return float(2.0 * pairwise_distances(x, y).mean()
                 - pairwise_distances(x, x).mean() - pairwise_distances(y, y).mean())


def _wasserstein_1d(u, v):
    """Exact W1 between 1-D empirical distributions, column by column: integral of |F_u - F_v| dx.

    u (n, P) and v (m, P) hold P independent 1-D samples (1-D inputs are one column).
    Sorting the pooled values with weights +1/n (from u) and -1/m (from v), the running
    sum of weights is F_u - F_v on each gap between consecutive values.
    """
    u, v = host.asarray(u, dtype=host.float64), host.asarray(v, dtype=host.float64)
    squeeze = u.ndim == 1
    u, v = u.reshape(len(u), -1), v.reshape(len(v), -1)
    values = host.concatenate([u, v])  # (n + m, P)
    weights = host.concatenate([host.full(len(u), 1.0 / len(u)), host.full(len(v), -1.0 / len(v))])
    order = host.argsort(values, axis=0)
    gaps = host.diff(host.take_along_axis(values, order, axis=0), axis=0)  # (n + m - 1, P)
    cdf_diff = host.cumsum(weights[order], axis=0)[:-1]
    w1 = (host.abs(cdf_diff) * gaps).sum(0)
    return float(w1[0]) if squeeze else w1


def sliced_wasserstein(x, y, num_projections=256, seed=0):
    """Sliced Wasserstein-1 (Bonneel et al. 2015): mean 1-D W1 over random unit directions.

    The directions come from `seed`, so two calls project the same way and values compare.
    """
    x = host.asarray(x, dtype=host.float64).reshape(len(x), -1)
    y = host.asarray(y, dtype=host.float64).reshape(len(y), -1)
    theta = host.random.default_rng(seed).standard_normal((num_projections, x.shape[1]))
    theta /= host.linalg.norm(theta, axis=1, keepdims=True)  # uniform on the sphere
    return float(_wasserstein_1d(x @ theta.T, y @ theta.T).mean())  # (n, P), (m, P) projections


def _mean_std(values):
    """Mean and sample standard deviation (0 for a single value) of a list of floats."""
    values = host.asarray(values, dtype=host.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def evaluate_points(samples, reference, floor_draws, num_projections=256, seed=0):
    """2-D metrics of `samples` against `reference`, and the floor.

    `floor_draws` are independent draws of real data, each the size of `samples`:
    their distance to `reference` is what a perfect model scores; the floor is its
    mean over the draws, `floor_std` its spread (a single value fluctuates a lot).
    """
    report = {"kind": "points", "num_samples": len(samples), "num_reference": len(reference),
              "floor_repeats": len(floor_draws), "metrics": {}}
    for name, fn in [("energy_distance", energy_distance),
                     ("sliced_wasserstein", lambda a, b: sliced_wasserstein(a, b, num_projections, seed))]:
        floor, floor_std = _mean_std([fn(f, reference) for f in floor_draws])
        report["metrics"][name] = {"samples": fn(samples, reference), "floor": floor, "floor_std": floor_std,
                                   "better": "lower"}
    return report


# ---------------------------------------------------------------- feature-space metrics

def feature_statistics(features):
    """Mean (d,) and covariance (d, d) of (n, d) features, float64 (unbiased, as in FID)."""
    f = host.asarray(features, dtype=host.float64)
    return f.mean(0), host.cov(f, rowvar=False)


def _sqrt_psd(s):
    """Symmetric square root of a PSD matrix by eigen-decomposition (eigenvalues clipped at 0)."""
    w, v = host.linalg.eigh((s + s.T) / 2)
    return (v * host.sqrt(host.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2).

    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2 (Dowson & Landau 1982;
    Heusel et al. 2017). The last term equals tr sqrt(S1 S2), but S1^1/2 S2 S1^1/2 is
    symmetric PSD, so its eigenvalues come from eigvalsh, real and stable (no scipy.sqrtm).

    Against pytorch-fid 0.3.0's calculate_frechet_distance (the reference FID code):
    it takes scipy.linalg.sqrtm of the non-symmetric product S1 S2, which is similar to
    S1^1/2 S2 S1^1/2 (S1 S2 = S1^1/2 (S1^1/2 S2 S1^1/2) S1^-1/2 on the range of S1), so
    both have the same non-negative eigenvalues and tr sqrt is the same number. sqrtm's
    Schur route leaves rounding as a small imaginary part, which pytorch-fid drops
    (refusing if the diagonal's exceeds 1e-3), and when sqrtm returns non-finite values
    it retries with eps = 1e-6 added to both diagonals, a bias of order eps * d.
    Here the eigenvalues are real by construction and clipped at 0, so neither
    fix-up is needed: values agree with pytorch-fid to ~1e-8 relative, also for
    rank-deficient covariances (50 samples in 64 dims), where sqrtm's error on the
    zero eigenvalues lets pytorch-fid return about -1e-5 for identical inputs; this
    returns 0 (the result is clipped at 0). Shapes must agree: mu1, mu2 (d,) and
    sigma1, sigma2 (d, d) (scalars count as d = 1), else ValueError.
    """
    mu1, mu2 = host.atleast_1d(mu1).astype(host.float64), host.atleast_1d(mu2).astype(host.float64)
    s1, s2 = host.atleast_2d(sigma1).astype(host.float64), host.atleast_2d(sigma2).astype(host.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"Frechet distance: the means must be vectors of the same length, got shapes "
                         f"{mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"Frechet distance: the covariances must be ({d}, {d}) like the means (d = {d}), "
                         f"got shapes {s1.shape} and {s2.shape}")
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    eig = host.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = host.sqrt(host.clip(eig, 0.0, None)).sum()
    value = ((mu1 - mu2) ** 2).sum() + host.trace(s1) + host.trace(s2) - 2.0 * tr_covmean
    return float(max(value, 0.0))  # rounding can leave -1e-12 for identical inputs


def frechet_distance_features(f1, f2):
    """Frechet distance between Gaussians fitted to two (n, d) feature sets."""
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def _polynomial_kernel(x, y):
    """Cubic polynomial kernel (x.y / d + 1)^3 between the rows of x and y (KID's kernel)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(k_xx, k_xy, k_yy):
    """Unbiased MMD^2 of m samples each: off-diagonal means of K_XX, K_YY minus twice the mean of K_XY.

    As torch-fidelity's mmd2(mmd_est="unbiased") (after Binkowski's MMD-GAN code): the K_XY
    term keeps its diagonal (its mean over all m^2 pairs).
    """
    m = k_xx.shape[0]
    kt_xx_sum = (k_xx.sum(axis=1) - host.diagonal(k_xx)).sum()
    kt_yy_sum = (k_yy.sum(axis=1) - host.diagonal(k_yy)).sum()
    k_xy_sum = k_xy.sum(axis=0).sum()
    return (kt_xx_sum + kt_yy_sum) / (m * (m - 1)) - 2 * k_xy_sum / (m * m)


def kernel_inception_distance(f1, f2, num_subsets=100, subset_size=1000, seed=2020):
    """Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs").

    The unbiased estimate of MMD^2 between two (n, d) feature sets with the cubic
    polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over `num_subsets` random
    subsets of `subset_size` rows drawn without replacement from each set. Computed as
    torch-fidelity 0.4.0's kid_features_to_metric: one RandomState(seed) draws, per
    subset, first the rows of f1 then those of f2 (RandomState.choice, replace=False);
    kid_std is the population standard deviation (ddof = 0) over the subsets, as there.
    One difference: when either set has fewer than `subset_size` rows, the subset size
    shrinks to min(len(f1), len(f2)) (torch-fidelity refuses); the size used is
    returned. Unbiased, so it can be slightly negative for close distributions; a set
    against itself scores slightly below 0 (K_XY keeps its diagonal in this estimator).
    Returns {"kid_mean", "kid_std", "subset_size"}.
    """
    f1 = host.asarray(f1, dtype=host.float64)
    f2 = host.asarray(f2, dtype=host.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID needs two (n, d) feature sets of the same width, got shapes {f1.shape} and {f2.shape}")
    n1, n2 = len(f1), len(f2)
    size = min(int(subset_size), n1, n2)
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature rows in each set (and subset_size >= 2), "
                         f"got {n1} and {n2} rows, subset_size {subset_size}")
    if num_subsets < 1:
        raise ValueError(f"KID needs num_subsets >= 1, got {num_subsets}")
    rng = host.random.RandomState(seed)
    mmds = host.zeros(int(num_subsets))
    for i in range(int(num_subsets)):
        x = f1[rng.choice(n1, size, replace=False)]
        y = f2[rng.choice(n2, size, replace=False)]
        mmds[i] = _mmd2_unbiased(_polynomial_kernel(x, x), _polynomial_kernel(x, y), _polynomial_kernel(y, y))
    return {"kid_mean": float(host.mean(mmds)), "kid_std": float(host.std(mmds)), "subset_size": size}


def _log_softmax(logits):
    """log softmax over the last axis, float64, max-shifted for stability."""
    z = logits - logits.max(axis=1, keepdims=True)
    return z - host.log(host.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits, splits=10, seed=2020):
    """Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), mean and std over splits.

    `logits` (N, K) are the classifier's pre-softmax outputs. For the standard IS these are
    Inception's logits WITHOUT the fc layer's bias: the original TensorFlow code read the
    logits from a graph whose final layer had no bias, and torch-fidelity reproduces that
    with its "logits_unbiased" feature (pool3 @ fc.weight^T); the biased logits give a
    different number. Computed as torch-fidelity 0.4.0's isc_features_to_metric: rows
    shuffled by RandomState(seed).permutation(N), softmax in float64, split i the rows
    i*N//splits to (i+1)*N//splits, p(y) the split's mean, the score exp of the mean KL;
    is_std is the population standard deviation (ddof = 0) over splits, as there.
    Returns {"is_mean", "is_std"}.
    """
    logits = host.asarray(logits, dtype=host.float64)
    if logits.ndim != 2:
        raise ValueError(f"Inception Score needs (N, K) logits, got shape {logits.shape}")
    n = len(logits)
    if not 1 <= int(splits) <= n:
        raise ValueError(f"Inception Score: splits must be between 1 and the number of samples ({n}), got {splits}")
    splits = int(splits)
    logits = logits[host.random.RandomState(seed).permutation(n), :]
    log_p = _log_softmax(logits)
    p = host.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        q = p_chunk.mean(axis=0, keepdims=True)
        kl = (p_chunk * (log_p_chunk - host.log(q))).sum(axis=1).mean()
        scores.append(math.exp(float(kl)))
    return {"is_mean": float(host.mean(scores)), "is_std": float(host.std(scores))}


def save_statistics(path, mu, sigma):
    """Write Gaussian feature statistics in pytorch-fid's .npz format (keys "mu" (d,), "sigma" (d, d)).

    Atomic: written to a temporary file in the same folder, then moved over `path` with
    os.replace, so a reader never sees half a file. `path` is used as given (np.savez
    would append ".npz" to a name without it; this does not).
    """
    mu = host.asarray(mu, dtype=host.float64)
    sigma = host.asarray(sigma, dtype=host.float64)
    _check_statistics(path, mu, sigma)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".stats-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            host.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _check_statistics(path, mu, sigma):
    if mu.ndim != 1:
        raise ValueError(f"{path}: mu must be a vector (d,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"{path}: sigma must be ({d}, {d}) to match mu of length {d}, got shape {sigma.shape}")
    if not (host.isfinite(mu).all() and host.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu and sigma must be finite (found NaN or inf)")


def load_statistics(path):
    """Read (mu, sigma) float64 from a pytorch-fid style .npz (keys "mu" and "sigma").

    Every problem is one ValueError naming the file: missing, not a readable .npz, a key
    missing, mu not (d,), sigma not (d, d), or non-finite values.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such statistics file")
    try:
        with host.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if missing:
                raise ValueError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)} "
                                 f"(a statistics file holds 'mu' and 'sigma'; found {sorted(keys)})")
            mu, sigma = f["mu"], f["sigma"]
    except ValueError as err:
        if str(err).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: not a readable .npz statistics file ({err})") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz statistics file ({err})") from None
    if not (host.issubdtype(mu.dtype, host.number) and host.issubdtype(sigma.dtype, host.number)):
        raise ValueError(f"{path}: mu and sigma must be numeric, got {mu.dtype} and {sigma.dtype}")
    mu, sigma = mu.astype(host.float64), sigma.astype(host.float64)
    _check_statistics(path, mu, sigma)
    return mu, sigma


def class_coverage(probs, num_classes=None):
    """Predicted-class histogram (fractions), its entropy (bits) and max |p_k - 1/K|.

    A model that collapses onto few classes shows low entropy (log2 K for uniform)
    and a large deviation; a good digits model keeps every class within 5-15% for K = 10.
    """
    probs = host.asarray(probs, dtype=host.float64)
    k = num_classes or probs.shape[1]
    hist = host.bincount(probs.argmax(1), minlength=k) / len(probs)
    nonzero = hist[hist > 0]
    return {"histogram": hist.tolist(),
            "entropy_bits": max(0.0, float(-(nonzero * host.log2(nonzero)).sum())),  # no -0.0
            "max_entropy_bits": math.log2(k),
            "max_deviation": float(host.abs(hist - 1.0 / k).max()),
            "min_fraction": float(hist.min()), "max_fraction": float(hist.max())}


def confidence(probs, threshold=CONFIDENT):
    """Mean top-class probability, and the fraction of samples with top probability >= threshold.

    An Inception-Score-like sharpness measure: blurry or ambiguous samples get low values.
    """
    top = host.asarray(probs, dtype=host.float64).max(1)
    return {"mean_confidence": float(top.mean()), "fraction_confident": float((top >= threshold).mean())}


def label_agreement(probs, labels, num_classes=None):
    """How often the classifier's prediction equals the requested label, per requested class.

    probs (N, K) and labels (N,) int. Returns {"per_class": {c: {"num", "agreement", "confident"}},
    "mean": mean over the requested classes, "min": the worst class, "overall": over all samples}.
    "confident" is the share predicted as c with confidence >= CONFIDENT.
    """
    probs, labels = host.asarray(probs, dtype=host.float64), host.asarray(labels).astype(host.int64)
    if labels.shape != (len(probs),):
        raise ValueError(f"{len(labels)} labels for {len(probs)} samples")
    predicted, conf = probs.argmax(1), probs.max(1)
    per_class = {}
    for c in range(num_classes or probs.shape[1]):
        mask = labels == c
        if mask.any():
            per_class[c] = {"num": int(mask.sum()), "agreement": float((predicted[mask] == c).mean()),
                            "confident": float(((predicted[mask] == c) & (conf[mask] >= CONFIDENT)).mean())}
    agreements = [v["agreement"] for v in per_class.values()]
    return {"per_class": per_class, "mean": float(host.mean(agreements)), "min": float(min(agreements)),
            "overall": float((predicted == labels).mean())}


def precision_recall(real_features, fake_features, k=3):
    """Improved precision and recall (Kynkaenniemi et al. 2019, Eq. 1-2).

    Each set's manifold is the union of balls around its points, each ball reaching
    the point's k-th nearest neighbour in the same set. Precision: share of fake
    points inside the real manifold (are samples realistic?). Recall: share of real
    points inside the fake manifold (is the data's variety covered?).
    """
    real = host.asarray(real_features, dtype=host.float64)
    fake = host.asarray(fake_features, dtype=host.float64)
    r_real, r_fake = _kth_nn_distance(real, k), _kth_nn_distance(fake, k)
    d = pairwise_distances(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None, :]).any(1).mean()
    recall = (d <= r_fake[:, None]).any(0).mean()
    return {"precision": float(precision), "recall": float(recall)}


# ---------------------------------------------------------------- memorisation

MEMO_RATIO = 1.0 / 3.0


def memorization(samples, train, ratio=MEMO_RATIO):
    """Share of samples that are near-copies of a training image, by the ratio test.

    A sample x counts as memorised when d(x, NN1) < ratio * d(x, NN2), with NN1, NN2
    its two nearest training images in pixel space (L2) and ratio = 1/3: the
    criterion of Yoon et al. 2023 ("Diffusion probabilistic models generalize when
    they fail to memorize") and Gu et al. 2023 ("On memorization in diffusion
    models"), after Carlini et al. 2023's idea of measuring closeness relative to
    the local density of the training set. Why this test: a fixed threshold on
    d(x, NN1) depends on the data set's scale and on where in image space x lies
    (a "1" has much closer neighbours than an "8"); the ratio is scale-free and
    flags a sample only when one training image is far closer than all others,
    which is what copying looks like. Training images are de-duplicated first so a
    duplicated image is not its own second neighbour. Real held-out digits score
    0% on the bundled data (see docs/METRICS.md); exact copies score 100%.
    Returns the fraction and, per sample, d(NN1)/d(NN2).
    """
    x = host.asarray(samples, dtype=host.float64).reshape(len(samples), -1)
    t = host.unique(host.asarray(train, dtype=host.float64).reshape(len(train), -1), axis=0)
    d = pairwise_distances(x, t)
    nn = host.partition(d, 1, axis=1)[:, :2]  # the two smallest per row, in order
    ratios = nn[:, 0] / host.maximum(nn[:, 1], 1e-12)
    return {"fraction_memorized": float((ratios < ratio).mean()), "ratios": ratios,
            "median_nn_distance": float(host.median(nn[:, 0]))}


# ---------------------------------------------------------------- top level

def _as_grey_uint8(x, image_size):
    """Samples as grey uint8 (N, S, S, 1), the layout memorisation compares in pixel space.

    Accepts uint8 NHWC/NHW (as `minidiff sample --out x.npz` writes) or float NCHW in [-1, 1];
    RGB is averaged to grey, and raw 28x28 MNIST is padded with background to 32x32.
    """
    x = backend.to_numpy(x)
    if x.dtype != host.uint8:
        if x.ndim != 4 or x.dtype.kind != "f":
            raise ValueError(f"expected uint8 images (N, H, W, C) or floats (N, C, H, W) in [-1, 1]; "
                             f"got {x.dtype} of shape {x.shape}")
        x = images.to_uint8(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, H, W, C) with C = 1 or 3, got {x.shape}")
    if x.shape[-1] == 3:
        x = host.round(x.mean(-1, keepdims=True)).astype(host.uint8)
    if x.shape[1:3] == (28, 28) and image_size == 32:
        x = host.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    if x.shape[1:3] != (image_size, image_size):
        raise ValueError(f"images are {x.shape[1]}x{x.shape[2]}, but this data set's are {image_size}x{image_size}")
    return x


def _load_split(dataset, split):
    """(images uint8 NHWC, labels) of a bundled data set's split, rounded as samples are saved."""
    x, labels = data.load_dataset(dataset, split)
    return images.to_uint8(x), labels


def _image_report(samples_u8, dataset, clf, train_u8, heldout_u8, seed, k, floor_repeats, labels=None):
    """Every image metric for the samples, and the same metric for real data (the floor)."""
    n = len(samples_u8)
    rng = host.random.default_rng(seed)
    n_floor = min(n, len(train_u8))

    def run(x):
        probs, feats = clf.predict_proba_and_features(x)  # uint8 NHWC in
        return backend.to_numpy(probs).astype(host.float64), backend.to_numpy(feats).astype(host.float64)

    p_s, f_s = run(samples_u8)
    p_h, f_h = run(heldout_u8)
    _, f_train = run(train_u8)
    # The floor's stand-in for a perfect model: n real training images, drawn afresh
    # `floor_repeats` times (mean and spread reported), compared with held-out the same way.
    floor = {"frechet_distance": [], "precision": [], "recall": []}
    for _ in range(floor_repeats):
        f_f = f_train[rng.choice(len(train_u8), n_floor, replace=False)]
        floor["frechet_distance"].append(frechet_distance_features(f_f, f_h))
        for key, value in precision_recall(f_h, f_f, k).items():
            floor[key].append(value)
    pr_s = precision_recall(f_h, f_s, k)
    samples = {"frechet_distance": frechet_distance_features(f_s, f_h), **pr_s}
    m = {}
    for key in ("frechet_distance", "precision", "recall"):
        mean, std = _mean_std(floor[key])
        m[key] = {"samples": samples[key], "floor": mean, "floor_std": std,
                  "better": "lower" if key == "frechet_distance" else "higher"}
    # Per-image classifier statistics: the floor is the held-out split (the classifier
    # saw the training images, so it would be over-confident on them).
    c_s, c_h = confidence(p_s), confidence(p_h)
    for key in ("mean_confidence", "fraction_confident"):
        m[key] = {"samples": c_s[key], "floor": c_h[key], "better": "higher"}
    cov_s, cov_h = class_coverage(p_s, 10), class_coverage(p_h, 10)
    m["class_entropy_bits"] = {"samples": cov_s["entropy_bits"], "floor": cov_h["entropy_bits"],
                               "better": "higher"}
    m["class_max_deviation"] = {"samples": cov_s["max_deviation"], "floor": cov_h["max_deviation"],
                                "better": "lower"}
    m["class_min_fraction"] = {"samples": cov_s["min_fraction"], "floor": cov_h["min_fraction"],
                               "better": "higher"}
    m["class_max_fraction"] = {"samples": cov_s["max_fraction"], "floor": cov_h["max_fraction"],
                               "better": "lower"}
    mem_s, mem_h = memorization(samples_u8, train_u8), memorization(heldout_u8, train_u8)
    m["memorized"] = {"samples": mem_s["fraction_memorized"], "floor": mem_h["fraction_memorized"],
                      "better": "lower"}
    report = {"kind": "images", "dataset": dataset, "num_samples": n, "num_heldout": len(heldout_u8),
              "num_floor": n_floor, "floor_repeats": floor_repeats, "num_train": len(train_u8),
              "seed": seed, "pr_k": k,
              "classifier_heldout_accuracy": getattr(clf, "heldout_accuracy", None),
              "class_histogram": {"samples": cov_s["histogram"], "floor": cov_h["histogram"]},
              "metrics": m}
    if labels is not None:
        report["label_agreement"] = label_agreement(p_s, labels, p_s.shape[1])
    return report


def evaluate_samples(images_uint8_nhwc, dataset="digits", classifier=None, seed=0, k=3,
                     num_projections=256, floor_repeats=5, labels=None):
    """Every applicable metric for samples of a bundled data set, with its real-data floor.

    Images (dataset "digits" or "mnist"): uint8 (N, H, W, C) as `minidiff sample --out x.npz`
    writes them (float NCHW in [-1, 1] also accepted); compared with the held-out split
    through minidiff's classifier, the floor being N real training images compared the
    same way (`floor_repeats` random draws, mean and sd). 2-D data sets: float (N, 2)
    points, compared with a fresh draw, the floor being further independent draws of N points.
    `labels` (N,), the classes the samples were drawn for, add "label_agreement" (images only).
    Returns a JSON-able dict; `format_report` prints it as a table.
    """
    if dataset in POINT_DATASETS:
        if labels is not None:
            raise ValueError("label agreement needs images and minidiff's classifier; these are 2-D points")
        pts = host.asarray(backend.to_numpy(images_uint8_nhwc), dtype=host.float64)
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"{dataset} samples must be (N, 2) points, got shape {pts.shape}")
        n = len(pts)
        ref = data.sample_toy(dataset, n, rng=seed + 1)  # held-out stand-in: a fresh draw
        floors = [data.sample_toy(dataset, n, rng=seed + 2 + i) for i in range(floor_repeats)]
        report = evaluate_points(pts, ref, floors, num_projections, seed)
        report["dataset"] = dataset
        return report
    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"no quality metrics for data set {dataset!r}: use one of "
                         f"{', '.join(IMAGE_DATASETS + POINT_DATASETS)}")
    clf = classifier or classifier_module.load_classifier(dataset)
    train_u8, _ = _load_split(dataset, "train")
    heldout_u8, _ = _load_split(dataset, "heldout")
    samples = _as_grey_uint8(images_uint8_nhwc, train_u8.shape[1])
    if len(samples) < k + 1:
        raise ValueError(f"need at least {k + 1} samples for k-NN precision/recall (k={k}); got {len(samples)}")
    if labels is not None:
        labels = host.asarray(labels)
        if labels.shape != (len(samples),) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be {len(samples)} integers, one per sample; got {labels.dtype} of shape "
                             f"{labels.shape}")
    return _image_report(samples, dataset, clf, train_u8, heldout_u8, seed, k, floor_repeats, labels)


_DESCRIPTIONS = {
    "energy_distance": "energy distance (Szekely & Rizzo 2013)",
    "sliced_wasserstein": "sliced Wasserstein-1 (Bonneel et al. 2015)",
    "frechet_distance": "Frechet distance, classifier features",
    "precision": "precision, k-NN (Kynkaanniemi et al. 2019)",
    "recall": "recall, k-NN (Kynkaanniemi et al. 2019)",
    "mean_confidence": "mean classifier confidence",
    "fraction_confident": "fraction with confidence >= 0.9",
    "class_entropy_bits": "predicted-class entropy (bits, max 3.32)",
    "class_max_deviation": "max |class share - 0.1|",
    "class_min_fraction": "smallest class share",
    "class_max_fraction": "largest class share",
    "memorized": "memorised (NN ratio test < 1/3)",
}


def format_report(report):
    """The report of `evaluate_samples` as a Markdown table: metric | samples | real floor."""
    lines = []
    if report["kind"] == "images":
        lines.append(f"{report['dataset']}: {report['num_samples']} samples vs {report['num_heldout']} "
                     f"held-out images; floor = {report['num_floor']} real training images "
                     f"(mean ± sd of {report['floor_repeats']} draws; per-image rows: the held-out images) "
                     f"(classifier held-out accuracy {report['classifier_heldout_accuracy'] or float('nan'):.3f})")
    else:
        lines.append(f"{report.get('dataset', 'points')}: {report['num_samples']} samples vs "
                     f"{report['num_reference']} reference points; floor = a further real draw of as many "
                     f"points (mean ± sd of {report['floor_repeats']} draws)")
    lines += ["", "| metric | samples | real (floor) | better |", "|---|---:|---:|---|"]
    for name, v in report["metrics"].items():
        floor = f"{v['floor']:.4f}" + (f" ± {v['floor_std']:.4f}" if v.get("floor_std") else "")
        lines.append(f"| {_DESCRIPTIONS.get(name, name)} | {v['samples']:.4f} | {floor} | {v['better']} |")
    if "class_histogram" in report:
        hist = " ".join(f"{h:.2f}" for h in report["class_histogram"]["samples"])
        lines += ["", f"class histogram (0-9): {hist}"]
    if "label_agreement" in report:
        agree = report["label_agreement"]
        lines += ["", f"classifier agrees with the requested label: {agree['mean']:.3f} on average over classes, "
                      f"worst class {agree['min']:.3f}", "", "| label | samples | agreement | agreed, confidence >= 0.9 |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {c} | {v['num']} | {v['agreement']:.3f} | {v['confident']:.3f} |"
                  for c, v in agree["per_class"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- likelihood (Table 2)


def eval_likelihood(model, diffusion, images_, batch_size, seed, progress=False):
    """Bits/dim of the variational bound (Eq. 5, Table 2) over `images_`, with its standard error.

    `diffusion.num_bins` must be the data's own grey levels: the decoder L_0 (Eq. 13) discretises
    into them. Batch i draws the bound's Monte Carlo terms from the stream [seed, i]. The report
    splits out the prior term L_T and the decoder term L_0 (the rest is the sum of L_{t-1}).
    """
    totals, priors, decoders = [], [], []
    for i, start in enumerate(range(0, len(images_), batch_size)):
        x = backend.to_active(images_[start:start + batch_size])
        out = diffusion.calc_bpd_loop(model, x, seed=[seed, i], progress=progress)
        totals.append(backend.to_numpy(out["total_bpd"]))
        priors.append(backend.to_numpy(out["prior_bpd"]))
        decoders.append(backend.to_numpy(out["vb"][:, 0]))
    total, prior, decoder = host.concatenate(totals), host.concatenate(priors), host.concatenate(decoders)
    return {"bits_per_dim": float(total.mean()), "bits_per_dim_stderr": float(total.std() / math.sqrt(len(total))),
            "prior_bpd": float(prior.mean()), "decoder_bpd": float(decoder.mean()),
            "num_images": int(len(total)), "grey_levels": diffusion.num_bins}
