"""Sample-quality metrics: closed forms, constructed cases, and good-vs-bad separation.

Every metric must score real data near its floor and score noise, a single repeated
image and one-class samples badly. The digit cases use the shipped classifier.
"""
import json

import numpy as np
import pytest

from minidiff import data, images, metrics


# ---------------------------------------------------------------- 2-D metrics

def test_energy_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    x = np.random.default_rng(0).standard_normal((300, 2))
    assert metrics.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    d = [metrics.energy_distance(x, x + [s, 0]) for s in (0.1, 0.5, 2.0)]
    assert 0 < d[0] < d[1] < d[2]


def test_energy_distance_of_a_point_mass_pair_is_twice_their_distance():
    # X = a, Y = b surely: 2|a - b| - 0 - 0.
    assert metrics.energy_distance([[0.0, 0.0]], [[3.0, 4.0]]) == pytest.approx(10.0)


def test_wasserstein_1d_exact_values_and_unequal_sizes():
    assert metrics._wasserstein_1d(np.array([0.0, 1.0]), np.array([0.5])) == pytest.approx(0.5)
    u = np.random.default_rng(1).standard_normal(50)
    assert metrics._wasserstein_1d(u, np.concatenate([u, u])) == pytest.approx(0.0, abs=1e-12)
    assert metrics._wasserstein_1d(u, u + 0.7) == pytest.approx(0.7)


def test_sliced_wasserstein_of_a_translation_is_the_mean_projected_shift():
    # Translating by c moves every 1-D projection by <theta, c>: SW1 = mean |<theta, c>|,
    # which tends to 2|c|/pi for directions uniform on the circle.
    x = np.random.default_rng(2).standard_normal((200, 2))
    c = np.array([0.6, -0.8])
    sw = metrics.sliced_wasserstein(x, x + c, num_projections=2000, seed=0)
    assert sw == pytest.approx(2 / np.pi, rel=0.03)
    assert metrics.sliced_wasserstein(x, x, seed=3) == pytest.approx(0.0, abs=1e-12)
    assert metrics.sliced_wasserstein(x, x + c, seed=5) == metrics.sliced_wasserstein(x, x + c, seed=5)


@pytest.mark.parametrize("name", ["swissroll", "8gaussians"])
def test_point_metrics_separate_real_draws_from_a_wrong_distribution(name):
    good = metrics.evaluate_samples(data.sample_toy(name, 400, rng=123), name, floor_repeats=4)
    bad = metrics.evaluate_samples(np.random.default_rng(0).standard_normal((400, 2)), name, floor_repeats=4)
    for key in ("energy_distance", "sliced_wasserstein"):
        g, b = good["metrics"][key], bad["metrics"][key]
        assert g["samples"] < g["floor"] + 4 * g["floor_std"]
        assert b["samples"] > 3 * b["floor"]
    json.dumps(good)  # the CLI writes the report as JSON
    assert "energy distance" in metrics.format_report(good)


# ---------------------------------------------------------------- Frechet distance

def test_frechet_distance_scalar_closed_form():
    # 1-D Gaussians: W2^2 = (m1 - m2)^2 + (s1 - s2)^2.
    assert metrics.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9.0 + 1.0)
    assert metrics.frechet_distance(0.5, 2.0, 0.5, 2.0) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_diagonal_and_rotated_closed_form():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    # Rotating both Gaussians together leaves W2 unchanged; now the matrices are full.
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_singular_covariances_stays_finite_and_non_negative():
    f = np.random.default_rng(5).standard_normal((10, 30))  # 10 samples in 30-D: rank 9
    assert metrics.frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(metrics.frechet_distance_features(f, f[::-1] + 1.0))


# ---------------------------------------------------------------- precision / recall, coverage

def test_precision_recall_on_constructed_point_sets():
    rng = np.random.default_rng(6)
    a = rng.uniform(0, 1, (100, 2))                # cluster A
    b = rng.uniform(0, 1, (100, 2)) + [10.0, 0.0]  # cluster B, far away
    real = np.concatenate([a, b])
    assert metrics.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    # Samples covering only cluster A: all realistic (precision 1), half the data missed.
    only_a = metrics.precision_recall(real, rng.uniform(0, 1, (200, 2)))
    assert only_a["precision"] > 0.95 and 0.4 < only_a["recall"] < 0.6
    far = metrics.precision_recall(real, rng.uniform(0, 1, (200, 2)) + [0.0, 50.0])
    assert far == {"precision": 0.0, "recall": 0.0}


