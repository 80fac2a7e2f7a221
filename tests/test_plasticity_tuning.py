"""Fair tuning of the plasticity regularizers (gradiv_lib.plasticity.tuning) and the exact raw penalty."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradiv_lib import models
from gradiv_lib import plasticity as pl


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    init = models.mlp(6, 8, 3, 3, seed=seed)
    moved = models.mlp(6, 8, 3, 3, seed=seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1.5).add_(0.1)
    return init, moved


def test_raw_is_the_penalty_without_lambda_and_exact() -> None:
    init, moved = _pair()
    l2i = pl.L2Init(0.3).bind(init)
    by_hand = sum(float((p - q).detach().square().sum()) for p, q in zip(moved.parameters(), init.parameters()))
    assert l2i.raw(moved) == pytest.approx(by_hand, rel=1e-6)
    assert float(l2i(moved)) == pytest.approx(0.3 * by_hand, rel=1e-5)
    assert pl.L2(2.0).bind(init).raw(moved) == pytest.approx(sum(float(p.square().sum()) for p in moved.parameters()), rel=1e-6)
    # spectral: exact sigma_max (SVD), not the one-step power-iteration estimate, and the state is untouched
    spec = pl.Spectral(1.0, k=2, warmup_steps=1).bind(init)
    u_before = [None if u is None else u.clone() for u in spec._u]
    exact = 0.0
    for name, p in moved.named_parameters():
        if p.dim() >= 2:
            exact += (float(torch.linalg.matrix_norm(p.double(), 2)) ** 2 - 1) ** 2
        else:
            exact += float(p.double().square().sum()) ** 2
    assert spec.raw(moved) == pytest.approx(exact, rel=1e-9)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(u_before, spec._u))


def test_strength_scale_puts_the_penalty_at_the_reference_loss() -> None:
    init, moved = _pair()
    for name in pl.tuning.PENALTIES:
        lam = pl.strength_scale(name, init, moved, reference_loss=2.0)
        reg = pl.make_regularizer(name, lam).bind(init)
        assert lam * reg.raw(moved) == pytest.approx(2.0, rel=1e-9), name
    # a penalty that is zero at the trained weights has no scale
    with pytest.raises(ValueError, match="positive finite"):
        pl.strength_scale("l2_init", init, init)
    with pytest.raises(ValueError, match="penalty"):
        pl.strength_scale("shrink_perturb", init, moved)


def test_log_grid_and_refinement() -> None:
    assert pl.log_grid(2.0, [-1, 0, 1]) == pytest.approx([0.2, 2.0, 20.0])
    # best at -2: its half-decade neighbours; one already on the grid is not repeated
    assert pl.refine_decades([-3, -2, -1], [0.1, 0.5, 0.2]) == [-2.5, -1.5]
    assert pl.refine_decades([-3, -2.5, -2, -1], [0.1, 0.3, 0.5, 0.2]) == [-1.5]
    with pytest.raises(ValueError, match="equal length"):
        pl.refine_decades([1, 2], [0.1])


def test_shrink_perturb_is_parametrised_by_its_step_toward_a_fresh_init() -> None:
    assert pl.method_params("shrink_perturb", 0.25) == {"shrink": 0.75, "noise": 0.25, "perturbation": "init"}
    assert pl.method_params("spectral", 1e-3, k=2) == {"strength": 1e-3, "k": 2}
    with pytest.raises(ValueError, match="strength"):
        pl.method_params("shrink_perturb", 1.5)
    with pytest.raises(ValueError, match="method"):
        pl.method_params("none", 1.0)
    # alpha = 1 is a full reset: the weights become a fresh initialisation draw
    net = models.mlp(6, 8, 3, 3, seed=0)
    sp = pl.make_regularizer("shrink_perturb", **pl.method_params("shrink_perturb", 1.0)).bind(net)
    g = torch.Generator().manual_seed(5)
    fresh = pl.fresh_init(net, torch.Generator().manual_seed(5))
    sp.apply(net, g)
    assert all(torch.allclose(p, q) for p, q in zip(net.parameters(), fresh))


def test_beating_range_interpolates_the_crossings() -> None:
    # scores over decades -4..0; baseline 0.5: above on (-3, -2, -1); crossings interpolated linearly in k
    k = [-4, -3, -2, -1, 0]
    s = [0.4, 0.6, 0.8, 0.7, 0.3]
    r = pl.beating_range(k, s, 0.5)
    assert r["lo"] == pytest.approx(-3.5)                # 0.4 -> 0.6 crosses 0.5 half way
    assert r["hi"] == pytest.approx(-0.5)                # 0.7 -> 0.3 crosses 0.5 half way too
    assert r["width"] == pytest.approx(r["hi"] - r["lo"]) and not r["open_low"] and not r["open_high"]
    # the range grows only from the best point: an isolated point above the baseline elsewhere does not count
    r2 = pl.beating_range(k, [0.6, 0.4, 0.8, 0.4, 0.3], 0.5)
    assert r2["lo"] == pytest.approx(-2.75) and r2["hi"] == pytest.approx(-1.25)   # 0.8 -> 0.4: 3/4 of the way
    # reaching the edge of the grid: open, and at least that wide
    r3 = pl.beating_range(k, [0.6, 0.7, 0.8, 0.7, 0.6], 0.5)
    assert r3["width"] == 4 and r3["open_low"] and r3["open_high"]
    # nothing beats the baseline: width 0; unsorted input is sorted first
    assert pl.beating_range(k, [0.1] * 5, 0.5)["width"] == 0.0
    assert pl.beating_range(k[::-1], s[::-1], 0.5) == r
    with pytest.raises(ValueError, match="distinct"):
        pl.beating_range([0, 0], [0.6, 0.7], 0.5)
    assert math.isclose(pl.beating_range([0.0], [0.9], 0.5)["width"], 0.0)


def test_the_tuned_experiment_picks_each_methods_best_and_evaluates_it_on_fresh_seeds(tmp_path) -> None:
    from gradiv_lib.experiments import continual

    _, payload = continual.run("mnist1d", methods=["spectral", "shrink_perturb"], n_tasks=2, epochs_per_task=1,
                               out=tmp_path, progress=False)
    cfg, data = payload["config"], payload["data"]
    assert set(data["eval"]) == {"none", "spectral", "shrink_perturb"}
    assert all(len(runs) == len(cfg["eval_seeds"]) for runs in data["eval"].values())
    assert not set(cfg["eval_seeds"]) & set(cfg["tune_seeds"])          # evaluation seeds were not tuned on
    for method, runs in data["sweep"].items():
        decades = sorted(float(k) for k in runs)
        assert set(cfg["coarse_decades"]) <= set(decades)
        scores = {k: sum(sum(h["online_accuracy"]) / len(h["online_accuracy"]) for h in hs) / len(hs)
                  for k, hs in runs.items()}
        best = max(scores, key=scores.get)
        assert data["best"][method]["decade"] == float(best)           # the best of the tuning seeds' mean score
        assert data["best"][method]["strength"] == pytest.approx(data["scales"][method] * 10 ** float(best))
        assert all(len(hs) == len(cfg["tune_seeds"]) for hs in runs.values())
        # every evaluation run used the chosen setting (its configuration is stored rounded to 5 decimals)
        reg = data["eval"][method][0]["regularizer"]
        if method == "spectral":
            assert reg["strength"] == pytest.approx(data["best"][method]["strength"], abs=1e-5) and reg["k"] == cfg["spectral_k"]
        else:   # alpha <= 1, a step toward a fresh initialisation
            assert max(decades) <= 0 and reg["perturbation"] == "init"
            assert reg["noise"] == pytest.approx(data["best"][method]["strength"], abs=1e-5)
            assert reg["shrink"] == pytest.approx(1 - data["best"][method]["strength"], abs=1e-5)
