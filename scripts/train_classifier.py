"""Train the digit classifier that minidiff's quality metrics use, and ship its weights.

    python scripts/train_classifier.py --dataset digits     # ~1 minute on 2 CPU cores
    python scripts/train_classifier.py --dataset mnist      # longer; --backend cupy helps

Trains minidiff.classifier's DigitClassifier with minidiff itself (Adam, cross-entropy,
fixed seed, fixed number of steps: no early stopping, so the held-out split is
never used for any choice), on the training split only, then reports the held-out
accuracy and writes minidiff/assets/classifier_<dataset>.safetensors and a .json
with the accuracy, seed, steps and settings beside it.
"""
import argparse
import json
import time
from pathlib import Path

import minidiff
from minidiff import backend, classifier, data
from minidiff.optim import Adam
from minidiff.tensor import Tensor

DEFAULTS = {  # dataset -> (steps, batch size, learning rate); chosen to fit a minute or a few on 2 cores
    "digits": (1500, 64, 2e-3),
    "mnist": (2000, 64, 1e-3),
}


def shift_augment(x, rng, max_shift=1):
    """Roll each image by up to `max_shift` pixels in x and y (background fills in): cheap invariance."""
    out = backend.host.full_like(x, -1.0)
    size = x.shape[-1]
    for i, (dy, dx) in enumerate(rng.integers(-max_shift, max_shift + 1, (len(x), 2))):
        src = x[i, :, max(0, -dy):size - max(0, dy), max(0, -dx):size - max(0, dx)]
        out[i, :, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(classifier.CONFIGS), default="digits")
    p.add_argument("--steps", type=int, default=None, help="default: per data set (see DEFAULTS)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--out-dir", type=Path, default=classifier.ASSETS)
    args = p.parse_args(argv)
    steps, batch_size, lr = DEFAULTS[args.dataset]
    steps, batch_size, lr = args.steps or steps, args.batch_size or batch_size, args.lr or lr

    minidiff.use_backend(args.backend)
    minidiff.manual_seed(args.seed)  # the initial weights
    rng = backend.host.random.default_rng(args.seed)  # batch order and shifts
    x_train, y_train = data.load_dataset(args.dataset, "train")
    x_held, y_held = data.load_dataset(args.dataset, "heldout")
    model = classifier.build_model(args.dataset)
    opt = Adam(model.parameters(), lr=lr, warmup_steps=100, grad_clip=1.0)
    print(f"{args.dataset}: {len(x_train)} train / {len(x_held)} held-out images, "
          f"{model.num_parameters()} parameters, {steps} steps of batch {batch_size}, lr {lr}")

    start = time.time()
    order, pos = rng.permutation(len(x_train)), 0
    for step in range(1, steps + 1):
        if pos + batch_size > len(order):  # a new epoch
            order, pos = rng.permutation(len(x_train)), 0
        idx, pos = order[pos:pos + batch_size], pos + batch_size
        # Cosine decay to 0 after the warmup: the last steps settle the weights.
        opt.lr = lr * 0.5 * (1 + backend.host.cos(backend.host.pi * step / steps))
        xb = Tensor(backend.to_active(shift_augment(x_train[idx], rng)))
        loss = classifier.cross_entropy(model(xb), backend.to_active(y_train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            print(f"step {step:5d}  loss {float(loss.data):.4f}  {time.time() - start:6.1f}s", flush=True)

    clf = classifier.Classifier(model, args.dataset)
    train_acc = float((clf.predict(x_train) == y_train).mean())
    heldout_acc = float((clf.predict(x_held) == y_held).mean())
    print(f"train accuracy {train_acc:.4f}   held-out accuracy {heldout_acc:.4f} ({len(x_held)} images)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / f"classifier_{args.dataset}.safetensors"
    classifier.save_weights(model, weights)
    weights.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    info = {"dataset": args.dataset, "heldout_accuracy": heldout_acc, "train_accuracy": train_acc,
            "num_heldout": len(x_held), "num_train": len(x_train), "seed": args.seed, "steps": steps,
            "batch_size": batch_size, "lr": lr, "schedule": "100-step linear warmup, cosine decay",
            "augmentation": "random shifts of up to 1 pixel", "backend": args.backend,
            "train_seconds": round(time.time() - start, 1), "parameters": model.num_parameters(),
            "script": "scripts/train_classifier.py"}
    weights.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {weights} ({weights.stat().st_size // 1024} KiB) and {weights.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