def test_class_coverage_and_confidence():
    uniform = np.eye(10)[np.arange(200) % 10]
    cov = metrics.class_coverage(uniform)
    assert cov["entropy_bits"] == pytest.approx(np.log2(10)) and cov["max_deviation"] == pytest.approx(0.0)
    collapsed = metrics.class_coverage(np.eye(10)[np.full(50, 7)])
    assert collapsed["entropy_bits"] == pytest.approx(0.0) and collapsed["max_deviation"] == pytest.approx(0.9)
    probs = np.array([[0.95, 0.05], [0.6, 0.4]])
    assert metrics.confidence(probs) == {"mean_confidence": pytest.approx(0.775), "fraction_confident": 0.5}


def test_memorization_flags_copies_and_near_copies_only():
    rng = np.random.default_rng(7)
    train = rng.uniform(0, 255, (300, 64))
    assert metrics.memorization(train[:50], train)["fraction_memorized"] == 1.0
    near = train[:50] + rng.normal(0, 1.0, (50, 64))  # NN distances here are ~ 500
    assert metrics.memorization(near, train)["fraction_memorized"] == 1.0
    fresh = rng.uniform(0, 255, (50, 64))
    assert metrics.memorization(fresh, train)["fraction_memorized"] == 0.0
    # A duplicated training image must still count as copied (de-duplication).
    assert metrics.memorization(train[:1], np.concatenate([train, train[:1]]))["fraction_memorized"] == 1.0


# ---------------------------------------------------------------- digit images, end to end

@pytest.fixture(scope="module")
def digits():
    train, y_train = data.load_dataset("digits", "train")
    heldout, _ = data.load_dataset("digits", "heldout")
    rng = np.random.default_rng(0)
    real = images.to_uint8(train[rng.choice(len(train), 400, replace=False)])
    return {"real": real, "heldout": images.to_uint8(heldout),
            "noise": rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8),
            "single": np.repeat(images.to_uint8(heldout[:1]), 400, axis=0),
            "one_class": images.to_uint8(train[y_train == 3])}


@pytest.fixture(scope="module")
def reports(digits):
    return {name: metrics.evaluate_samples(x, "digits", floor_repeats=2) for name, x in digits.items()}


def test_real_images_score_near_the_floor(reports):
    m = reports["real"]["metrics"]  # training images: perfect except that they are copies
    assert m["frechet_distance"]["samples"] < 2 * m["frechet_distance"]["floor"]
    assert m["precision"]["samples"] > m["precision"]["floor"] - 0.1
    assert m["recall"]["samples"] > m["recall"]["floor"] - 0.1
    assert m["fraction_confident"]["samples"] > 0.9 and m["fraction_confident"]["floor"] > 0.9
    assert m["class_max_deviation"]["samples"] < 0.06
    assert m["memorized"]["samples"] == 1.0  # they ARE training images
    held = reports["heldout"]["metrics"]
    assert held["memorized"]["samples"] == 0.0 and held["memorized"]["floor"] == 0.0


def test_noise_scores_badly(reports):
    m = reports["noise"]["metrics"]
    assert m["frechet_distance"]["samples"] > 10 * m["frechet_distance"]["floor"]
    assert m["precision"]["samples"] < 0.2 and m["recall"]["samples"] < 0.2
    assert m["fraction_confident"]["samples"] < 0.5 and m["mean_confidence"]["samples"] < 0.85


def test_a_single_repeated_image_scores_badly(reports):
    m = reports["single"]["metrics"]
    assert m["frechet_distance"]["samples"] > 10 * m["frechet_distance"]["floor"]
    assert m["recall"]["samples"] < 0.05
    assert m["class_entropy_bits"]["samples"] == pytest.approx(0.0, abs=1e-9)
    assert m["class_max_deviation"]["samples"] == pytest.approx(0.9)


