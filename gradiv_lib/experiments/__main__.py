"""Command line: ``python -m gradiv_lib.experiments {divebatch,width} [options]``."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from ..runtime import default_threads
from . import divebatch, width


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradiv_lib.experiments",
        description="Run an experiment of the book and write its JSON result (gradiv_lib.results.save).",
    )
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--full", action="store_true", help="the paper-scale protocol (needs --root; meant for a GPU)")
        p.add_argument("--root", help="folder holding the data set (CIFAR: the folder with cifar-10-batches-py)")
        p.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="seeds (default: the config's)")
        p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
        p.add_argument("--out", help="root folder of the result (default: the package's _results, read by the book)")
        p.add_argument("--name", help="result name (default: <experiment>_<dataset>)")
        p.add_argument("--threads", type=int, help="torch CPU threads (default: $GRADIV_THREADS if set; else 1 for "
                       "the quick runs, whose tiny models run fastest on one thread, and all cores up to 8 with --full)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    d = sub.add_parser("divebatch", help="DiveBatch vs SGD small/large batch vs AdaBatch (chapter 4)",
                       description=divebatch.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--dataset", default="digits", choices=sorted(divebatch.CONFIGS),
                   help="digits (quick, default) or, with --full, cifar10 / cifar100")
    common(d)
    d.add_argument("--methods", nargs="+", choices=sorted(divebatch.METHODS), metavar="METHOD",
                   help=f"subset of {', '.join(divebatch.METHODS)}")
    d.add_argument("--epochs", type=int, help="override the number of epochs")
    d.add_argument("--delta", type=float, help="override DiveBatch's delta")
    d.add_argument("--resize-every", type=int, help="override the resize frequency (epochs)")
    d.add_argument("--lr-cap", type=float, help="cap on the cumulative learning-rate multiplier")
    d.add_argument("--checkpoint-dir", help="checkpoint folder (default in --full: ./gradiv_checkpoints/divebatch_<dataset>)")
    d.add_argument("--download", action="store_true", help="download the data set into --root if missing")

    w = sub.add_parser("width", help="diversity and the large-batch knee vs depth at a fixed budget (chapter 3)",
                       description=width.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--dataset", default="synthetic", choices=sorted(width.PRESETS),
                   help="synthetic (deep linear, default), digits (ReLU MLPs) or, with --full, cifar10")
    common(w)
    w.add_argument("--depths", type=int, nargs="+", help="override the depths")
    w.add_argument("--batch-sizes", type=int, nargs="+", help="override the batch sizes")
    w.add_argument("--max-steps", type=int, help="override the step limit per run")
    w.add_argument("--checkpoint-dir", help="partial-result checkpoint folder (default in --full: ./gradiv_checkpoints)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for key in ("epochs", "resize_every", "max_steps", "threads"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    for key in ("delta", "lr_cap"):
        value = getattr(args, key, None)
        if value is not None and not value > 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0, got {value}")
    for key in ("depths", "batch_sizes", "seeds"):
        values = getattr(args, key, None) or []
        if any(v < (0 if key == "seeds" else 1) for v in values):
            parser.error(f"--{key.replace('_', '-')} must be {'>= 0' if key == 'seeds' else '>= 1'}, got {values}")
    if args.full and args.root is None:
        parser.error("--full needs --root PATH (the folder that holds the data set)")
    if args.full and args.dataset in ("digits", "synthetic"):
        parser.error(f"--full runs on cifar10{' or cifar100' if args.experiment == 'divebatch' else ''}; "
                     f"add --dataset cifar10 (got --dataset {args.dataset})")
    if not args.full and args.dataset.startswith("cifar"):
        parser.error(f"--dataset {args.dataset} is the full protocol: add --full and --root PATH")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.threads:
        threads = args.threads
    else:
        threads = default_threads() if args.full or "GRADIV_THREADS" in os.environ else 1
    torch.set_num_threads(threads)
    if args.full and not torch.cuda.is_available() and (args.device or "cpu").startswith("cpu"):
        print("warning: --full without a GPU: ResNet-18 / CIFAR runs take days on a CPU", file=sys.stderr)
    common = dict(full=args.full, root=args.root, seeds=args.seeds, device=args.device, out=args.out, name=args.name,
                  progress=not args.no_progress)
    try:
        if args.experiment == "divebatch":
            path, payload = divebatch.run(args.dataset, methods=args.methods, checkpoint_dir=args.checkpoint_dir,
                                          download=args.download, epochs=args.epochs, delta=args.delta,
                                          resize_every=args.resize_every, lr_cap=args.lr_cap, **common)
        else:
            path, payload = width.run(args.dataset, depths=args.depths, batch_sizes=args.batch_sizes,
                                      max_steps=args.max_steps, checkpoint_dir=args.checkpoint_dir, **common)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.experiment}: wrote {path} ({payload['seconds']:.1f} s on {payload['machine']['device']})")
    for key, row in payload["data"]["summary"].items():
        print(f"  {key:>18}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
