"""Chapter 7's tuning sweep (gradiv federated --sweep): the stacked grid runner is run_federated for every
configuration, a diverging configuration is marked instead of stopping the grid, the grids hold the official
settings, and the summary's selection and sensitivity follow their definitions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradiv_lib import federated as fed
from gradiv_lib import results
from gradiv_lib.experiments import federated_runs as fr


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("server,configs", [
    ("fedprox", [{"lr": 1.0, "mu": 0.1}, {"lr": 4.0, "mu": 1.0}]),
    ("fedaware", [{"lr": 1.0, "alpha": 0.3}, {"lr": 2.0, "alpha": 0.9}]),
    ("fedyogi", [{"lr": 0.01, "tau": 1e-4}, {"lr": 0.1, "tau": 1e-2}]),
])
def test_run_grid_is_run_federated_for_every_configuration(server, configs):
    federation, test = fr.make_federation("digits/shards/hetero", 0)
    recs = fr.run_grid(federation, server, configs, 4, per_round=5, test=test, seed=0, eval_every=2)
    for cfg, rec in zip(configs, recs):
        h = fed.run_federated(federation, server, 4, per_round=5, test=test, seed=0, eval_every=2,
                              server_kwargs={**fr.FIXED.get(server, {}), **cfg})
        assert rec["round"] == [2, 4] and rec["diverged"] is None
        np.testing.assert_allclose(rec["test_accuracy"], h["test_accuracy"], atol=2e-6)
        np.testing.assert_allclose(rec["test_loss"], h["test_loss"], rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(rec["direction_norm"], h["direction_norm"], rtol=1e-4, atol=2e-6)
    # the configurations really differ (a runner that gave every configuration the first one's numbers fails)
    assert recs[0]["test_loss"] != recs[1]["test_loss"]


def test_run_grid_marks_a_diverging_configuration_and_keeps_the_others():
    federation, test = fr.make_federation("digits/dirichlet/equal", 0)
    recs = fr.run_grid(federation, "fedavg", [{"lr": 1.0}, {"lr": 1e30}], 3, per_round=5, test=test, seed=0,
                       eval_every=1)
    assert recs[0]["diverged"] is None and all(a is not None for a in recs[0]["test_accuracy"])
    assert recs[1]["diverged"] is not None and recs[1]["test_accuracy"][-1] is None


def test_grids_hold_the_official_settings_and_have_equal_budgets():
    assert {len(fr.grid_configs(s)) for s in fr.GRIDS} == {12}
    for server, official in fr.OFFICIAL.items():
        assert any(all(c.get(k) == v for k, v in official.items()) for c in fr.grid_configs(server)), server
    assert fr.FIXED["fedyogi"]["v0"] == 0.0 and 1e-4 in fr.GRIDS["fedyogi"]["tau"]
    assert len(fr.SETTINGS) == 8


def test_sweep_validates_and_summarises(tmp_path):
    with pytest.raises(ValueError, match="servers"):
        fr.sweep(servers=["fedadam"], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="eval_seeds"):
        fr.sweep(tune_seeds=[1], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="setting"):
        fr.make_federation("digits/iid/equal", 0)
    path, payload = fr.sweep(servers=["fedavg", "fedaware"], rounds=5, out=tmp_path, progress=False)
    assert path == tmp_path / "ch07" / "sweep_quick.json" and payload == results.load("ch07/sweep_quick", root=tmp_path)
    data = payload["data"]
    setting = "digits/shards/hetero"
    grid = data["grid"][setting]
    # the best configuration is the grid's arg-max of the mean final accuracy over the tuning seeds
    for server in ("fedavg", "fedaware"):
        means = [np.mean(e["final"]) for e in grid[server]]
        assert data["best"][setting][server]["config"] == grid[server][int(np.argmax(means))]["config"]
    # sensitivity: share of the grid within 0.01 of tuned FedAvg, and FedAvg's own best counts
    ref = max(np.mean(e["final"]) for e in grid["fedavg"])
    row = data["summary"][setting]["fedaware"]
    assert row["match_share"] == pytest.approx(np.mean([np.mean(e["final"]) >= ref - 0.01 for e in grid["fedaware"]]))
    assert data["summary"][setting]["fedavg"]["match_share"] >= 1 / 12
    summary = fr.summarize_sweep(payload, tolerance=1.0)        # everything is within 1.0 of tuned FedAvg
    assert summary[setting]["fedaware"]["match_share"] == 1.0
    assert summary[setting]["fedavg"]["match_lr"] == [min(fr.GRIDS["fedavg"]["lr"]), max(fr.GRIDS["fedavg"]["lr"])]


def test_cli_sweep_quick_path_and_flower_refused(tmp_path, capsys):
    from gradiv_lib import cli

    assert cli.main(["federated", "--sweep", "--rounds", "2", "--servers", "fedavg", "--out", str(tmp_path),
                     "--no-progress"]) == 0
    payload = results.load("ch07/sweep_quick", root=tmp_path)
    assert payload["command"] == "gradiv federated --sweep --rounds 2 --servers fedavg"
    assert payload["config"]["rounds"] == 2 and list(payload["data"]["grid"]["digits/shards/hetero"]) == ["fedavg"]
    assert "final accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["federated", "--sweep", "--flower", "--out", str(tmp_path)])
    assert "--sweep runs the simulator" in capsys.readouterr().err


def test_edge_probes_lie_outside_the_grids(monkeypatch, tmp_path):
    for server, configs in fr.EDGE_PROBES.items():
        grid = fr.GRIDS[server]
        for c in configs:
            assert any(c[k] not in grid[k] for k in c), (server, c)      # each probe is beyond the grid
    monkeypatch.setitem(fr.SWEEP_BOOK, "rounds", 2)
    monkeypatch.setitem(fr.SWEEP_BOOK, "tune_seeds", [0])
    path, payload = fr.probe_edges(out=tmp_path, progress=False)
    assert path == tmp_path / "ch07" / "sweep_edges.json"
    assert set(payload["data"]) == set(fr.EDGE_SETTINGS)
    assert all(len(e["final"]) == 1 for by in payload["data"].values() for es in by.values() for e in es)