def test_one_class_samples_score_badly(reports):
    m = reports["one_class"]["metrics"]
    assert m["frechet_distance"]["samples"] > 10 * m["frechet_distance"]["floor"]
    assert m["recall"]["samples"] < 0.3
    assert m["class_max_fraction"]["samples"] == 1.0 and m["class_min_fraction"]["samples"] == 0.0


def test_report_is_json_and_formats_as_a_table(reports):
    r = reports["real"]
    assert json.loads(json.dumps(r))["num_samples"] == 400
    table = metrics.format_report(r)
    for key in r["metrics"]:
        assert metrics._DESCRIPTIONS[key] in table
    assert "| metric | samples | real (floor) | better |" in table


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="8x8"):
        metrics.evaluate_samples(np.zeros((5, 16, 16, 1), np.uint8), "digits")
    with pytest.raises(ValueError, match="no quality metrics"):
        metrics.evaluate_samples(np.zeros((5, 8, 8, 1), np.uint8), "cifar")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        metrics.evaluate_samples(np.zeros((5, 3)), "swissroll")


def test_float_nchw_samples_score_like_their_uint8_form(digits):
    u8 = digits["real"][:60]
    as_float = u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    a = metrics.evaluate_samples(u8, "digits", floor_repeats=1)["metrics"]
    b = metrics.evaluate_samples(as_float, "digits", floor_repeats=1)["metrics"]
    assert {k: v["samples"] for k, v in a.items()} == pytest.approx({k: v["samples"] for k, v in b.items()})


def test_mnist_accepts_raw_28x28_samples():
    heldout, _ = data.load_dataset("mnist", "heldout")
    raw = images.to_uint8(heldout[:40])[:, 2:30, 2:30]  # crop the padding off: 28x28 as MNIST files hold
    r = metrics.evaluate_samples(raw, "mnist", floor_repeats=1)
    assert r["metrics"]["memorized"]["samples"] == 0.0
    assert r["metrics"]["fraction_confident"]["samples"] > 0.9


def test_label_agreement_per_class():
    from minidiff.metrics import label_agreement
    probs = np.array([[0.95, 0.05, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.0, 0.1, 0.9], [0.5, 0.0, 0.5]])
    labels = np.array([0, 0, 0, 2, 2])
    out = label_agreement(probs, labels, 3)
    assert out["per_class"][0] == {"num": 3, "agreement": pytest.approx(2 / 3), "confident": pytest.approx(1 / 3)}
    assert out["per_class"][2]["agreement"] == 0.5 and 1 not in out["per_class"]   # argmax ties go to class 0
    assert out["mean"] == pytest.approx((2 / 3 + 0.5) / 2) and out["min"] == 0.5 and out["overall"] == 0.6
    with pytest.raises(ValueError, match="labels"):
        label_agreement(probs, labels[:2])


def test_bits_per_dim_sums_the_bound_over_batches_and_splits_out_its_terms():
    """Eq. 5 in bits/dim: every term is a KL or a negative log-likelihood (>= 0), so the total is at least
    the prior and decoder terms; batch k draws its Monte Carlo x_t from the stream [seed, k]."""
    from minidiff import backend
    from minidiff.diffusion import GaussianDiffusion
    from minidiff.schedule import get_named_beta_schedule
    d = GaussianDiffusion(get_named_beta_schedule("linear", 8), num_bins=17)
    x = np.random.default_rng(0).integers(0, 17, (5, 1, 4, 4)).astype(np.float32) / 8 - 1   # 17 grey levels
    model = lambda x_t, t: x_t * 0.0  # noqa: E731   (eps_theta = 0)
    report = metrics.eval_likelihood(model, d, x, batch_size=2, seed=3)
    assert report["num_images"] == 5 and report["grey_levels"] == 17
    assert report["bits_per_dim"] >= report["prior_bpd"] + report["decoder_bpd"] - 1e-9 > 0
    assert 0 < report["bits_per_dim_stderr"] < report["bits_per_dim"]
    per_image = np.concatenate([backend.to_numpy(d.calc_bpd_loop(model, x[i:i + 2], seed=[3, k])["total_bpd"])
                                for k, i in enumerate(range(0, 5, 2))])
    assert report["bits_per_dim"] == pytest.approx(per_image.mean(), rel=1e-12)



