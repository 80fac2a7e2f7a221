"""The ``gradiv`` command line: instant plain-text help, one-line errors, results under the current directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradiv_lib import cli, results

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["divebatch", "width", "plasticity", "federated", "workers", "bench", "regenerate"]


def _python(*args, cwd=None, env=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def light_package(tmp_path):
    """A copy of gradiv_lib whose ``__init__`` only sets the version: what the command line costs by itself."""
    package = tmp_path / "light" / "gradiv_lib"
    package.mkdir(parents=True)
    for item in (ROOT / "gradiv_lib").iterdir():
        if item.name not in ("__init__.py", "__pycache__"):
            (package / item.name).symlink_to(item)
    (package / "__init__.py").write_text('__version__ = "0"\n')
    return package.parent


HELP_PROBE = """
import sys, time
start = time.perf_counter()
from gradiv_lib.cli import main
for argv in [["--help"]] + [[sub, "--help"] for sub in {subs!r}]:
    try:
        main(argv)
    except SystemExit:
        pass
print("SECONDS", time.perf_counter() - start, file=sys.stderr)
print("TORCH", "torch" in sys.modules, file=sys.stderr)
"""


def _help_probe(pythonpath):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE.format(subs=SUBCOMMANDS)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(pythonpath)}, cwd=pythonpath)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stderr.splitlines() if line.startswith(("SECONDS", "TORCH")))
    return proc.stdout, float(lines["SECONDS"]), lines["TORCH"] == "True"


def test_help_of_every_subcommand_is_instant_and_does_not_import_torch(light_package):
    text, seconds, torch_loaded = _help_probe(light_package)
    assert not torch_loaded, "the command line must import torch only when a sub-command runs"
    assert seconds < 3.0, seconds            # about 0.05 s; the bound only guards against a heavy import
    for sub in SUBCOMMANDS:
        assert f"usage: gradiv {sub}" in text


def test_help_of_the_installed_package_is_instant():
    probe = _python("-c", "import sys, gradiv_lib; print('torch' in sys.modules)")
    if probe.stdout.strip() == "True":
        pytest.skip("gradiv_lib/__init__ imports torch eagerly (the light core makes this test run)")
    start = time.perf_counter()
    proc = _python("-m", "gradiv_lib", "--help")
    assert proc.returncode == 0 and time.perf_counter() - start < 3.0
    text, _, torch_loaded = _help_probe(ROOT)
    assert not torch_loaded


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_is_plain_text_without_loops(sub, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"] if sub is None else [sub, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":mod:", ":math:", ":class:", ".. ", "\\\\"):
        assert markup not in text, (sub, markup)
    assert "--help" not in text.replace("-h, --help", ""), "help must not send the reader to --help"


@pytest.mark.parametrize("argv, usage, message", [
    (["divebatch", "--epochs", "0"], "usage: gradiv divebatch", "--epochs: expected an integer >= 1, got 0"),
    (["divebatch", "--full"], "usage: gradiv divebatch", "--full needs --root DIR"),
    (["divebatch", "--dataset", "cifar10"], "usage: gradiv divebatch", "add --full and --root DIR"),
    (["divebatch", "--delta", "-1"], "usage: gradiv divebatch", "expected a number > 0, got -1.0"),
    (["width", "--batch-sizes", "0", "4"], "usage: gradiv width", "expected an integer >= 1, got 0"),
    (["width", "--full"], "usage: gradiv width", "--full is the CIFAR-10 protocol"),
    (["divebatch", "--methods", "lars"], "usage: gradiv divebatch", "invalid choice: 'lars'"),
    (["plasticity"], "usage: gradiv plasticity", "required: experiment"),
    (["federated", "--per-round", "200"], "usage: gradiv federated", "more than --clients 100"),
    (["federated", "--flower", "--clients", "20"], "usage: gradiv federated", "--clients 20 is more than 16"),
    (["workers", "--steps", "0"], "usage: gradiv workers", "--steps must be >= 1"),
    (["divebatch", "--device", "gpu"], "usage: gradiv divebatch", "unknown device 'gpu'"),
    (["nope"], "usage: gradiv", "invalid choice: 'nope'"),
])
def test_argument_errors_show_the_subcommands_usage(argv, usage, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert usage in err and message in err, err


def _fails_cleanly(capsys, argv, message):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and message in lines[0], err


def test_cuda_asked_for_but_absent(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails_cleanly(capsys, ["divebatch", "--device", "cuda", "--out", str(tmp_path)], "CUDA is not available")


def test_out_that_is_a_file_or_unwritable(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails_cleanly(capsys, ["divebatch", "--out", str(afile)], "is a file")
    _fails_cleanly(capsys, ["plasticity", "permuted", "--out", str(afile / "sub")], "is below the file")
    _fails_cleanly(capsys, ["workers", "--out", str(tmp_path)], "is a folder")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            _fails_cleanly(capsys, ["width", "--out", str(locked / "x")], "permission denied")
        finally:
            locked.chmod(0o700)


def test_missing_data_set_names_the_flags_that_fix_it(capsys, tmp_path):
    code = cli.main(["divebatch", "--full", "--dataset", "cifar10", "--root", str(tmp_path), "--device", "cpu",
                     "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "CIFAR-10 not found" in err and "--root DIR" in err and "--download" in err and "download=True" not in err


def test_download_without_network(capsys, tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    _fails_cleanly(capsys, ["divebatch", "--full", "--dataset", "cifar10", "--root", str(tmp_path), "--download",
                            "--device", "cpu", "--out", str(tmp_path), "--no-progress"], "could not download CIFAR-10")


def test_no_traceback_from_a_real_process(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = _python("-m", "gradiv_lib", "width", "--out", str(afile), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "is a file" in proc.stderr
    assert "RuntimeWarning" not in proc.stderr


def test_bench_outside_a_clone_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_clone_root", lambda: None)
    _fails_cleanly(capsys, ["bench", "norms", "--out", str(tmp_path)], "not installed with the library")


def _git_status():
    proc = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def test_a_run_without_out_writes_under_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status = _git_status()
    code = cli.main(["divebatch", "--epochs", "2", "--seeds", "0", "--methods", "sgd_small", "divebatch",
                     "--no-progress"])
    assert code == 0
    path = tmp_path / "gradiv-results" / "ch04" / "divebatch_digits.json"
    out = capsys.readouterr().out
    assert str(path) in out and "done in" in out             # the closing summary says where and how long
    payload = json.loads(path.read_text())
    assert payload["command"] == "gradiv divebatch --epochs 2 --seeds 0 --methods sgd_small divebatch"
    assert payload["producer"] == "gradiv_lib/experiments/divebatch.py"
    assert payload["config"]["epochs"] == 2 and payload["config"]["seeds"] == [0]
    for key in ("argv", "gradiv_lib", "git_commit", "git_dirty", "machine", "date", "seconds"):
        assert key in payload
    assert _git_status() == status, "a run must not touch the checkout"


def test_plasticity_and_federated_quick_paths(tmp_path, capsys):
    assert cli.main(["plasticity", "random_labels", "--tasks", "2", "--epochs-per-task", "2", "--methods", "none",
                     "spectral", "--out", str(tmp_path), "--no-progress"]) == 0
    payload = results.load("ch08/random_labels_quick", root=tmp_path)
    assert set(payload["data"]) == {"none", "spectral"} and payload["config"]["n_tasks"] == 2
    assert payload["producer"] == "gradiv_lib/experiments/continual.py"
    assert cli.main(["federated", "--rounds", "2", "--clients", "20", "--per-round", "5", "--servers", "fedavg",
                     "--out", str(tmp_path), "--no-progress"]) == 0
    payload = results.load("federated/digits_fedavg", root=tmp_path)
    assert payload["data"]["runs"]["fedavg"]["0"]["round"] == [1.0, 2.0]
    assert "plasticity random_labels" in capsys.readouterr().out


def test_plasticity_book_settings_are_the_library_experiments():
    from gradiv_lib import plasticity as pl
    from gradiv_lib.experiments import continual

    for name in continual.NAMES:
        assert continual.config_for(name, book=True) == pl.EXPERIMENTS[name]
        quick = continual.config_for(name)
        assert quick["n_tasks"] < pl.EXPERIMENTS[name]["n_tasks"] and len(quick["seeds"]) == 1


def test_workers_options_match_the_distributed_runner():
    from gradiv_lib.workers.distributed import build_parser

    runner = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    ours = dict(cli.WORKER_OPTIONS)
    assert set(runner) == set(ours)
    for flag, action in runner.items():
        assert action.default == ours[flag].get("default", False if ours[flag].get("action") else None), flag
        if action.choices:
            assert sorted(action.choices) == sorted(ours[flag]["choices"]), flag


def test_workers_argv_round_trips_to_the_runner():
    from gradiv_lib.workers.distributed import build_parser

    args = cli.build_parser().parse_args(["workers", "--nproc", "3", "--steps", "7", "--gossip", "--algorithm",
                                          "local_sgd", "--dtype", "float64"])
    runner = build_parser().parse_args(cli._worker_argv(args))
    assert (runner.steps, runner.gossip, runner.algorithm, runner.dtype) == (7, True, "local_sgd", "float64")


def test_aliases_reach_the_same_parser(capsys):
    proc = _python("-m", "gradiv_lib.workers", "--help", timeout=60)
    assert proc.returncode == 0 and "RuntimeWarning" not in proc.stderr, proc.stderr
    assert "usage: python -m gradiv_lib.workers" in proc.stdout and "--nproc" in proc.stdout
    from gradiv_lib.experiments import __main__ as experiments_main

    assert experiments_main.main is cli.main
