"""The notebook set-up: seeds, threads, device, figure style."""
import matplotlib as mpl
import pytest
import torch

import gradiv_lib as gl


def test_setup_seeds_and_returns_device(monkeypatch):
    monkeypatch.delenv("GRADIV_DEVICE", raising=False)
    device = gl.setup(seed=3, threads=1)
    a = torch.rand(3)
    gl.setup(seed=3, threads=1)
    assert torch.equal(a, torch.rand(3))
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch.get_num_threads() == 1
    assert mpl.rcParams["axes.spines.top"] is False


def test_threads_from_environment(monkeypatch):
    monkeypatch.setenv("GRADIV_THREADS", "2")
    assert gl.runtime.default_threads() == 2
    monkeypatch.setenv("GRADIV_THREADS", "zero")
    with pytest.raises(ValueError, match="GRADIV_THREADS must be a positive integer, got 'zero'"):
        gl.runtime.default_threads()


def test_bad_seed_and_device():
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        gl.seed_everything(-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            gl.pick_device("cuda")


def test_method_colors_are_stable():
    assert gl.plotting.method_color("DiveBatch") == gl.plotting.METHOD_COLORS["divebatch"]
    assert gl.plotting.method_color("something new") == gl.plotting.method_color("something new")


def test_small_multiples_rejects_empty():
    with pytest.raises(ValueError, match="values must hold at least one"):
        gl.plotting.small_multiples([], lambda ax, v: None)


def test_explorer_needs_controls():
    with pytest.raises(ValueError, match="at least one control"):
        gl.widgets.explorer(lambda: None)


def test_one_thread_by_default(monkeypatch):
    monkeypatch.delenv("GRADIV_THREADS", raising=False)
    assert gl.runtime.default_threads() == 1


def test_glue_turns_numpy_and_torch_scalars_into_python_numbers(monkeypatch):
    import numpy as np
    import myst_nb

    seen = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=False: seen.__setitem__(name, value))
    gl.glue("a", np.float64(0.5))
    gl.glue("b", torch.tensor(3))
    gl.glue("c", "text")
    assert seen == {"a": 0.5, "b": 3, "c": "text"}
    assert type(seen["a"]) is float and type(seen["b"]) is int
