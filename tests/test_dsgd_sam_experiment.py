"""``gradiv dsgd-sam`` (chapter 6): configuration checks, the fairness of the comparison (same batches, SAM at
rho = 0 is C-SGD), tuning by validation accuracy, grid extension past a winning edge, the sensitivity range, and a
tiny run end to end."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradiv_lib import cli, results
from gradiv_lib.experiments import dsgd_sam, registry

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**changes):
    config = copy.deepcopy(dsgd_sam.CONFIGS["quick"])
    config.update(num_samples=400, val_size=80, width=16, n_workers=4, local_batch=8, steps=12, sharpness_samples=64,
                  sharpness_iters=3)
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def tiny_data():
    return dsgd_sam.load_data(dsgd_sam.check_config(tiny_config()))


@pytest.mark.parametrize("key, value, words", [
    ("steps", 0, "steps must be an integer >= 1, got 0"),
    ("local_batch", 2.5, "local_batch must be an integer >= 1, got 2.5"),
    ("num_samples", 455, "num_samples must be a multiple of 10"),
    ("val_size", 300, "val_size=300 leaves 20 training samples"),
    ("seeds", [0, 0], "seeds must be a non-empty list of distinct integers"),
    ("methods", ["sam"], "methods must include 'csgd'"),
    ("methods", ["csgd", "adam"], "methods must be a non-empty list of distinct names"),
])
def test_bad_settings_are_refused_by_name(key, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
        dsgd_sam.check_config(tiny_config(**{key: value}))


def test_bad_grids_are_refused_by_name():
    grids = copy.deepcopy(tiny_config()["grids"])
    grids["sam"] = {"lr": [0.1], "sigma": [0.1]}
    with pytest.raises(ValueError, match=r"grids\['sam'\] must have exactly the keys \['lr', 'rho'\]"):
        dsgd_sam.check_config(tiny_config(grids=grids))
    grids = copy.deepcopy(tiny_config()["grids"])
    grids["adsam"]["sigma"] = [0.01, -0.02]
    with pytest.raises(ValueError, match=r"grids\['adsam'\]\['sigma'\] must be a non-empty list of finite numbers > 0"):
        dsgd_sam.check_config(tiny_config(grids=grids))
    with pytest.raises(ValueError, match="unknown settings"):
        dsgd_sam.run("quick", out="/nonexistent", colour="red")
    with pytest.raises(ValueError, match="mode must be one of"):
        dsgd_sam.run("huge")


def test_book_and_quick_configs_are_valid_and_registered():
    for mode in dsgd_sam.CONFIGS:
        dsgd_sam.check_config(copy.deepcopy(dsgd_sam.CONFIGS[mode]))
    assert registry.by_name("ch06/dsgd_sam_mnist1d").command == "gradiv dsgd-sam --book"
    assert registry.by_name("ch06/dsgd_sam_mnist1d_quick").cheap
    book = dsgd_sam.CONFIGS["book"]
    assert book["n_workers"] * book["local_batch"] == 512 and len(book["seeds"]) >= 3


def test_sam_at_rho_zero_and_adsam_at_sigma_zero_are_csgd(tiny_data):
    """The single-model methods see exactly C-SGD's batches and initialisation: with no perturbation they are C-SGD."""
    config = dsgd_sam.check_config(tiny_config())
    base = dsgd_sam.run_one("csgd", 0.3, None, 1, tiny_data, config)
    for method in ("sam", "adsam"):
        other = dsgd_sam.run_one(method, 0.3, 0.0, 1, tiny_data, config)
        assert other["train_loss"] == pytest.approx(base["train_loss"], rel=1e-4, abs=1e-6)
        assert other["test_accuracy"] == base["test_accuracy"] and other["val_accuracy"] == base["val_accuracy"]
    # ...and a real perturbation changes the run (a runner that ignored rho would pass the lines above)
    sam = dsgd_sam.run_one("sam", 0.3, 0.5, 1, tiny_data, config)
    assert abs(sam["train_loss"] - base["train_loss"]) > 1e-4


def test_dsgd_has_consensus_distance_and_csgd_none(tiny_data):
    config = dsgd_sam.check_config(tiny_config())
    ring = dsgd_sam.run_one("dsgd_ring", 0.5, None, 0, tiny_data, config)
    csgd = dsgd_sam.run_one("csgd", 0.5, None, 0, tiny_data, config)
    assert ring["consensus"] > 0 and csgd["consensus"] is None
    assert ring["train_loss"] != csgd["train_loss"]
    assert math.isfinite(ring["lambda_max"]) and not ring["diverged"]


def test_a_diverging_run_is_reported_not_raised(tiny_data):
    config = dsgd_sam.check_config(tiny_config())
    row = dsgd_sam.run_one("csgd", 1e6, None, 0, tiny_data, config)
    assert row["diverged"] and math.isnan(row["test_accuracy"])


def fake_row(method, lr, key, seed, val, test):
    return {"method": method, "lr": lr, "key": key, "seed": seed, "diverged": False, "val_accuracy": val,
            "test_accuracy": test}


def test_tuning_uses_validation_not_test_accuracy():
    rows = [fake_row("csgd", 0.1, None, s, 0.6, 0.9) for s in (0, 1)] + \
           [fake_row("csgd", 0.2, None, s, 0.7, 0.5) for s in (0, 1)]
    assert dsgd_sam._best(rows, "csgd") == (0.2, None)
    # a diverged run counts as accuracy 0: it cannot win on a lucky other seed
    rows += [fake_row("csgd", 0.4, None, 0, 0.99, 0.99), dict(fake_row("csgd", 0.4, None, 1, math.nan, math.nan),
                                                              diverged=True)]
    assert dsgd_sam._best(rows, "csgd") == (0.2, None)


