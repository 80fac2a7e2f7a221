"""Saving and loading the JSON results of long runs; the history every shipped result must carry."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from gradiv_lib import results
from gradiv_lib.experiments import regenerate, registry

PROVENANCE = ("command", "argv", "producer", "gradiv_lib", "git_commit", "git_dirty", "config", "machine", "date",
              "seconds")

#: Shipped results waiting to be regenerated through the new path, and why (remove an entry once it is).
PENDING: dict[str, str] = {}


def test_save_then_load_roundtrip(tmp_path):
    path = results.save("ch00/demo", {"x": [1, 2, 3]}, config={"seed": 0}, seconds=1.23456, root=tmp_path)
    assert path == tmp_path / "ch00" / "demo.json"
    loaded = results.load("ch00/demo", root=tmp_path)
    assert loaded["data"] == {"x": [1, 2, 3]}
    assert loaded["config"] == {"seed": 0}
    assert loaded["seconds"] == 1.235
    for key in PROVENANCE:
        assert key in loaded, key
    assert loaded["producer"] == "tests/test_results.py"          # the caller of save, relative to the checkout
    assert loaded["argv"] and loaded["command"]
    assert loaded["machine"]["torch"]
    assert not list(tmp_path.rglob("*.tmp")), "the temporary file must be renamed away"
    assert path.stat().st_mode & 0o777 == 0o644, "results ship as package data: readable by everyone"


def test_default_root_is_the_current_directory_not_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(results.RESULTS_DIR.rglob("*"))
    path = results.save("ch00/here", {"ok": 1}, config={}, seconds=0)
    assert path == tmp_path / "gradiv-results" / "ch00" / "here.json"
    assert sorted(results.RESULTS_DIR.rglob("*")) == before


def test_output_folder_must_be_a_writable_folder(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(results.OutputError, match="is a file"):
        results.save("a", {}, config={}, seconds=0, root=afile)
    with pytest.raises(results.OutputError, match="is below the file"):
        results.check_out(afile / "sub")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(results.OutputError, match="permission denied"):
                results.check_out(locked / "out")
        finally:
            locked.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux procfs")
def test_output_folder_that_cannot_be_created_is_refused_before_the_run(tmp_path):
    """/proc takes no new folders, not even from root, which passes the permission check (CI runs as root):
    a run must not find out after hours of work."""
    with pytest.raises(results.OutputError, match=r"--out /proc/gradiv-out: cannot write there"):
        results.check_out("/proc/gradiv-out")
    created = results.check_out(tmp_path / "new" / "deeper")
    assert created.is_dir() and not list(created.iterdir())  # created, and the write probe left nothing behind


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
    with pytest.raises(FileNotFoundError, match="no result 'nope/never' shipped with gradiv_lib; available: .*ch04"):
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


# --------------------------------------------------------------------------------------------
# Shipped results: registered, with provenance, from a clean commit that holds their producer
# --------------------------------------------------------------------------------------------

def test_registry_and_shipped_files_agree():
    names = [e.name for e in registry.SHIPPED]
    assert len(names) == len(set(names))
    assert sorted(names) == results.shipped(), "every shipped JSON is in the registry, and every entry ships"


def test_cheap_results_cover_every_chapter_within_the_ci_budget():
    cheap = [e for e in registry.SHIPPED if e.cheap]
    assert sum(e.minutes for e in cheap) <= 2.0
    chapters = {e.name.split("/")[0] for e in registry.SHIPPED if e.name.startswith("ch")}
    assert chapters <= {e.name.split("/")[0] for e in cheap}
    assert all(e.compare == "numbers" for e in cheap)


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)


def _refusals(name: str) -> list[str]:
    """Why the shipped result ``name`` must not ship (empty when it may)."""
    payload = results.load(name)
    entry = registry.by_name(name)
    missing = [key for key in PROVENANCE if payload.get(key) in (None, "", [])]
    if missing:
        return [f"no provenance: {missing} missing"]
    problems = []
    if payload["git_dirty"] is not False:
        problems.append("made from a dirty tree (or outside a checkout)")
    if payload["command"] != entry.command:
        problems.append(f"its command {payload['command']!r} is not the registry's {entry.command!r}")
    if payload["producer"] != entry.producer:
        problems.append(f"its producer {payload['producer']!r} is not the registry's {entry.producer!r}")
    root = results.repo_root()
    if root is not None:
        commit = payload["git_commit"]
        if _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=root).returncode != 0:
            problems.append(f"commit {commit} is not in this repository")
        elif _git("merge-base", "--is-ancestor", commit, "HEAD", cwd=root).returncode != 0:
            problems.append(f"commit {commit} is not an ancestor of HEAD")
        elif _git("cat-file", "-e", f"{commit}:{entry.producer}", cwd=root).returncode != 0:
            problems.append(f"commit {commit} does not contain its producer {entry.producer}")
    return problems


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=PENDING[n], strict=False)) if n in PENDING else n
    for n in results.shipped()])
def test_shipped_result_has_a_clean_history(name):
    problems = _refusals(name)
    assert not problems, f"{name}: " + "; ".join(problems)
    if results.repo_root() is None:
        pytest.skip("not a git checkout: the commit cannot be checked")


def test_refusal_catches_a_dirty_or_unknown_result(monkeypatch):
    good = results.load("ch04/divebatch_digits")
    for change, expected in [({"git_dirty": True}, "dirty"), ({"command": None}, "no provenance"),
                             ({"git_commit": "0" * 40}, "not in this repository"),
                             ({"producer": "gradiv_lib/nope.py"}, "producer")]:
        monkeypatch.setattr(results, "load", lambda name, change=change: {**good, **change})
        problems = _refusals("ch04/divebatch_digits")
        if expected == "not in this repository" and results.repo_root() is None:
            continue
        assert any(expected in p for p in problems), (change, problems)


def test_compare_flags_changed_numbers_and_ignores_timings():
    entry = registry.by_name("ch04/divebatch_digits")
    shipped = results.load(entry.name)
    same = json.loads(json.dumps(shipped))
    same["data"]["runs"]["divebatch"]["0"]["seconds"] = [0.0]
    same["data"]["summary"]["divebatch"]["seconds_to_target"] = 99.0
    assert regenerate.compare(shipped, same, entry) == []
    changed = json.loads(json.dumps(shipped))
    changed["data"]["summary"]["divebatch"]["final_test_accuracy"] -= 0.05      # beyond drift between machines
    changed["data"]["runs"]["divebatch"]["0"]["batch_size"][-1] += 16
    problems = regenerate.compare(shipped, changed, entry)
    assert any("final_test_accuracy" in p for p in problems) and any("batch_size[19]" in p for p in problems)
    drift = json.loads(json.dumps(shipped))
    drift["data"]["summary"]["divebatch"]["final_test_accuracy"] -= 1 / 359                   # one test sample
    assert regenerate.compare(shipped, drift, entry) == []
    changed = json.loads(json.dumps(shipped))
    changed["config"]["epochs"] = 3
    assert any(p.startswith("config") for p in regenerate.compare(shipped, changed, entry))


def test_shipped_results_are_read_only_package_data():
    assert Path(results.__file__).parent / "_results" == results.RESULTS_DIR
    assert "importlib" in Path(results.__file__).read_text()


def test_regenerate_pins_the_cpu_kernels_to_avx2_on_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    """A result made on a processor with AVX-512 drifted, over a training run, from its rerun on one without (CI
    failed on batch sizes and accuracies of DiveBatch). The shipped results and their check now run with torch's,
    MKL's and oneDNN's kernels pinned to AVX2 on x86-64 (a value the caller set wins), recorded with the result;
    nothing is pinned on other processors."""
    import platform

    import torch

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert regenerate.pinned_numerics({}) == results.NUMERICS_ENV
    assert regenerate.pinned_numerics({"MKL_CBWR": "COMPATIBLE"})["MKL_CBWR"] == "COMPATIBLE"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert regenerate.pinned_numerics({}) == {}
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert regenerate.pinned_numerics({}) == {}
    for name, value in results.NUMERICS_ENV.items():
        monkeypatch.setenv(name, value)
    assert results.machine_info()["numerics"] == results.NUMERICS_ENV
    monkeypatch.delenv("MKL_CBWR")
    assert "MKL_CBWR" not in results.machine_info()["numerics"]


def test_regenerate_runs_its_commands_with_the_pinned_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of the rerun's process carries the pins (they act only when set before torch starts)."""
    seen: dict[str, str] = {}
    monkeypatch.setattr(regenerate, "pinned_numerics", lambda env: {"ATEN_CPU_CAPABILITY": "avx2"})
    monkeypatch.setattr(subprocess, "run", lambda command, env: seen.update(env) or subprocess.CompletedProcess(command, 0))
    code, _ = regenerate.regenerate_one(registry.by_name("ch04/divebatch_digits"), Path("/nonexistent"))
    assert code == 0 and seen["ATEN_CPU_CAPABILITY"] == "avx2" and seen["GRADIV_THREADS"]


def test_same_machine_needs_every_key_that_decides_the_last_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two machine kinds here both report 'AMD EPYC'; one has AVX-512. A page's live rerun asked for the shipped
    numbers to the last bit on the 'same' machine and failed on the other kind. The instruction set and pinned
    kernels count now, and a result that does not record them is from another machine."""
    mine = {"machine": results.machine_info()}
    assert results.same_machine(mine)
    for key, other in [("cpu_capability", "AVX512"), ("processor", "Other CPU"), ("torch_threads", 99), ("numerics", {"MKL_CBWR": "AVX2"})]:
        assert not results.same_machine({"machine": {**mine["machine"], key: other}}), key
    assert not results.same_machine({"machine": {k: v for k, v in mine["machine"].items() if k != "cpu_capability"}})
    for name, value in results.NUMERICS_ENV.items():
        monkeypatch.setenv(name, value)
    assert not results.same_machine(mine)      # this process now runs pinned kernels, the result's did not
