"""Saving and loading the small JSON results of long runs."""
import json

import pytest

from gradiv_lib import results


def test_save_then_load_roundtrip(tmp_path):
    path = results.save("ch00/demo", {"x": [1, 2, 3]}, config={"seed": 0}, seconds=1.23456, root=tmp_path)
    assert path == tmp_path / "ch00" / "demo.json"
    loaded = results.load("ch00/demo", root=tmp_path)
    assert loaded["data"] == {"x": [1, 2, 3]}
    assert loaded["config"] == {"seed": 0}
    assert loaded["seconds"] == 1.235
    for key in ("date", "git_commit", "gradiv_lib", "machine"):
        assert key in loaded
    assert loaded["machine"]["torch"]
    assert not list(tmp_path.rglob("*.tmp")), "the temporary file must be renamed away"
    assert path.stat().st_mode & 0o777 == 0o644, "results ship as package data: readable by everyone"


def test_save_is_atomic_on_failure(tmp_path):
    results.save("a", {"ok": 1}, config={}, seconds=0, root=tmp_path)
    with pytest.raises(TypeError):
        results.save("a", {"bad": object()}, config={}, seconds=0, root=tmp_path)
    assert json.loads((tmp_path / "a.json").read_text())["data"] == {"ok": 1}   # the old result survives
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("name", ["", "../x", "a/../b", "x.json", "/abs"])
def test_bad_names(name, tmp_path):
    with pytest.raises(ValueError, match="name must be a relative path"):
        results.save(name, {}, config={}, seconds=0, root=tmp_path)


def test_missing_result_names_what_exists():
    with pytest.raises(FileNotFoundError, match="no result 'nope/never' shipped with gradiv_lib; available"):
        results.load("nope/never")


def test_save_checkpoint_is_atomic_and_loads_weights_only(tmp_path):
    import torch

    path = tmp_path / "run" / "ckpt.pt"
    results.save_checkpoint({"w": torch.ones(3), "epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    with pytest.raises(Exception):
        results.save_checkpoint({"bad": lambda: 0}, path)       # cannot be pickled: the old file survives
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert not list(path.parent.glob(".*.tmp"))