# ---------------------------------------------------------------- FID / KID / IS against the reference stack

import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import fid_reference_stack  # noqa: E402  (tests/ is on sys.path)


def _random_stats(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.5 + shift
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.fixture(scope="module")
def reference_cases(tmp_path_factory):
    """Inputs and pytorch-fid 0.3.0 / torch-fidelity 0.4.0 outputs, from one run of tests/fid_reference.py."""
    script = fid_reference_stack()   # skips with COMPAT_REASON, so CI fails rather than skips
    rng = np.random.default_rng(23)
    inputs = {}
    m1, s1 = _random_stats(rng, 400, 16)
    m2, s2 = _random_stats(rng, 400, 16, 0.3)
    inputs.update({"well/mu1": m1, "well/sigma1": s1, "well/mu2": m2, "well/sigma2": s2})
    m1, s1 = _random_stats(rng, 50, 64)          # rank 49 in 64 dims
    m2, s2 = _random_stats(rng, 50, 64, 0.3)
    inputs.update({"singular/mu1": m1, "singular/sigma1": s1, "singular/mu2": m2, "singular/sigma2": s2})
    inputs.update({"same/mu1": m1, "same/sigma1": s1, "same/mu2": m1, "same/sigma2": s1})
    inputs.update({"kid/f1": rng.standard_normal((300, 32)), "kid/f2": rng.standard_normal((250, 32)) + 0.1,
                   "kid/num_subsets": np.int64(20), "kid/subset_size": np.int64(100)})
    inputs.update({"is/logits": rng.standard_normal((500, 1008)) * 3, "is/splits": np.int64(10)})
    folder = tmp_path_factory.mktemp("fid_reference")
    np.savez(folder / "in.npz", **inputs)
    proc = subprocess.run([sys.executable, script, "metrics", str(folder / "in.npz"), str(folder / "out.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return inputs, dict(np.load(folder / "out.npz"))


@pytest.mark.parametrize("case", ["well", "singular"])
def test_frechet_distance_equals_pytorch_fid(reference_cases, case):
    inputs, out = reference_cases
    ours = metrics.frechet_distance(*(inputs[f"{case}/{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2")))
    assert ours == pytest.approx(float(out[f"{case}/fid"]), rel=1e-6)


def test_frechet_distance_of_identical_rank_deficient_stats_is_zero_like_pytorch_fid(reference_cases):
    inputs, out = reference_cases
    scale = 2 * np.trace(inputs["same/sigma1"])   # pytorch-fid's sqrtm leaves ~1e-5 here (can be negative)
    assert abs(float(out["same/fid"])) < 1e-6 * scale
    ours = metrics.frechet_distance(inputs["same/mu1"], inputs["same/sigma1"], inputs["same/mu2"], inputs["same/sigma2"])
    assert 0.0 <= ours < 1e-6 * scale


def test_kid_equals_torch_fidelity(reference_cases):
    inputs, out = reference_cases
    kid = metrics.kernel_inception_distance(inputs["kid/f1"], inputs["kid/f2"], num_subsets=20, subset_size=100)
    assert kid["subset_size"] == 100
    assert kid["kid_mean"] == pytest.approx(float(out["kid/kid_mean"]), rel=1e-9)
    assert kid["kid_std"] == pytest.approx(float(out["kid/kid_std"]), rel=1e-9)


def test_inception_score_equals_torch_fidelity(reference_cases):
    inputs, out = reference_cases
    isc = metrics.inception_score(inputs["is/logits"], splits=10)
    assert isc["is_mean"] == pytest.approx(float(out["is/is_mean"]), rel=1e-9)
    assert isc["is_std"] == pytest.approx(float(out["is/is_std"]), rel=1e-9)


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="means"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(2))


# ---------------------------------------------------------------- KID / IS without the reference

def test_kid_shrinks_the_subset_size_to_the_smaller_set():
    rng = np.random.default_rng(8)
    f1, f2 = rng.standard_normal((40, 8)), rng.standard_normal((30, 8))
    kid = metrics.kernel_inception_distance(f1, f2, num_subsets=5, subset_size=1000)
    assert kid["subset_size"] == 30 and np.isfinite(kid["kid_mean"]) and kid["kid_std"] >= 0
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kernel_inception_distance(f1[:1], f2, num_subsets=5)
    with pytest.raises(ValueError, match="same width"):
        metrics.kernel_inception_distance(f1, f2[:, :4])


def test_kid_of_a_set_with_itself_is_near_zero_and_a_shift_is_not():
    f = np.random.default_rng(9).standard_normal((400, 16))
    same = metrics.kernel_inception_distance(f, f, num_subsets=20, subset_size=200)
    shifted = metrics.kernel_inception_distance(f, f + 1.0, num_subsets=20, subset_size=200)
    assert abs(same["kid_mean"]) < 0.01 * shifted["kid_mean"]
    # The whole set against itself: K_XY keeps its diagonal, so the estimate is exactly
    # 2 (sum K - tr K) / (m (m - 1)) - 2 sum K / m^2, slightly below 0.
    k = (f @ f.T / 16 + 1.0) ** 3
    m = len(f)
    exact = 2 * (k.sum() - np.trace(k)) / (m * (m - 1)) - 2 * k.sum() / m ** 2
    whole = metrics.kernel_inception_distance(f, f, num_subsets=3, subset_size=m)
    assert whole["kid_mean"] == pytest.approx(exact, rel=1e-9) and whole["kid_std"] < 1e-12
    assert -0.01 * np.trace(k) / m < exact < 0


def test_inception_score_of_uniform_predictions_is_one():
    isc = metrics.inception_score(np.zeros((100, 7)), splits=5)
    assert isc["is_mean"] == pytest.approx(1.0, abs=1e-12) and isc["is_std"] == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_predictions_over_k_classes_approaches_k():
    k = 10
    logits = 50.0 * np.eye(k)[np.arange(1000) % k]   # near one-hot, every class used equally
    isc = metrics.inception_score(logits, splits=1)
    assert isc["is_mean"] == pytest.approx(k, rel=1e-6)
    assert 9.0 < metrics.inception_score(logits, splits=10)["is_mean"] <= k + 1e-9  # 100 a split: near-equal use
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(logits[:5], splits=10)


# ---------------------------------------------------------------- statistics files

def test_statistics_round_trip_atomically(tmp_path):
    rng = np.random.default_rng(10)
    mu, sigma = _random_stats(rng, 30, 6)
    path = tmp_path / "stats.npz"
    metrics.save_statistics(str(path), mu, sigma)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]   # no temporary left behind
    with np.load(path) as f:                                             # pytorch-fid's keys
        assert sorted(f.files) == ["mu", "sigma"]
    mu2, sigma2 = metrics.load_statistics(str(path))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    metrics.save_statistics(str(path), mu + 1, sigma)                    # overwrite in place
    np.testing.assert_array_equal(metrics.load_statistics(str(path))[0], mu + 1)


def test_load_statistics_names_the_file_and_the_problem(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(ValueError, match=r"nope\.npz.*no such"):
        metrics.load_statistics(str(missing))
    cases = {"nokey.npz": ({"mu": np.zeros(3)}, "missing key.*'sigma'"),
             "mu2d.npz": ({"mu": np.zeros((3, 1)), "sigma": np.eye(3)}, r"mu must be a vector"),
             "sigma.npz": ({"mu": np.zeros(3), "sigma": np.eye(4)}, r"sigma must be \(3, 3\)"),
             "nan.npz": ({"mu": np.array([0.0, np.nan]), "sigma": np.eye(2)}, "finite")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*" + message):
            metrics.load_statistics(str(tmp_path / name))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"junk\.npz.*not a readable"):
        metrics.load_statistics(str(tmp_path / "junk.npz"))
    with pytest.raises(ValueError, match="sigma must be"):
        metrics.save_statistics(str(tmp_path / "bad.npz"), np.zeros(3), np.eye(2))
    assert not (tmp_path / "bad.npz").exists()
