"""The set-up helpers (seeds, threads, device, style, glue) and the light top-level package."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradiv_lib as gl


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_setup_seeds_and_returns_device(monkeypatch, capsys):
    monkeypatch.delenv("GRADIV_DEVICE", raising=False)
    device = gl.setup(seed=3)
    a = torch.rand(3)
    gl.setup(seed=3)
    assert torch.equal(a, torch.rand(3))
    gl.setup(seed=4)
    assert not torch.equal(a, torch.rand(3))
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "seed 4" in capsys.readouterr().out


def test_setup_changes_threads_and_style_only_when_asked(monkeypatch, capsys, restore_threads):
    import matplotlib as mpl

    monkeypatch.delenv("GRADIV_THREADS", raising=False)
    mpl.rcdefaults()
    torch.set_num_threads(2)
    gl.setup(seed=0)
    assert torch.get_num_threads() == 2
    assert mpl.rcParams["axes.spines.top"] is True           # matplotlib's default, untouched
    assert "threads" not in capsys.readouterr().out
    gl.setup(seed=0, threads=1)
    assert torch.get_num_threads() == 1
    assert "torch threads 1" in capsys.readouterr().out
    monkeypatch.setenv("GRADIV_THREADS", "2")
    gl.setup(seed=0, style=True)
    assert torch.get_num_threads() == 2
    assert mpl.rcParams["axes.spines.top"] is False
    out = capsys.readouterr().out
    assert "torch threads 2 (from GRADIV_THREADS)" in out and "figure style" in out
    mpl.rcdefaults()
    gl.setup(seed=0, verbose=False)
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        gl.setup(threads=0)


def test_setup_book_uses_one_thread_and_the_style(monkeypatch, restore_threads):
    import matplotlib as mpl

    monkeypatch.delenv("GRADIV_THREADS", raising=False)
    torch.set_num_threads(2)
    gl.setup_book(seed=0, verbose=False)
    assert torch.get_num_threads() == 1
    assert mpl.rcParams["axes.spines.top"] is False
    assert mpl.rcParams["axes.prop_cycle"].by_key()["color"][0].lower() == gl.plotting.PALETTE[0].lower()
    mpl.rcdefaults()


def test_style_file_usable_as_a_context():
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    mpl.rcdefaults()
    with plt.style.context(gl.plotting.STYLE):
        assert mpl.rcParams["legend.frameon"] is False
        assert [c.lower() for c in mpl.rcParams["axes.prop_cycle"].by_key()["color"]] == [
            c.lower() for c in gl.plotting.PALETTE]
    assert mpl.rcParams["legend.frameon"] is True


def test_threads_from_environment(monkeypatch):
    monkeypatch.setenv("GRADIV_THREADS", "2")
    assert gl.runtime.default_threads() == 2
    monkeypatch.setenv("GRADIV_THREADS", "zero")
    with pytest.raises(ValueError, match="GRADIV_THREADS must be a positive integer, got 'zero'"):
        gl.runtime.default_threads()
    monkeypatch.delenv("GRADIV_THREADS")
    assert gl.runtime.default_threads() == 1


def test_bad_seed_and_device(monkeypatch):
    monkeypatch.delenv("GRADIV_DEVICE", raising=False)
    for seed in (-1, 2**64):  # 2**64: torch overflowed after random and NumPy were already seeded
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            gl.seed_everything(seed)
    gl.seed_everything(2**64 - 1)
    with pytest.raises(ValueError, match="device 'gpu' is not a device; use 'auto'"):
        gl.pick_device("gpu")
    monkeypatch.setenv("GRADIV_DEVICE", "tpu0")
    with pytest.raises(ValueError, match="GRADIV_DEVICE 'tpu0' is not a device"):
        gl.pick_device()
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


def test_glue_turns_numpy_and_torch_scalars_into_python_numbers(monkeypatch):
    import myst_nb

    seen = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=False: seen.__setitem__(name, value))
    gl.glue("a", np.float64(0.5))
    gl.glue("b", torch.tensor(3))
    gl.glue("c", "text")
    assert seen == {"a": 0.5, "b": 3, "c": "text"}
    assert type(seen["a"]) is float and type(seen["b"]) is int
    assert gl.runtime.GLUED["a"] == 0.5


def test_glue_works_without_the_book_toolchain(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "myst_nb", None)      # import myst_nb now raises ImportError
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    gl.glue("x_no_toolchain", np.int64(7))
    assert gl.runtime.GLUED["x_no_toolchain"] == 7 and capsys.readouterr().out == ""
    gl.glue("y_no_toolchain", 0.25, display=True)
    assert capsys.readouterr().out == "y_no_toolchain = 0.25\n"
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        gl.glue("", 1)


HEAVY = ["matplotlib.pyplot", "matplotlib", "ipywidgets", "IPython", "sklearn", "scipy", "mnist1d", "flwr", "myst_nb"]
VERBS = ["per_sample_sq_norms", "per_sample_sq_norms_and_grad_sum", "gradient_diversity", "DiversityMeter",
         "FixedBatch", "AdaBatch", "DiveBatch", "NoiseScaleBatch", "train", "evaluate", "setup", "setup_book", "glue"]


def test_import_is_light_and_the_verbs_are_at_the_top_level():
    code = f"""
import sys
import gradiv_lib as gl
assert not [m for m in {HEAVY!r} if m in sys.modules], [m for m in {HEAVY!r} if m in sys.modules]
assert "torch" not in sys.modules                      # nothing at all until a name is used
for name in {VERBS!r}:
    assert name in gl.__all__ and getattr(gl, name) is not None, name
assert callable(gl.train) and gl.train.__module__ == "gradiv_lib.training.loop"
import gradiv_lib.training, gradiv_lib.norms, gradiv_lib.data, gradiv_lib.workers, gradiv_lib.federated
import gradiv_lib.plasticity, gradiv_lib.sharpness, gradiv_lib.scaling, gradiv_lib.results, gradiv_lib.flower
assert callable(gl.train)                               # importing the module does not shadow the function
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"core modules imported heavy optional packages: {out.stdout}"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gl.nope  # noqa: B018
