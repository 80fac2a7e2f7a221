"""Long runs behind the book, from the command line: ``python -m gradiv_lib.experiments NAME``.

* ``divebatch`` (chapter 4, :mod:`gradiv_lib.experiments.divebatch`): DiveBatch vs SGD small/large
  batch vs AdaBatch. Default: the quick digits run (seconds on a CPU); ``--full --dataset cifar10
  --root PATH``: the DiveBatch paper's ResNet-18 protocol (a GPU, hours).
* ``width`` (chapter 3, :mod:`gradiv_lib.experiments.width`): gradient diversity and the large-batch
  knee across a fixed-parameter-budget family of depths and widths. Default: deep linear networks
  on a synthetic teacher (seconds); ``--dataset digits``: ReLU MLPs (minutes on a CPU);
  ``--full --dataset cifar10 --root PATH``: ReLU MLPs on CIFAR-10 (a GPU).

Each writes a small JSON (config, versions, device, seconds, results) with
:func:`gradiv_lib.results.save` and prints its path; the book's pages load it with
:func:`gradiv_lib.results.load` and say that they do. Full runs checkpoint every epoch and resume
when the same command is run again.
"""
from . import divebatch, width

#: Experiment name → module with a ``run(...)`` function.
EXPERIMENTS = {"divebatch": divebatch, "width": width}

__all__ = ["EXPERIMENTS", "divebatch", "width"]
