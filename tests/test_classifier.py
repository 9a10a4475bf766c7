"""The shipped digit classifiers: accuracy on held-out data, input layouts, weights round trip."""
import json

import numpy as np
import pytest

import minidiff
from minidiff import backend, classifier, data, images
from minidiff.optim import Adam
from minidiff.tensor import Tensor

MIN_ACCURACY = {"digits": 0.97, "mnist": 0.95}


def _shipped(dataset):
    # The weights are package data: missing ones are a packaging bug, never a reason to skip.
    assert classifier.weights_path(dataset).exists(), (
        f"no shipped weights for {dataset}: run scripts/train_classifier.py --dataset {dataset}")
    return classifier.load_classifier(dataset)


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_shipped_weights_reach_their_heldout_accuracy(dataset, backend_name):
    clf = _shipped(dataset)
    x, y = data.load_dataset(dataset, "heldout")
    accuracy = float((clf.predict(x) == y).mean())
    assert accuracy >= MIN_ACCURACY[dataset]
    info = json.loads(classifier.weights_path(dataset).with_suffix(".json").read_text())
    assert accuracy == pytest.approx(info["heldout_accuracy"], abs=2.5 / len(y))  # cupy may flip a tie
    assert clf.heldout_accuracy == info["heldout_accuracy"]


def test_outputs_have_the_documented_shapes_and_uint8_input_matches_float_input():
    clf = _shipped("digits")
    x, _ = data.load_dataset("digits", "heldout")
    probs, feats = clf.predict_proba_and_features(x[:37])
    assert probs.shape == (37, 10) and feats.shape == (37, 64)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    u8 = images.to_uint8(x[:37])  # NHWC uint8, as `minidiff sample --out x.npz` writes
    assert (clf.predict(u8) == probs.argmax(1)).mean() >= 0.97  # 17 grey levels round slightly
    np.testing.assert_allclose(clf.features(u8[..., 0]), clf.features(u8), rtol=1e-6)  # NHW accepted
    with pytest.raises(ValueError, match="8x8"):
        clf.predict(np.zeros((2, 1, 32, 32), np.float32))


def test_weights_round_trip_through_safetensors(tmp_path):
    minidiff.manual_seed(3)
    model = classifier.build_model("digits")
    path = tmp_path / "classifier_digits.safetensors"
    classifier.save_weights(model, path)
    loaded = classifier.load_classifier("digits", path=path)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(x), classifier.Classifier(model).predict_proba(x))
    assert loaded.heldout_accuracy is None  # no JSON beside it
    with pytest.raises(FileNotFoundError, match="train_classifier.py"):
        classifier.load_classifier("digits", path=tmp_path / "missing.safetensors")


def test_a_few_training_steps_lower_the_loss():
    minidiff.manual_seed(0)
    x, y = data.load_dataset("digits", "train")
    x, y = Tensor(backend.to_active(x[:256])), y[:256]
    model = classifier.build_model("digits")
    opt = Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = classifier.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    assert losses[-1] < 0.7 * losses[0]


def test_cross_entropy_matches_its_definition():
    logits = np.random.default_rng(1).standard_normal((6, 10))
    labels = np.array([0, 3, 9, 2, 2, 5])
    expected = -np.mean((logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(6), labels])
    got = float(classifier.cross_entropy(Tensor(logits), labels).data)
    assert got == pytest.approx(expected, rel=1e-10)
