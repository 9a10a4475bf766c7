"""Count what one training step asks of a GPU, on the strict CuPy stand-in (no GPU needed).

Array operations (each a kernel launch on CuPy) and host->device bytes per step of
`minidiff train` (digits preset, --dropout 0.1, batch 64 by default), after warm-up
steps (the schedule tables are copied to the device once). Prints a table, the
operations by name, and with --json the figures as JSON. tests/test_train.py holds
the GPU step budget (<= 3000 operations with the kernels, <= 4x the batch's bytes) with the same count;
MINIDIFF_KERNELS=reference counts the plain math layer.

    python benchmarks/count_step.py                       # the digits step
    python benchmarks/count_step.py --dropout 0 --top 30
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import strict_cupy  # noqa: E402

strict_cupy.install()
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)
from minidiff import train as training  # noqa: E402
from minidiff.config import make_config  # noqa: E402


def count_step(dropout=0.1, batch_size=64, warmup=2, steps=3, sites=False, **overrides):
    """{"ops", "h2d_bytes", "d2h_bytes", "syncs", "batch_bytes", "by_name"} averaged over `steps` steps."""
    config = make_config(preset="digits", dropout=dropout, batch_size=batch_size, backend="cupy",
                         **overrides)
    trainer = training.Trainer(config)
    for _ in range(warmup):
        trainer.train_step()
    strict_cupy.reset()
    strict_cupy.TRACK_SITES = sites
    for _ in range(steps):
        trainer.train_step()
    figures = {k: v / steps for k, v in strict_cupy.snapshot().items()}
    figures["batch_bytes"] = trainer.data[:batch_size].nbytes
    figures["by_name"] = {k: v / steps for k, v in strict_cupy.by_name.most_common()}
    figures["by_site"] = {k: v / steps for k, v in strict_cupy.by_site.most_common()}
    strict_cupy.TRACK_SITES = False
    figures["names_checked"] = strict_cupy.NAMES_CHECKED
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top", type=int, default=15, help="operations to list by name")
    parser.add_argument("--sites", action="store_true", help="also list the operations by line of minidiff")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    f = count_step(dropout=args.dropout, batch_size=args.batch_size, sites=args.sites)
    print(f"digits preset, dropout {args.dropout}, batch {args.batch_size}, strict CuPy stand-in "
          f"(names checked against a real CuPy: {f['names_checked']})")
    print("| per step | value |\n|---|---|")
    print(f"| array operations | {f['ops']:.0f} |")
    print(f"| host->device bytes | {f['h2d_bytes']:.0f} ({f['h2d_bytes'] / f['batch_bytes']:.2f}x the batch's "
          f"{f['batch_bytes']} bytes) |")
    print(f"| in-place writes (setitem, fill, ufunc.at) | {f['writes']:.0f} |")
    print(f"| device->host bytes | {f['d2h_bytes']:.0f} |")
    print(f"| syncs | {f['syncs']:.0f} |")
    print("\noperations by name:")
    for name, n in list(f["by_name"].items())[:args.top]:
        print(f"  {n:7.0f}  {name}")
    if args.sites:
        print("\noperations by line of minidiff:")
        for site, n in list(f["by_site"].items())[:args.top]:
            print(f"  {n:7.0f}  {site}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(f, out, indent=1)


if __name__ == "__main__":
    main()
