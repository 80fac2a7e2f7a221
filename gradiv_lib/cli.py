"""The ``gradiv`` command: every experiment, runner and benchmark of the book behind one command line.

``gradiv SUB-COMMAND [options]`` (also ``python -m gradiv_lib``). This module imports only the standard library at
start-up, so ``--help`` is instant; torch and the library's modules are imported when a sub-command runs.
Every run writes its JSON result under ``./gradiv-results`` (or ``--out DIR``), never into the package, and ends
with a summary: what ran, where the result went, how long it took. Foreseeable failures (a bad device, a missing
data set, no network, an unusable ``--out``) end with one line on stderr and a non-zero exit status, never a
traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "gradiv"

EPILOG = """\
Each run writes a JSON result (configuration, command, versions, git commit, device, seconds, data) to
./gradiv-results/<chapter>/<name>.json, or under --out DIR. The book's pages read the results shipped with
the library; 'gradiv regenerate' remakes those from a clean checkout.

Examples:
  gradiv divebatch                       DiveBatch vs SGD on digits (seconds)
  gradiv width --dataset digits --book   the ReLU width sweep shipped with chapter 3 (minutes)
  gradiv width --dataset mnist1d --book  the MNIST-1D width sweep shipped with chapter 3 (minutes)
  gradiv plasticity random_labels        a quick continual-learning run (seconds)
  gradiv workers --nproc 4 --steps 60    four torch.distributed processes on this machine
  gradiv regenerate --cheap --check      rerun the cheap shipped results and compare
  gradiv dsgd-sam --book                 D-SGD vs SAM on MNIST-1D, each tuned (chapter 6, minutes)
"""


class CLIError(Exception):
    """A foreseeable failure: printed as one line, exit status 1."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks; options show their defaults."""


