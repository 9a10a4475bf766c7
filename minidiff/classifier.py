"""A small convolutional digit classifier, trained with minidiff itself, for the quality metrics.

FID uses an Inception network trained on ImageNet; minidiff has no such network and
needs none for digits. This one plays its part: `features` (the penultimate layer,
64 numbers per image) feeds the Frechet distance and precision/recall, and
`predict_proba` gives class coverage and confidence (metrics.py).

Architecture (`DigitClassifier`): a 3x3 conv at full resolution, then 3x3 convs
of stride 2 (pooling by strided convolution) until 2x2 (8x8 digits) or 4x4
(32x32 MNIST), SiLU after each; flatten; Linear -> SiLU (the features); Linear -> 10 logits.
No normalisation layer: the nets are small and Adam trains them in a minute.
The weights ship in assets/classifier_<dataset>.safetensors (no pickle) with a
JSON of their held-out accuracy; scripts/train_classifier.py reproduces them.
"""
import json
from pathlib import Path

from . import backend, nn
from . import functional as F
from .tensor import Tensor, no_grad

host = backend.host
ASSETS = Path(__file__).resolve().parent / "assets"
# dataset -> (image side, channel widths of the conv stack, feature dim)
CONFIGS = {"digits": (8, (16, 32, 64), 64),
           "mnist": (32, (16, 32, 64, 64), 64)}
NUM_CLASSES = 10


class DigitClassifier(nn.Module):
    """(N, 1, S, S) images in [-1, 1] -> (N, 10) logits; `features` is the layer before them."""

    def __init__(self, image_size=8, channels=(16, 32, 64), feature_dim=64, num_classes=NUM_CLASSES):
        self.image_size = image_size
        convs, c_in = [], 1
        for i, c in enumerate(channels):  # first conv keeps the size, each later one halves it
            convs.append(nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1))
            c_in = c
        self.convs = nn.ModuleList(convs)
        side = image_size // 2 ** (len(channels) - 1)
        if side < 1 or side * 2 ** (len(channels) - 1) != image_size:
            raise ValueError(f"{len(channels) - 1} stride-2 convs do not divide a {image_size}x{image_size} image")
        self.hidden = nn.Linear(c_in * side * side, feature_dim)
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        """Penultimate activations: (N, 1, S, S) Tensor -> (N, feature_dim) Tensor."""
        for conv in self.convs:
            x = F.silu(conv(x))
        x = x.reshape(x.shape[0], -1)  # (N, C * s * s)
        return F.silu(self.hidden(x))

    def forward(self, x):
        return self.out(self.features(x))


def cross_entropy(logits, labels):
    """Mean -log softmax(logits)[label], with labels as a one-hot mask: (N, K), (N,) int -> scalar."""
    xp = backend.xp_of(logits.data)
    onehot = (xp.arange(logits.shape[1])[None, :] == xp.asarray(labels)[:, None]).astype(logits.dtype)
    return -(logits.log_softmax(axis=1) * Tensor(onehot)).sum(axis=1).mean()


def prepare_images(images, image_size):
    """Images as the classifier takes them: float32 (N, 1, S, S) in [-1, 1], on the host.

    Accepts that layout already, or uint8 (N, H, W, C) / (N, H, W) as `minidiff sample`
    writes to .npz (RGB is averaged to grey; raw 28x28 MNIST is padded to 32x32).
    """
    x = backend.to_numpy(images.data if isinstance(images, Tensor) else images)
    if x.dtype == host.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 images of shape (N, H, W, C) with C = 1 or 3, got {x.shape}")
        if x.shape[1:3] == (28, 28) and image_size == 32:  # raw MNIST: pad as minidiff.data does
            x = host.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
        x = x.astype(host.float32).mean(-1, keepdims=True).transpose(0, 3, 1, 2) / 127.5 - 1.0
    if x.ndim != 4 or x.shape[1:] != (1, image_size, image_size):
        raise ValueError(f"this classifier takes {image_size}x{image_size} grey images, "
                         f"(N, 1, {image_size}, {image_size}) floats or (N, {image_size}, {image_size}, 1) "
                         f"uint8; got shape {x.shape}")
    return x.astype(backend.DTYPE)


class Classifier:
    """A trained DigitClassifier with batched, gradient-free inference on the active backend."""

    def __init__(self, model, dataset=None, heldout_accuracy=None, batch_size=500):
        self.model, self.dataset = model, dataset
        self.heldout_accuracy, self.batch_size = heldout_accuracy, batch_size
        self.model.eval()

    def predict_proba_and_features(self, images):
        """(probabilities (N, 10), features (N, 64)) as float32 host arrays, in one pass."""
        x = prepare_images(images, self.model.image_size)
        probs, feats = [], []
        with no_grad():
            for i in range(0, len(x), self.batch_size):
                f = self.model.features(Tensor(backend.to_active(x[i:i + self.batch_size])))
                probs.append(backend.to_numpy(self.model.out(f).softmax(axis=1).data))  # sync point
                feats.append(backend.to_numpy(f.data))
        if not probs:
            raise ValueError("no images to classify")
        return host.concatenate(probs), host.concatenate(feats)

    def predict_proba(self, images):
        """Class probabilities (N, 10) of images (see `prepare_images` for accepted layouts)."""
        return self.predict_proba_and_features(images)[0]

    def features(self, images):
        """Penultimate-layer features (N, 64): the space of the Frechet distance and precision/recall."""
        return self.predict_proba_and_features(images)[1]

    def predict(self, images):
        """Predicted labels (N,) int64."""
        return self.predict_proba(images).argmax(1)


def build_model(dataset):
    """An untrained DigitClassifier sized for a bundled data set ("digits" or "mnist")."""
    if dataset not in CONFIGS:
        raise ValueError(f"no classifier for data set {dataset!r}; known: {', '.join(CONFIGS)}")
    size, channels, feature_dim = CONFIGS[dataset]
    return DigitClassifier(size, channels, feature_dim)


def weights_path(dataset):
    return ASSETS / f"classifier_{dataset}.safetensors"


def load_classifier(dataset="digits", path=None):
    """The shipped classifier of a bundled data set, ready for `features`/`predict_proba`."""
    from safetensors.numpy import load_file  # a plain tensor table: loading runs no code
    path = Path(path) if path else weights_path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; recreate it with "
                                f"`python scripts/train_classifier.py --dataset {dataset}`")
    model = build_model(dataset)
    model.load_state_dict({k: backend.to_active(v) for k, v in load_file(str(path)).items()})
    info_path = path.with_suffix(".json")
    accuracy = json.loads(info_path.read_text())["heldout_accuracy"] if info_path.exists() else None
    return Classifier(model, dataset, accuracy)


def save_weights(model, path):
    """Write a model's state_dict as safetensors (float32 host arrays)."""
    from safetensors.numpy import save_file
    save_file({k: host.ascontiguousarray(backend.to_numpy(v), dtype=host.float32)
               for k, v in model.state_dict().items()}, str(path))
