"""Inception features for FID: minidiff against pytorch-fid on torch (CPU), side by side.

    python benchmarks/bench_inception.py                  # 1000 CIFAR-10-shaped images, 2 threads
    python benchmarks/bench_inception.py --num 200 --rounds 1
    python benchmarks/bench_inception.py --backend cupy   # minidiff on a GPU (torch stays on the CPU)

Both compute the 2048 pool3 features of the same uint8 32x32 RGB images (resized to 299 x 299
bilinearly and scaled to [-1, 1], pytorch-fid's transform), in batches of 50, with the same random
weights (no weights can be downloaded here, and the time does not depend on their values):
tests/fid_reference.py builds pytorch-fid 0.3.0's own InceptionV3 and saves its weights with
torch.save; minidiff reads that file with inception.load. Each measurement is a fresh process, in
the order A B A B (--rounds), so a noisy neighbour hits both; the table gives each run's seconds,
images/s, peak resident memory above the process's state after loading the model, the time ratio,
and the features' largest relative difference. The time a 50,000-sample FID would take is extrapolated
from the measured rate (marked as an estimate). Needs the compat stack of tests/fid_reference.py.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _images(num, seed=0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, (num, 3, 32, 32), dtype=np.uint8)


def _rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind, weights, num, batch, backend_name, out):
    import numpy as np
    x = _images(num)
    if kind == "minidiff":
        from minidiff import backend, inception
        backend.use_backend(backend_name)
        model = inception.load(weights)
        model.features(x[:batch], batch_size=batch)                  # warm-up: thread pool, BLAS, caches
        base = _rss_mb()
        start = time.perf_counter()
        feats = model.features(x, batch_size=batch)
    else:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        import fid_reference
        model = fid_reference.pytorch_fid_model(weights)

        def run(arr):
            with torch.no_grad():
                return np.concatenate([model(torch.from_numpy(arr[a:a + batch].astype(np.float32) / 255))[0]
                                       .reshape(-1, 2048).numpy() for a in range(0, len(arr), batch)])
        run(x[:batch])
        base = _rss_mb()
        start = time.perf_counter()
        feats = run(x)
    seconds = time.perf_counter() - start
    np.save(out + ".npy", feats)
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "peak_mb": _rss_mb() - base, "peak_total_mb": _rss_mb()}, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "WEIGHTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.num, args.batch, args.backend, args.worker[2])
    import fid_reference
    why = fid_reference.missing()
    if why:
        sys.exit(f"bench_inception: the reference stack is missing ({why}); install it with: {fid_reference.INSTALL_HINT}")
    import numpy as np
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), MINIDIFF_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "in.npz"), a=np.zeros((1, 3, 32, 32), np.float32))
        subprocess.run([sys.executable, fid_reference.__file__, "inception", "0", tmp, os.path.join(tmp, "in.npz"),
                        os.path.join(tmp, "ref.npz")], check=True, env=env)
        weights = os.path.join(tmp, "zip.pth")
        rows = []
        for r in range(args.rounds):
            for kind in ("minidiff", "torch"):
                out = os.path.join(tmp, f"{kind}{r}.json")
                subprocess.run([sys.executable, __file__, "--num", str(args.num), "--batch", str(args.batch),
                                "--backend", args.backend if kind == "minidiff" else "numpy",
                                "--worker", kind, weights, out], check=True, env=env)
                with open(out) as f:
                    rows.append((kind, r, json.load(f), np.load(out + ".npy")))
        print(f"# Inception pool3 features of {args.num} uint8 32x32 RGB images (batch {args.batch}, "
              f"{args.threads} threads, minidiff backend {args.backend}); load average {os.getloadavg()[0]:.2f}")
        print("| run | round | seconds | images/s | peak MB above the loaded model | peak RSS MB |")
        print("|---|---|---|---|---|---|")
        for kind, r, res, _ in rows:
            print(f"| {kind} | {r} | {res['seconds']:.1f} | {args.num / res['seconds']:.1f} | {res['peak_mb']:.0f} "
                  f"| {res['peak_total_mb']:.0f} |")
        mine = [res["seconds"] for kind, _, res, _ in rows if kind == "minidiff"]
        theirs = [res["seconds"] for kind, _, res, _ in rows if kind == "torch"]
        ours_f = next(f for kind, _, _, f in rows if kind == "minidiff")
        ref_f = next(f for kind, _, _, f in rows if kind == "torch")
        diff = float(np.abs(ours_f - ref_f).max() / np.abs(ref_f).max())
        ratio = min(mine) / min(theirs)
        print(f"\nminidiff / pytorch-fid time (best of {args.rounds} each): {ratio:.2f}x; features agree to {diff:.1e} "
              f"relative")
        rate = args.num / min(mine)
        print(f"estimate: a 50,000-sample FID (features of 50,000 samples; the reference statistics are computed "
              f"once) would take {50_000 / rate / 60:.0f} min with minidiff here ({rate:.1f} images/s)")


if __name__ == "__main__":
    main()
