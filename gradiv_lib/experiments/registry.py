"""Every result shipped in ``gradiv_lib/_results``: the command that makes it, the module that produces it, whether
it is cheap enough for CI, and the tolerance of a comparison between a rerun and the shipped file.

``gradiv regenerate`` (:mod:`gradiv_lib.experiments.regenerate`) reruns these commands; ``tests/test_results.py``
refuses a shipped result that is missing here, whose recorded command differs from the one here, or whose
provenance is incomplete. Cheap entries (together about two minutes on two cores) are what CI reruns and compares
(``gradiv regenerate --cheap --check``): each chapter with shipped results has at least one, the quick mode of the
same command when the book's own run takes minutes.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

__all__ = ["SHIPPED", "Shipped", "by_name"]

#: Keys never compared: wall-clock times and what depends on the machine's load.
TIMING_KEYS = ("seconds", "seconds_to_target", "time", "load_average")


@dataclass(frozen=True)
class Shipped:
    """One shipped result.

    ``compare`` is ``"numbers"`` (configuration identical, structure equal, strings equal, every number within
    ``atol + rtol * |shipped|``)
    or ``"structure"`` (benchmarks: timings differ run to run, so only the keys, lengths and non-timing strings are
    compared). Keys named in ``ignore`` (or :data:`TIMING_KEYS`) are skipped wherever they occur.
    """

    name: str
    command: str
    producer: str
    cheap: bool = False
    compare: str = "numbers"
    rtol: float = 2e-2
    atol: float = 5e-3
    ignore: tuple[str, ...] = field(default_factory=tuple)
    minutes: float = 1.0          #: rough duration on two cores, for planning

    # The default tolerance: on the machine and thread count that made a result the rerun is identical to the last
    # bit. Another CPU runs other kernels (other summation orders) and drifts over a training run: by about 1 % in
    # late losses and one test sample (0.0028 on digits) in an accuracy, as a run with two threads instead of one
    # shows, and by far more where a run is chaotic (DiveBatch with linear learning-rate scaling on digits: its
    # batch-size bound and accuracy of one seed moved by 3x and 0.03 between a processor with AVX-512 and one
    # without). So the reruns pin the x86 kernels to AVX2 (``regenerate.pinned_numerics``), meant to give those
    # machines the same bits. A change of the library that alters a result moves batch sizes, losses and accuracies
    # by more than the tolerance.

    @property
    def args(self) -> list[str]:
        """The command's arguments after ``gradiv``."""
        words = shlex.split(self.command)
        assert words[0] == "gradiv", self.command
        return words[1:]


SHIPPED: tuple[Shipped, ...] = (
    # chapter 3: the ReLU width sweep (minutes) and its quick mode (the cheap companion)
    Shipped("ch03/width_digits", "gradiv width --dataset digits --book", "gradiv_lib/experiments/width.py",
            minutes=5),
    Shipped("ch03/width_digits_quick", "gradiv width --dataset digits", "gradiv_lib/experiments/width.py",
            cheap=True, minutes=0.5),
    # chapter 3: ReLU MLPs on MNIST-1D (harder than digits): knee, B_S at init and along training (about 10 minutes)
    Shipped("ch03/width_mnist1d", "gradiv width --dataset mnist1d --book", "gradiv_lib/experiments/width.py",
            minutes=10),
    # chapter 4: the digits comparison is its own quick mode
    Shipped("ch04/divebatch_digits", "gradiv divebatch", "gradiv_lib/experiments/divebatch.py", cheap=True,
            ignore=("train_loss", "test_loss", "eval_test_loss", "eval_seconds", "seconds_to_target_min",
                    "seconds_to_target_max"),
            minutes=0.3),   # late losses of large-batch SGD drift most; unplotted. eval_seconds: wall-clock
    # the tuned MNIST-1D comparison (each method's own learning rate, three seeds; minutes, not cheap)
    Shipped("ch04/divebatch_mnist1d", "gradiv divebatch --dataset mnist1d", "gradiv_lib/experiments/divebatch.py",
            ignore=("train_loss", "test_loss", "eval_test_loss", "eval_seconds", "seconds_to_target_min",
                    "seconds_to_target_max"), minutes=15),
    # chapter 7: the fair federated comparison (every server tuned on its own grid; minutes) and its quick mode
    Shipped("ch07/sweep", "gradiv federated --sweep --full", "gradiv_lib/experiments/federated_runs.py", minutes=25),
    Shipped("ch07/sweep_edges", "gradiv federated --sweep --edges", "gradiv_lib/experiments/federated_runs.py",
            minutes=2),
    Shipped("ch07/sweep_quick", "gradiv federated --sweep", "gradiv_lib/experiments/federated_runs.py", cheap=True,
            minutes=0.3),
    # chapter 8: the tuned comparison and sensitivity on MNIST-1D (sections 8.2, 8.3; minutes) and its quick mode
    Shipped("ch08/mnist1d", "gradiv plasticity mnist1d --book", "gradiv_lib/experiments/continual.py", minutes=25),
    Shipped("ch08/mnist1d_quick", "gradiv plasticity mnist1d", "gradiv_lib/experiments/continual.py", cheap=True,
            minutes=0.3),
    # chapter 7.4: the simulator against a real Flower deployment (a SuperLink and three SuperNodes on 127.0.0.1)
    Shipped("federated/flower_check",
            "gradiv federated --flower --servers fedaware --clients 3 --per-round 2 --rounds 3 --seeds 1",
            "gradiv_lib/experiments/flower_check.py", minutes=1.5),
    # benchmarks (chapters 2, 6 and 7): timings, compared by structure only
    Shipped("benchmarks/workers_cpu", "gradiv bench workers", "benchmarks/bench_workers.py", compare="structure",
            ignore=("backend_chosen", "gate_max_abs_diff"), minutes=1),
    Shipped("benchmarks/federated_cpu", "gradiv bench federated", "benchmarks/bench_federated.py",
            compare="structure", minutes=0.3),
    Shipped("benchmarks/norms_cpu", "gradiv bench norms", "benchmarks/bench_norms.py", compare="structure", minutes=10),
    # chapter 6: D-SGD vs C-SGD vs SAM vs average-direction SAM on MNIST-1D, each tuned (minutes), and its quick mode
    Shipped("ch06/dsgd_sam_mnist1d", "gradiv dsgd-sam --book", "gradiv_lib/experiments/dsgd_sam.py",
            minutes=13),
    Shipped("ch06/dsgd_sam_mnist1d_quick", "gradiv dsgd-sam", "gradiv_lib/experiments/dsgd_sam.py", cheap=True,
            minutes=0.2),
)


def by_name(name: str) -> Shipped:
    """The registry entry of a shipped result."""
    for entry in SHIPPED:
        if entry.name == name:
            return entry
    raise KeyError(f"{name!r} is not in the registry of shipped results ({', '.join(e.name for e in SHIPPED)})")