def _number_type(convert: type, valid: str, ok: Any) -> Any:
    """An argparse ``type=``: ``convert(text)``, refused with "expected {valid}, got ..." unless ``ok(value)``."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {valid}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {valid}, got {value}")
        return value
    return parse


_positive_int = _number_type(int, "an integer >= 1", lambda v: v >= 1)
_seed = _number_type(int, "an integer seed >= 0", lambda v: v >= 0)
_positive_float = _number_type(float, "a number > 0", lambda v: v > 0)


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


# --------------------------------------------------------------------------------------------
# The parser (standard library only)
# --------------------------------------------------------------------------------------------

def _run_options(p: argparse.ArgumentParser, *, device: bool = True, seeds: bool = True) -> None:
    g = p.add_argument_group("where and how")
    g.add_argument("--out", metavar="DIR", help="folder for the result (default: ./gradiv-results)")
    if device:
        g.add_argument("--device", type=_device, default="auto",
                       help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    g.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads (default: $GRADIV_THREADS, else 1 for the small quick runs and up to 8 "
                        "with --full)")
    if seeds:
        g.add_argument("--seeds", type=_seed, nargs="+", metavar="SEED", help="seeds (default: the mode's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_divebatch(sub: Any) -> None:
    p = sub.add_parser(
        "divebatch", help="DiveBatch vs SGD (small and large batch) vs AdaBatch (chapter 4)",
        formatter_class=_Formatter,
        epilog="Several processes (data parallel: each takes a slice of every global batch; gradients and\n"
               "per-sample norms are all-reduced, so the run is the one-process run of the same batches):\n"
               "  gradiv divebatch --nproc 2              two gloo processes on this machine's CPU\n"
               "  torchrun --standalone --nproc-per-node 4 -m gradiv_lib divebatch --full --dataset cifar10\n"
               "      --root DIR --device cuda            four processes, one GPU each (nccl)",
        description="DiveBatch vs SGD with a small and a large batch vs AdaBatch (chapter 4).\n\n"
                    "Default (quick, seconds on a CPU): scikit-learn digits, an MLP 64-64-10, SGD with momentum,\n"
                    "batch 16 to 512, 20 epochs, three seeds; steps, samples and seconds to 98 % test accuracy.\n"
                    "This is the run shipped with the book (ch04/divebatch_digits).\n\n"
                    "--full --dataset cifar10|cifar100 --root DIR: the DiveBatch authors' protocol (ResNet-18,\n"
                    "200 epochs, batch 128 to 2048; a GPU, hours). It checkpoints every epoch and resumes when\n"
                    "the same command is run again.")
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist1d", "cifar10", "cifar100"],
                   help="digits (quick), mnist1d (each method's learning rate tuned; minutes) or, with --full, "
                        "cifar10 / cifar100")
    p.add_argument("--full", action="store_true", help="the paper's protocol on CIFAR (needs --root; meant for a GPU)")
    p.add_argument("--book", action="store_true", help="the run shipped with the book (the quick digits run)")
    p.add_argument("--root", metavar="DIR", help="folder holding the data set (CIFAR: the folder with cifar-10-batches-py)")
    p.add_argument("--download", action="store_true", help="download the data set into --root if it is missing")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   choices=["sgd_small", "sgd_large", "adabatch", "adabatch_linear", "divebatch", "divebatch_sqrt",
                            "divebatch_linear", "divebatch_delta0.1"],
                   help="subset of sgd_small, sgd_large, adabatch, adabatch_linear, divebatch, divebatch_sqrt, "
                        "divebatch_linear, divebatch_delta0.1")
    p.add_argument("--epochs", type=_positive_int, help="override the number of epochs")
    p.add_argument("--delta", type=_positive_float, help="override DiveBatch's delta")
    p.add_argument("--resize-every", type=_positive_int, help="override the resize frequency (epochs)")
    p.add_argument("--lr-cap", type=_positive_float, help="cap on the cumulative learning-rate multiplier")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="checkpoint folder (default with --full: ./gradiv_checkpoints/divebatch_<dataset>)")
    p.add_argument("--name", help="result name under ch04/ (default: divebatch_<dataset>)")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="data-parallel gloo processes on this machine's CPU (ignored under torchrun)")
    _run_options(p)


def _add_width(sub: Any) -> None:
    p = sub.add_parser(
        "width", help="gradient diversity and the large-batch knee vs depth at a fixed budget (chapter 3)",
        formatter_class=_Formatter,
        description="Gradient diversity at initialisation and the large-batch knee (steps to a target vs batch\n"
                    "size) across networks of equal size and different depths (chapter 3).\n\n"
                    "Datasets: synthetic (deep linear networks on a linear teacher), digits or mnist1d (ReLU\n"
                    "MLPs; MNIST-1D is generated offline).\n"
                    "Default (quick, under a minute): one seed, depths 2 and 6, three batch sizes; the result is\n"
                    "named width_<dataset>_quick.\n"
                    "--book: the book's sweep (depths 2, 3, 4, 6, six batch sizes, several seeds; minutes).\n"
                    "--full --dataset cifar10 --root DIR: ReLU MLPs on CIFAR-10 (a GPU).")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "digits", "mnist1d", "cifar10"],
                   help="synthetic (deep linear), digits or mnist1d (ReLU MLPs) or, with --full, cifar10")
    p.add_argument("--book", action="store_true", help="the book's settings (minutes on a CPU)")
    p.add_argument("--full", action="store_true", help="the CIFAR-10 protocol (needs --root; meant for a GPU)")
    p.add_argument("--root", metavar="DIR", help="folder holding cifar-10-batches-py (with --full)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --root if it is missing")
    p.add_argument("--depths", type=_positive_int, nargs="+", metavar="L", help="override the depths")
    p.add_argument("--batch-sizes", type=_positive_int, nargs="+", metavar="B", help="override the batch sizes")
    p.add_argument("--max-steps", type=_positive_int, help="override the step limit per run")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="partial-result checkpoint folder (default with --full: ./gradiv_checkpoints)")
    p.add_argument("--name", help="result name under ch03/ (default: width_<dataset>, plus _quick in quick mode)")
    _run_options(p)


def _add_plasticity(sub: Any) -> None:
    p = sub.add_parser(
        "plasticity", help="continual learning: regularizers against loss of plasticity (chapter 8)",
        formatter_class=_Formatter,
        description="Continual learning with the regularizers of chapter 8 (none, L2, L2 to the initial weights,\n"
                    "Wasserstein, spectral, shrink-and-perturb).\n\n"
                    "  mnist1d        random labels on MNIST-1D; every method tuned on a grid centred on its own\n"
                    "                 scale (tuning seeds), then its best setting on fresh seeds (sections 8.2, 8.3)\n"
                    "  random_labels  digits: 600 images with fresh random labels per task, hand-picked strengths\n"
                    "  permuted       digits: a fresh pixel permutation per task, hand-picked strengths\n\n"
                    "Default (quick, under a minute): a few small tasks, one seed, a subset of the methods;\n"
                    "the result is named <experiment>_quick.\n"
                    "--book: the book's settings (minutes; mnist1d about half an hour on one core).")
    p.add_argument("experiment", choices=["mnist1d", "random_labels", "permuted"], help="which run")
    p.add_argument("--book", action="store_true", help="the book's settings (minutes on a CPU)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   choices=["none", "l2", "l2_init", "wasserstein", "spectral", "shrink_perturb"],
                   help="subset of none, l2, l2_init, wasserstein, spectral, shrink_perturb (mnist1d: the baseline "
                        "none always runs)")
    p.add_argument("--tasks", type=_positive_int, help="number of tasks in the stream")
    p.add_argument("--epochs-per-task", type=_positive_int, help="epochs on each task")
    p.add_argument("--name", help="result name under ch08/ (default: the experiment, plus _quick in quick mode)")
    _run_options(p, device=False)


def _add_federated(sub: Any) -> None:
    p = sub.add_parser(
        "federated", help="federated learning: FedAvg, FedAWARE and other server optimizers (chapter 7)",
        formatter_class=_Formatter,
        description="Federated rounds on digits split over clients with a Dirichlet label skew (chapter 7):\n"
                    "each round samples clients, runs their local SGD as stacked tensors and aggregates on the\n"
                    "server. Records accuracy, loss and the gradient diversity of the client updates per round.\n\n"
                    "Default (quick, seconds): 100 clients, 10 per round, 30 rounds, FedAvg and FedAWARE.\n"
                    "--full: 300 rounds. --flower: each server in the simulator and as a real Flower deployment on\n"
                    "this machine (flower-superlink, one flower-supernode per client, flwr run: separate processes\n"
                    "on 127.0.0.1), saving federated/flower_check with the largest parameter difference; needs the\n"
                    "'flower' extra (pip install \"gradiv_lib[flower]\") and at most 16 clients, e.g.\n"
                    "  gradiv federated --flower --servers fedaware --clients 3 --per-round 2 --rounds 3\n\n"
                    "--sweep: chapter 7's fair comparison instead: every server (FedAvg, FedAvgM, FedProx, FedYogi,\n"
                    "FedAWARE) tuned on its own 12-point grid (server rate x its key hyperparameter) in every\n"
                    "setting (digits, MNIST-1D) x (Dirichlet 0.1, 2 shards) x (equal, heterogeneous local steps),\n"
                    "the best rerun on fresh seeds. Quick by default (one setting, 30 rounds, seconds); with\n"
                    "--full the book's sweep (8 settings, 100 rounds, tuning seeds 0-2, fresh seeds 3-5; ~25 min).")
    p.add_argument("--sweep", action="store_true", help="the tuning sweep of chapter 7 (see above)")
    p.add_argument("--edges", action="store_true",
                   help="with --sweep: probe configurations one step beyond the grids' edges on two digits settings")
    p.add_argument("--servers", nargs="+", default=None, metavar="SERVER",
                   choices=["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedaware"],
                   help="server optimizers, one run each: fedavg fedprox fedavgm fedadam fedyogi fedaware "
                        "(default: fedavg fedaware; with --sweep all but fedadam)")
    p.add_argument("--rounds", type=_positive_int, help="communication rounds (default 30, 300 with --full)")
    p.add_argument("--full", action="store_true", help="the longer run (300 rounds)")
    p.add_argument("--clients", type=_positive_int, default=100, help="number of clients")
    p.add_argument("--per-round", type=_positive_int, default=10, help="clients sampled per round")
    p.add_argument("--alpha", type=_positive_float, default=0.3, help="Dirichlet concentration of the label skew")
    p.add_argument("--local-work", choices=["hetero+", "steps10"], default="hetero+",
                   help="hetero+: epochs 2-5 and batch sizes drawn per client per round; steps10: 10 steps of batch 10")
    p.add_argument("--lr", type=_positive_float, default=0.05, help="clients' learning rate")
    p.add_argument("--flower", action="store_true",
                   help="compare the simulator with a Flower deployment on 127.0.0.1 (SuperLink + one SuperNode per client)")
    p.add_argument("--name", help="result name under federated/ (default: digits_<servers>; flower_check with --flower)")
    _run_options(p, device=False)


#: The options of the torch.distributed runner, as in ``gradiv_lib.workers.distributed.build_parser`` (a test checks
#: that the two agree); kept here so that ``gradiv workers --help`` does not import torch.
WORKER_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--algorithm", dict(default="dsgd", choices=["csgd", "dsgd", "local", "local_sgd", "minibatch_sgd"],
                         help="what the workers do")),
    ("--topology", dict(default="ring", choices=["complete", "exponential", "grid", "one_peer_exponential", "random",
                                                 "ring", "star", "torus"],
                        help="gossip graph for dsgd (and local_sgd with --gossip)")),
    ("--gossip", dict(action="store_true", help="local_sgd: one gossip step instead of exact averaging")),
    ("--local-steps", dict(type=int, default=4, help="local_sgd: local steps per round H")),
    ("--lr", dict(type=float, default=0.5, help="learning rate")),
    ("--momentum", dict(type=float, default=0.0, help="momentum")),
    ("--weight-decay", dict(type=float, default=0.0, help="weight decay")),
    ("--nesterov", dict(action="store_true", help="Nesterov momentum")),
    ("--batch-size", dict(type=int, default=16, help="samples per worker per step")),
    ("--steps", dict(type=int, default=200, help="training steps")),
    ("--seed", dict(type=int, default=0, help="model init, data split and batch order")),
    ("--dataset", dict(default="digits", choices=["digits", "synthetic"], help="training data")),
    ("--model", dict(default="mlp", choices=["mlp", "cnn"], help="network")),
    ("--width", dict(type=int, default=64, help="hidden width (MLP) or channels (CNN)")),
    ("--depth", dict(type=int, default=2, help="number of layers")),
    ("--partition", dict(default="iid", choices=["iid", "dirichlet", "shards"], help="how the data is split")),
    ("--alpha", dict(type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet")),
    ("--shards-per-client", dict(type=int, default=2, help="shards per worker for --partition shards")),
    ("--sampling", dict(default="epoch", choices=["epoch", "replacement"], help="batch order within a shard")),
    ("--dtype", dict(default="float32", choices=["float32", "float64"], help="floating-point precision")),
    ("--backend", dict(default="auto", choices=["auto", "gloo", "nccl"], help="auto: nccl if CUDA is available, else gloo")),
    ("--threads", dict(type=int, default=1, help="torch threads per process")),
    ("--record-every", dict(type=int, default=50, help="steps between recorded losses")),
    ("--compare", dict(action="store_true", help="rank 0 also runs the simulator and reports the largest difference")),
    ("--out", dict(type=Path, metavar="FILE", help="rank 0 writes a JSON summary to this file")),
    ("--save-params", dict(type=Path, metavar="FILE", help="rank 0 saves all workers' final parameters (K, P) here")),
    ("--timeout", dict(type=float, default=300.0, help="seconds a collective may wait")),
]


def _add_workers(sub: Any) -> None:
    p = sub.add_parser(
        "workers", help="train K workers as real torch.distributed processes (chapters 5-6)",
        formatter_class=_Formatter,
        description="Local SGD, D-SGD or mini-batch SGD with one process per worker on torch.distributed\n"
                    "(gloo on CPU, nccl on GPU), the same algorithms as the library's simulator.\n\n"
                    "By default it starts --nproc processes on this machine (127.0.0.1, a free port). Under\n"
                    "torchrun (RANK and WORLD_SIZE set) it is one worker of that launch:\n"
                    "  torchrun --standalone --nproc-per-node 4 -m gradiv_lib.workers --steps 60")
    p.add_argument("--nproc", type=_positive_int, default=4, help="processes to start (ignored under torchrun)")
    for flag, kwargs in WORKER_OPTIONS:
        p.add_argument(flag, **kwargs)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks: workers, federated, norms (from a clone of the repository)",
        formatter_class=_Formatter,
        description="Run a benchmark script of the repository's benchmarks/ folder, which prints side-by-side\n"
                    "ratios and writes its JSON result under ./gradiv-results/benchmarks (or --out DIR).\n"
                    "The scripts are not installed with the library: run this from a clone.\n\n"
                    "  workers    one simulated step of K workers: stacked simulator vs a loop over copies\n"
                    "  federated  federated rounds per second: stacked clients vs a loop over copies\n"
                    "  norms      per-sample gradient norms: gradiv vs BackPACK, Opacus, vmap and a loop\n\n"
                    "Options after the benchmark's name go to its script (see the script's docstring).")
    p.add_argument("benchmark", choices=["workers", "federated", "norms"], help="which benchmark")
    p.add_argument("--out", metavar="DIR", help="folder for the result (default: ./gradiv-results)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark script (e.g. --reps 10)")


def _add_regenerate(sub: Any) -> None:
    p = sub.add_parser(
        "regenerate", help="remake the results shipped with the book from their recorded commands",
        formatter_class=_Formatter,
        description="Rerun every result shipped in gradiv_lib/_results from the command recorded in the\n"
                    "registry (gradiv_lib/experiments/registry.py).\n\n"
                    "Without --check it writes the results in place: run it from a clean checkout, so that each\n"
                    "result names a commit that holds the code that made it, then commit the results.\n"
                    "With --check it writes to a temporary folder and compares the numbers with the shipped ones\n"
                    "within each result's tolerance; the exit status is 1 if any differs.")
    p.add_argument("--cheap", action="store_true", help="only the results marked cheap (about two minutes in all)")
    p.add_argument("--check", action="store_true", help="compare with the shipped results instead of replacing them")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these results (e.g. ch04/divebatch_digits)")
    p.add_argument("--list", action="store_true", help="list the shipped results and their commands, run nothing")
    p.add_argument("--keep", metavar="DIR", help="with --check: write the new results here instead of a temporary folder")


# ---- chapter 6: D-SGD vs SAM generalisation (gradiv dsgd-sam) ----

def _add_dsgd_sam(sub: Any) -> None:
    p = sub.add_parser(
        "dsgd-sam", help="D-SGD vs C-SGD vs SAM vs average-direction SAM at a large batch, each tuned (chapter 6)",
        formatter_class=_Formatter,
        description="Generalisation of C-SGD, D-SGD (ring and exponential graph, K workers), SAM and average-\n"
                    "direction SAM on MNIST-1D (an MLP) at one large total batch and one step budget (chapter 6).\n"
                    "Every method is tuned on its own grid (learning rate, and rho or sigma) by mean validation\n"
                    "accuracy over the seeds; grids grow one step past an edge that wins. The result has the tuned\n"
                    "settings, test accuracy with min/max over seeds, final train loss, top Hessian eigenvalue and\n"
                    "the range of rho / sigma / lr that beats tuned C-SGD.\n\n"
                    "Default (quick, seconds): a tiny run, one seed; the result is named dsgd_sam_mnist1d_quick.\n"
                    "--book: the run shipped with the book (three seeds; about 13 minutes on a shared 2-core CPU).")
    p.add_argument("--book", action="store_true", help="the book's settings (minutes on a CPU)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   choices=["csgd", "dsgd_ring", "dsgd_exponential", "sam", "adsam"],
                   help="subset of csgd, dsgd_ring, dsgd_exponential, sam, adsam (csgd is always needed)")
    p.add_argument("--steps", type=_positive_int, help="override the number of steps of every run")
    p.add_argument("--name", help="result name under ch06/ (default: dsgd_sam_mnist1d, plus _quick in quick mode)")
    p.add_argument("--verbose", action="store_true", help="print one line per training run")
    _run_options(p, device=False)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The ``gradiv`` parser (no heavy imports)."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Experiments, runners and benchmarks of the book 'Gradient Diversity' (gradiv_lib).")
    parser.add_argument("--version", action="store_true", help="print the library's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="SUB-COMMAND", title="sub-commands")
    _add_divebatch(sub)
    _add_width(sub)
    _add_plasticity(sub)
    _add_federated(sub)
    _add_workers(sub)
    _add_bench(sub)
    _add_regenerate(sub)
    _add_dsgd_sam(sub)
    return parser


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def _canonical(argv: Sequence[str]) -> str:
    """``gradiv ARGS`` without the options that do not change the result (--out, --no-progress)."""
    kept: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--out":
            skip = True
            continue
        if token.startswith("--out=") or token == "--no-progress":
            continue
        kept.append(token)
    return shlex.join([PROG, *kept])


def _set_threads(args: argparse.Namespace, *, big: bool, processes: int = 1) -> int:
    import torch

    if args.threads:
        threads = args.threads
    elif "GRADIV_THREADS" in os.environ:
        from .runtime import default_threads

        threads = default_threads()
    else:
        threads = max(1, min(8, (os.cpu_count() or 1) // processes)) if big else 1
    torch.set_num_threads(threads)
    return threads


def _resolve_device(name: str | None) -> Any:
    import torch

    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _out(args: argparse.Namespace) -> Path:
    from .results import OutputError, check_out

    try:
        return check_out(args.out)
    except OutputError as error:
        raise CLIError(str(error)) from None


def _summary(what: str, path: Path, seconds: float, lines: Sequence[str] = ()) -> None:
    print(f"\n{what}: done in {_duration(seconds)}; result written to {path}")
    for line in lines:
        print("  " + line)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _cmd_divebatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.full and args.root is None:
        parser.error("--full needs --root DIR (the folder that holds the data set; add --download to fetch it)")
    if args.full and args.dataset in ("digits", "mnist1d"):
        parser.error("--full runs on cifar10 or cifar100; add --dataset cifar10")
    if not args.full and args.dataset not in ("digits", "mnist1d"):
        parser.error(f"--dataset {args.dataset} is the full protocol: add --full and --root DIR")
    if args.full and args.book:
        parser.error("--book is the digits run; it does not combine with --full")
    out = _out(args)
    device = _resolve_device(args.device)
    mode = _parallel_mode(args.nproc)
    if mode == "spawn":
        return _spawn_command("divebatch", args, device)
    if mode == "torchrun":
        return _under_torchrun(lambda dev: _run_divebatch(args, out, dev), device)
    return _run_divebatch(args, out, device)


def _run_divebatch(args: argparse.Namespace, out: Path, device: Any) -> int:
    rank, world = _rank_and_world()
    _set_threads(args, big=args.full, processes=world)
    if args.full and device.type == "cpu" and rank == 0:
        print("warning: --full on a CPU: ResNet-18 on CIFAR takes days; use a GPU (--device cuda)", file=sys.stderr)
    from .experiments import divebatch

    start = time.perf_counter()
    with _rank_out(out, rank) as where:
        path, payload = divebatch.run(args.dataset, full=args.full, root=args.root, seeds=args.seeds,
                                      methods=args.methods, device=device, out=where, name=args.name,
                                      checkpoint_dir=args.checkpoint_dir, download=args.download,
                                      progress=not args.no_progress, epochs=args.epochs, delta=args.delta,
                                      resize_every=args.resize_every, lr_cap=args.lr_cap)
    if rank:
        return 0
    rows = [f"{k:>16}: " + ", ".join(f"{m} {v:.4g}" for m, v in row.items() if m in
                                      ("final_test_accuracy", "steps_to_target", "total_steps"))
            for k, row in payload["data"]["summary"].items()]
    on = f", {world} processes" if world > 1 else ""
    _summary(f"divebatch on {args.dataset} ({len(payload['config']['methods'])} methods x "
             f"{len(payload['config']['seeds'])} seeds, {payload['machine']['device']}{on})", path,
             time.perf_counter() - start, rows)
    return 0


# ---- several processes (data parallel) --------------------------------------------------------

def _parallel_mode(nproc: int) -> str:
    """``"process"`` (one process, or one of a group already started), ``"torchrun"`` (RANK/WORLD_SIZE set, the group
    not yet initialised) or ``"spawn"`` (``--nproc`` > 1: start the processes here)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return "process"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    return "spawn" if nproc > 1 else "process"


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _under_torchrun(run: Any, device: Any) -> int:
    """One process of a ``torchrun`` launch: join the group (nccl on CUDA, one GPU per process; gloo otherwise), run
    ``run(device)``, leave the group."""
    import datetime as dt

    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise CLIError(f"process LOCAL_RANK={local} has no GPU: this machine has {torch.cuda.device_count()}; "
                           "launch at most that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=dt.timedelta(minutes=30))
    try:
        return run(device)
    finally:
        dist.destroy_process_group()


def _spawn_command(command: str, args: argparse.Namespace, device: Any) -> int:
    """``--nproc K``: start K gloo processes on 127.0.0.1 that each run this command line."""
    if device.type != "cpu":
        raise CLIError(f"--nproc starts gloo processes on the CPU; for {device.type.upper()} devices launch one process "
                       f"per GPU with: torchrun --standalone --nproc-per-node {args.nproc} -m gradiv_lib {command} "
                       f"--device {device.type} ...")
    from .workers.distributed import spawn

    print(f"gradiv {command}: starting {args.nproc} data-parallel processes (gloo on 127.0.0.1) ...", flush=True)
    spawn(_spawned_main, args.nproc, args=(args._argv,), backend="gloo", threads=args.threads or 1, timeout=7 * 24 * 3600.0)
    return 0


def _spawned_main(rank: int, world: int, argv: Sequence[str]) -> None:
    """:func:`~gradiv_lib.workers.spawn` target: one process of ``--nproc`` (the group is initialised)."""
    status = main(list(argv))
    if status:
        raise RuntimeError(f"process {rank} of {world} ended with status {status}")


class _rank_out:
    """The folder a process writes its result into: ``out`` on process 0, a temporary folder (removed) elsewhere."""

    def __init__(self, out: Path, rank: int) -> None:
        self.out, self.rank, self._tmp = out, rank, None

    def __enter__(self) -> Path:
        if self.rank == 0:
            return self.out
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix=f"gradiv-rank{self.rank}-")
        return Path(self._tmp.name)

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