def test_grid_grows_past_a_winning_edge(monkeypatch, tiny_data):
    """Validation accuracy peaks at lr 0.8 and rho 0.1: the grid starting at lr {0.1, 0.2} must grow to 0.4 and
    0.8 (two extensions), the rho grid stays (0.1 is inside); with no extensions allowed it stays put."""
    def fake_run_one(method, lr, key, seed, data, config):
        val = 1 - abs(math.log2(lr / 0.8)) / 10 - (abs(math.log2(key / 0.1)) / 10 if key else 0)
        return dict(fake_row(method, lr, key, seed, val, val), train_loss=0.0, lambda_max=1.0, consensus=None,
                    test_loss=0.0, train_accuracy=1.0)

    monkeypatch.setattr(dsgd_sam, "run_one", fake_run_one)
    grids = {"csgd": {"lr": [0.1, 0.2]}, "sam": {"lr": [0.1, 0.2], "rho": [0.05, 0.1, 0.2]}}
    config = tiny_config(methods=["csgd", "sam"], grids=grids, max_extensions=2, seeds=[0, 1])
    out = dsgd_sam.sweep(config, tiny_data)
    assert out["grids"]["csgd"]["lr"] == [0.1, 0.2, 0.4, 0.8]
    assert out["grids"]["sam"]["lr"] == [0.1, 0.2, 0.4, 0.8] and out["grids"]["sam"]["rho"] == [0.05, 0.1, 0.2]
    assert out["extensions"] == {"csgd": 2, "sam": 2}
    assert len([r for r in out["runs"] if r["method"] == "sam"]) == 4 * 3 * 2     # every point, every seed, once
    summary = dsgd_sam.summarize(out, ["csgd", "sam"])
    assert summary["tuned"]["sam"]["lr"] == 0.8 and summary["tuned"]["sam"]["key"] == 0.1
    assert summary["tuned"]["csgd"]["at_edge"]          # 0.8 is still the top edge after two extensions
    config["max_extensions"] = 0
    assert dsgd_sam.sweep(config, tiny_data)["grids"]["csgd"]["lr"] == [0.1, 0.2]


def test_sensitivity_is_the_contiguous_range_around_the_tuned_value_that_beats_the_baseline():
    assert dsgd_sam._contiguous_range([0.01, 0.02, 0.04, 0.08, 0.16], [True, False, True, True, False], 0.04) == \
        {"lo": 0.04, "hi": 0.08, "ratio": 2.0, "points": 2, "touches_edge": False}
    assert dsgd_sam._contiguous_range([0.01, 0.02], [False, True], 0.01)["points"] == 0
    rows = [fake_row("sam", 0.4, rho, 0, 0.7, test) for rho, test in
            ((0.025, 0.60), (0.05, 0.66), (0.1, 0.67), (0.2, 0.64))] + [fake_row("sam", 0.2, 0.1, 0, 0.6, 0.62)]
    grids = {"sam": {"lr": [0.2, 0.4], "rho": [0.025, 0.05, 0.1, 0.2]}}
    out = dsgd_sam.sensitivity(rows, grids, {"sam": {"lr": 0.4, "key": 0.1}}, baseline=0.65)
    assert out["sam"]["rho"]["lo"] == 0.05 and out["sam"]["rho"]["hi"] == 0.1 and out["sam"]["rho"]["ratio"] == 2.0
    assert out["sam"]["lr"]["points"] == 1 and out["sam"]["lr"]["lo"] == 0.4


def test_tiny_run_end_to_end_through_the_command_line(tmp_path, capsys):
    assert cli.main(["dsgd-sam", "--out", str(tmp_path), "--no-progress", "--steps", "6", "--methods", "csgd",
                     "dsgd_ring", "sam", "--name", "tiny"]) == 0
    assert "dsgd-sam (quick mode" in capsys.readouterr().out
    payload = results.load("ch06/tiny", root=tmp_path)
    assert payload["config"]["steps"] == 6 and payload["config"]["methods"] == ["csgd", "dsgd_ring", "sam"]
    summary = payload["data"]["summary"]
    assert set(summary["tuned"]) == {"csgd", "dsgd_ring", "sam"} and set(summary["sensitivity"]) == {"dsgd_ring", "sam"}
    assert summary["baseline_test_accuracy"] == summary["tuned"]["csgd"]["test_accuracy"]["mean"]
    assert len(payload["data"]["runs"]) == 2 + 1 + 2


def test_cli_refuses_methods_without_the_baseline(capsys):
    with pytest.raises(SystemExit):
        cli.main(["dsgd-sam", "--methods", "sam", "adsam"])
    assert "--methods must include csgd" in capsys.readouterr().err



def test_help_is_instant_plain_text_and_does_not_import_torch(tmp_path):
    """As for every sub-command (tests/test_cli.py): a light copy of the package whose __init__ imports nothing."""
    root = Path(__file__).resolve().parents[1]
    package = tmp_path / "light" / "gradiv_lib"
    package.mkdir(parents=True)
    for item in (root / "gradiv_lib").iterdir():
        if item.name not in ("__init__.py", "__pycache__"):
            (package / item.name).symlink_to(item)
    (package / "__init__.py").write_text('__version__ = "0"\n')
    probe = ("import sys\nfrom gradiv_lib.cli import main\ntry:\n    main(['dsgd-sam', '--help'])\nexcept SystemExit:\n"
             "    pass\nprint('TORCH', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(package.parent)}, cwd=package.parent)
    assert proc.returncode == 0, proc.stderr
    assert "usage: gradiv dsgd-sam" in proc.stdout and "TORCH False" in proc.stdout
    for markup in ("``", ":func:", ":class:", ":math:"):
        assert markup not in proc.stdout