#: The quick mode of ``gradiv width`` (what it changes in the preset).
WIDTH_QUICK = {"seeds": [0], "bound_seeds": [0, 1, 2], "depths": [2, 6], "batch_sizes": [4, 64, 1024]}


def _cmd_width(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.full and args.dataset != "cifar10":
        parser.error("--full is the CIFAR-10 protocol; add --dataset cifar10 --root DIR")
    if args.dataset == "cifar10" and not args.full:
        parser.error("--dataset cifar10 is the full protocol: add --full and --root DIR")
    if args.full and args.root is None:
        parser.error("--full needs --root DIR (the folder that holds cifar-10-batches-py; add --download to fetch it)")
    if args.full and args.book:
        parser.error("--book is the CPU sweep of the book; it does not combine with --full")
    out = _out(args)
    device = _resolve_device(args.device)
    _set_threads(args, big=args.full)
    from .experiments import width

    quick = not (args.book or args.full)
    settings: dict[str, Any] = dict(WIDTH_QUICK) if quick else {}
    if args.seeds:
        settings["seeds"] = args.seeds
    for key in ("depths", "batch_sizes", "max_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.dataset == "cifar10" and args.download:
        from . import data as gdata

        gdata.load_cifar10(args.root, train=True, download=True)
    name = args.name or f"width_{args.dataset}" + ("_quick" if quick else "")
    start = time.perf_counter()
    path, payload = width.run(args.dataset, full=args.full, root=args.root, device=device, out=out, name=name,
                              checkpoint_dir=args.checkpoint_dir, progress=not args.no_progress, **settings)
    rows = [f"depth {d}: median B_S at init {row['median_bound']:.4g}, median fitted knee {row['median_b_noise']:.4g}"
            for d, row in payload["data"]["summary"].items()]
    _summary(f"width on {args.dataset} ({'book' if args.book else 'full' if args.full else 'quick'} mode)", path,
             time.perf_counter() - start, rows)
    return 0


def _cmd_plasticity(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.experiment == "mnist1d" and args.methods and "none" in args.methods:
        parser.error("mnist1d always runs the baseline none; --methods picks among the regularizers")
    out = _out(args)
    _set_threads(args, big=False)
    from .experiments import continual

    start = time.perf_counter()
    path, payload = continual.run(args.experiment, book=args.book, seeds=args.seeds, methods=args.methods,
                                  n_tasks=args.tasks, epochs_per_task=args.epochs_per_task, out=out,
                                  result_name=args.name, progress=not args.no_progress)
    rows = [f"{k:>22}: last task's accuracy {v['final_task_accuracy']:.3f} (mean over seeds)"
            for k, v in continual.summarize(payload).items()]
    cfg = payload["config"]
    seeds = cfg.get("seeds", cfg.get("eval_seeds", []))
    _summary(f"plasticity {args.experiment} ({'book' if args.book else 'quick'} mode, {cfg['n_tasks']} tasks, "
             f"{len(seeds)} seed(s))", path, time.perf_counter() - start, rows)
    return 0


def _cmd_federated(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.per_round > args.clients:
        parser.error(f"--per-round {args.per_round} is more than --clients {args.clients}")
    if args.sweep and args.flower:
        parser.error("--sweep runs the simulator; it cannot be combined with --flower")
    if args.edges and not args.sweep:
        parser.error("--edges belongs to --sweep: gradiv federated --sweep --edges")
    out = _out(args)
    _set_threads(args, big=False)
    rounds = args.rounds or (300 if args.full else 30)
    start = time.perf_counter()
    if args.flower:
        from .experiments import flower_check

        if args.clients > flower_check.MAX_CLIENTS:
            parser.error(f"--flower starts one SuperNode process per client: --clients {args.clients} is more than "
                         f"{flower_check.MAX_CLIENTS} (e.g. --clients 3 --per-round 2 --rounds 3)")
        from .federated.flower import require_flwr

        require_flwr()
        path, payload = flower_check.run(servers=args.servers, rounds=rounds, n_clients=args.clients,
                                         per_round=args.per_round, alpha=args.alpha, local_work=args.local_work,
                                         lr=args.lr, seeds=args.seeds, out=out, name=args.name,
                                         progress=not args.no_progress)
        rows = [f"{k:>10}: largest parameter difference to the simulator {v['max_abs_diff']:.1e}"
                for k, v in payload["data"]["summary"].items()]
        _summary(f"federated over Flower ({', '.join(payload['config']['servers'])}; {rounds} rounds, "
                 f"{args.clients} clients)", path,
                 time.perf_counter() - start, rows)
        return 0
    from .experiments import federated_runs

    if args.sweep and args.edges:
        path, payload = federated_runs.probe_edges(out=out, name=args.name, progress=not args.no_progress)
        rows = [f"{st:>24} {server:>9}: {e['config']}  mean final accuracy {sum(e['final']) / len(e['final']):.3f}"
                for st, by_server in payload["data"].items() for server, es in by_server.items() for e in es]
        _summary("federated sweep: edge probes", path, time.perf_counter() - start, rows)
        return 0
    if args.sweep:
        path, payload = federated_runs.sweep(book=args.full, servers=args.servers, rounds=args.rounds,
                                             tune_seeds=args.seeds, out=out, name=args.name,
                                             progress=not args.no_progress)
        rows = []
        for setting, by_server in payload["data"]["summary"].items():
            for server, row in by_server.items():
                rows.append(f"{setting:>24} {server:>9}: {row['config']}  final accuracy {row['final_mean']:.3f} "
                            f"[{row['final_min']:.3f}, {row['final_max']:.3f}] on fresh seeds")
        _summary(f"federated sweep ({'book' if args.full else 'quick'} mode)", path, time.perf_counter() - start, rows)
        return 0
    if args.servers is None:
        args.servers = ["fedavg", "fedaware"]
    path, payload = federated_runs.run(servers=args.servers, rounds=rounds, n_clients=args.clients,
                                       per_round=args.per_round, alpha=args.alpha, local_work=args.local_work,
                                       lr=args.lr, seeds=args.seeds, flower=args.flower, out=out, name=args.name,
                                       progress=not args.no_progress)
    rows = [f"{k:>10}: final test accuracy {v['final_test_accuracy']:.4f}" for k, v in payload["data"]["summary"].items()]
    _summary(f"federated ({', '.join(args.servers)}; {rounds} rounds, {args.clients} clients"
             f"{', over Flower' if args.flower else ''})", path, time.perf_counter() - start, rows)
    return 0


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv: list[str] = []
    for flag, kwargs in WORKER_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if kwargs.get("action") == "store_true":
            if value:
                argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _cmd_workers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    for key in ("steps", "batch_size", "local_steps", "width", "depth", "threads", "record_every",
                "shards_per_client"):
        if getattr(args, key) < (0 if key == "record_every" else 1):
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("out", "save_params"):
        path = getattr(args, key)
        if path is not None and path.is_dir():
            raise CLIError(f"--{key.replace('_', '-')} {path} is a folder; give a file name")
        if path is not None:
            from .results import OutputError, check_out

            try:
                check_out(path.parent if str(path.parent) else ".")
            except OutputError as error:
                raise CLIError(str(error).replace("--out", f"--{key.replace('_', '-')}")) from None
    argv = _worker_argv(args)
    from .workers import distributed

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:        # one process of a torchrun launch
        return distributed.main(argv)
    backend = args.backend
    if backend == "auto":
        backend = "gloo"
    if backend == "nccl":
        raise CLIError("--backend nccl needs one GPU per process: launch with torchrun --nproc-per-node K "
                       "-m gradiv_lib.workers --backend nccl")
    distributed.build_run(distributed.build_parser().parse_args(argv), args.nproc)   # fail early, in this process
    print(f"gradiv workers: starting {args.nproc} processes (gloo on 127.0.0.1) for {args.steps} steps ...", flush=True)
    start = time.perf_counter()
    distributed.spawn(distributed.spawn_cli, args.nproc, args=(argv,), backend=backend, threads=args.threads,
                      timeout=args.timeout + 120)
    where = f"; summary written to {args.out}" if args.out else " (no --out: summary not saved)"
    print(f"\ngradiv workers: {args.nproc} processes done in {_duration(time.perf_counter() - start)}{where}")
    return 0


def _clone_root() -> Path | None:
    from .results import repo_root

    root = repo_root()
    return root if root is not None and (root / "benchmarks").is_dir() else None


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    extra: list[str] = []
    tokens = iter(a for a in args.args if a != "--")
    for token in tokens:                      # --out after the benchmark's name is ours, not the script's
        if token == "--out":
            args.out = next(tokens, None)
            if args.out is None:
                parser.error("--out needs a folder")
        elif token.startswith("--out="):
            args.out = token[len("--out="):]
        else:
            extra.append(token)
    out = _out(args)
    root = _clone_root()
    script = None if root is None else root / "benchmarks" / f"bench_{args.benchmark}.py"
    if script is None or not script.is_file():
        raise CLIError(f"the {args.benchmark} benchmark is a script of the repository (benchmarks/bench_{args.benchmark}.py), "
                       "not installed with the library: clone https://github.com/gradiv/gradiv and run "
                       f"'gradiv bench {args.benchmark}' there")
    command = [sys.executable, str(script), *extra, "--out", str(out)]
    env = {**os.environ, "GRADIV_COMMAND": _canonical(["bench", args.benchmark, *extra]),
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"gradiv bench {args.benchmark}: running {shlex.join(command[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, env=env, cwd=root).returncode
    if code != 0:
        raise CLIError(f"the {args.benchmark} benchmark failed (exit status {code}; its output is above)")
    _summary(f"bench {args.benchmark}", out / "benchmarks", time.perf_counter() - start)
    return 0


def _cmd_regenerate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .experiments import regenerate

    return regenerate.main_from_args(args)


_COMMANDS = {"divebatch": _cmd_divebatch, "width": _cmd_width, "plasticity": _cmd_plasticity,
             "federated": _cmd_federated, "workers": _cmd_workers, "bench": _cmd_bench,
             "regenerate": _cmd_regenerate}


# ---- chapter 6: D-SGD vs SAM generalisation (gradiv dsgd-sam) ----

def _cmd_dsgd_sam(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.methods and "csgd" not in args.methods:
        parser.error("--methods must include csgd (the baseline the others are compared with)")
    out = _out(args)
    _set_threads(args, big=False)
    from .experiments import dsgd_sam

    start = time.perf_counter()
    path, payload = dsgd_sam.run("book" if args.book else "quick", seeds=args.seeds, methods=args.methods,
                                 steps=args.steps, out=out, name=args.name, progress=not args.no_progress,
                                 log=print if args.verbose else None)
    summary = payload["data"]["summary"]
    rows = []
    for method, t in summary["tuned"].items():
        key = f", {t['key_name']} {t['key']:g}" if t["key_name"] else ""
        acc = t["test_accuracy"]
        text = (f"test accuracy {acc['mean']:.3f} [{acc['min']:.3f}, {acc['max']:.3f}]" if acc else "diverged")
        rows.append(f"{method:>16}: lr {t['lr']:g}{key}; {text}")
    cfg = payload["config"]
    _summary(f"dsgd-sam ({'book' if args.book else 'quick'} mode, {len(cfg['methods'])} methods x "
             f"{len(cfg['seeds'])} seed(s), {len(payload['data']['runs'])} runs)", path, time.perf_counter() - start, rows)
    return 0


_COMMANDS["dsgd-sam"] = _cmd_dsgd_sam


def _friendly(error: BaseException) -> str:
    """One line for a foreseeable failure, in the command line's words."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.replace("call again with download=False", "run again without --download")
    match = re.match(r"(.+ not found: expected \S+)\.", text)
    if match:
        return f"{match.group(1)}. Pass --root DIR with the folder that holds it, or add --download to fetch it."
    if "needs root=" in text:
        return text.split(" needs root=")[0] + " needs --root DIR (the folder that holds the data set)"
    return text


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Run ``gradiv`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"gradiv_lib {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    sub = parser._subparsers._group_actions[0].choices[args.command]   # the sub-command's parser, for its usage
    from . import results

    results._command = _canonical(argv)
    args._argv = argv   # what --nproc's processes run
    try:
        return _COMMANDS[args.command](args, sub)
    except KeyboardInterrupt:
        print(f"\n{prog} {args.command}: interrupted (runs with checkpoints resume when the same command is run again)",
              file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError, ImportError, TimeoutError) as error:
        print(f"{prog} {args.command}: error: {_friendly(error)}", file=sys.stderr)
        return 1
    except Exception as error:   # a worker process's failure arrives wrapped
        if type(error).__name__ in ("ProcessRaisedException", "ProcessExitedException"):
            print(f"{prog} {args.command}: error: a worker process failed: {_friendly(error)}", file=sys.stderr)
            return 1
        raise
    finally:
        results._command = None


if __name__ == "__main__":
    raise SystemExit(main())
