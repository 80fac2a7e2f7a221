"""Remake the results shipped with the book: ``python -m gradiv_lib.experiments.regenerate [--cheap] [--check]``
(also ``gradiv regenerate``, ``make results``).

Every entry of :data:`gradiv_lib.experiments.registry.SHIPPED` is rerun from its recorded command, each in a fresh
process (``python -m gradiv_lib ARGS --out DIR``):

* without ``--check``, into ``gradiv_lib/_results`` of this checkout (run it from a clean checkout: each result
  records the commit and whether the tree was dirty, and the tests refuse dirty results), then commit them;
* with ``--check``, into a temporary folder, and every number is compared with the shipped file within the entry's
  tolerance (:func:`compare`); any difference fails (exit status 1). CI runs ``--cheap --check``: a library change
  that alters a book result fails there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .registry import SHIPPED, TIMING_KEYS, Shipped

__all__ = ["compare", "main", "regenerate_one"]


def compare(shipped: Any, new: Any, entry: Shipped, path: str = "") -> list[str]:
    """Differences between a shipped result's ``config`` and ``data`` and a rerun's, as readable lines."""
    if not path:
        problems = []
        if json.dumps(shipped.get("config"), sort_keys=True) != json.dumps(new.get("config"), sort_keys=True):
            problems.append("config: the rerun's configuration differs from the shipped one")
        return problems + compare(shipped["data"], new["data"], entry, "data")
    ignore = set(TIMING_KEYS) | set(entry.ignore)
    numbers = entry.compare == "numbers"
    if isinstance(shipped, dict) and isinstance(new, dict):
        problems = []
        if set(shipped) != set(new):
            problems.append(f"{path}: keys differ ({sorted(set(shipped) ^ set(new))})")
        for key in sorted(set(shipped) & set(new), key=str):
            if key in ignore:
                continue
            problems += compare(shipped[key], new[key], entry, f"{path}.{key}")
        return problems
    if isinstance(shipped, list) and isinstance(new, list):
        if len(shipped) != len(new):
            return [f"{path}: length {len(shipped)} shipped, {len(new)} now"]
        problems = []
        for i, (a, b) in enumerate(zip(shipped, new)):
            problems += compare(a, b, entry, f"{path}[{i}]")
        return problems
    if isinstance(shipped, bool) or isinstance(new, bool) or shipped is None or new is None:
        return [] if shipped == new or not numbers else [f"{path}: {shipped!r} shipped, {new!r} now"]
    if isinstance(shipped, (int, float)) and isinstance(new, (int, float)):
        if not numbers:
            return []
        a, b = float(shipped), float(new)
        if math.isnan(a) and math.isnan(b):
            return []
        if a == b or abs(a - b) <= entry.atol + entry.rtol * abs(a):
            return []
        return [f"{path}: {shipped!r} shipped, {new!r} now"]
    if type(shipped) is not type(new):
        return [f"{path}: a {type(shipped).__name__} shipped, a {type(new).__name__} now"]
    return [] if shipped == new or not numbers else [f"{path}: {shipped!r} shipped, {new!r} now"]


def pinned_numerics(env: dict[str, str]) -> dict[str, str]:
    """:data:`gradiv_lib.results.NUMERICS_ENV` on an x86-64 machine with AVX2 (a value the caller set wins); nothing
    elsewhere. The shipped results were made with it, so that their rerun on another x86 processor matches to the
    bit (checked so far on a processor without AVX-512 only)."""
    import torch

    from ..results import NUMERICS_ENV

    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return {}
    return {name: env.get(name, value) for name, value in NUMERICS_ENV.items()}


def regenerate_one(entry: Shipped, out: Path) -> tuple[int, float]:
    """Run ``entry``'s command with ``--out out`` in a fresh process; returns (exit status, seconds)."""
    tail = [] if entry.args[0] == "bench" else ["--no-progress"]
    command = [sys.executable, "-m", "gradiv_lib", *entry.args, "--out", str(out), *tail]
    env = dict(os.environ)
    try:   # the thread count changes the arithmetic: rerun with the shipped result's
        from .. import results

        env["GRADIV_THREADS"] = str(results.load(entry.name)["machine"].get("torch_threads") or 1)
    except (FileNotFoundError, KeyError, ValueError):
        env["GRADIV_THREADS"] = "1"
    env.update(pinned_numerics(env))
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [env.get("PYTHONPATH")])])
    start = time.perf_counter()
    code = subprocess.run(command, env=env).returncode
    return code, time.perf_counter() - start


def main_from_args(args: argparse.Namespace) -> int:
    """``gradiv regenerate`` with parsed options (see :func:`main`)."""
    from .. import results

    entries = [e for e in SHIPPED if (not args.cheap or e.cheap) and (not args.only or e.name in args.only)]
    unknown = set(args.only or []) - {e.name for e in SHIPPED}
    if unknown:
        print(f"gradiv regenerate: error: not shipped results: {sorted(unknown)}; see gradiv regenerate --list",
              file=sys.stderr)
        return 1
    if args.list:
        for e in SHIPPED:
            print(f"{e.name:28} {'cheap ' if e.cheap else '      '}~{e.minutes:g} min  {e.command}")
        return 0
    if not args.check:
        if results.repo_root() is None:
            print("gradiv regenerate: error: gradiv_lib is not in a git checkout; regenerating in place needs one "
                  "(use --check to compare in a temporary folder)", file=sys.stderr)
            return 1
        state = results.git_state()
        if state["dirty"]:
            print("gradiv regenerate: warning: the checkout has uncommitted changes "
                  f"({', '.join(state['changes'][:5])}); the results will record dirty: true and the tests will "
                  "refuse them. Commit first.", file=sys.stderr)
    keep = Path(args.keep) if getattr(args, "keep", None) else None
    with tempfile.TemporaryDirectory(prefix="gradiv-regenerate-") as tmp:
        out = (keep or Path(tmp)) if args.check else results.RESULTS_DIR
        failed: list[str] = []
        total = time.perf_counter()
        for i, entry in enumerate(entries, 1):
            print(f"[{i}/{len(entries)}] {entry.name}: {entry.command}", flush=True)
            if entry.args[0] == "bench" and entry.args[1] == "norms" and not _norms_takes_out():
                print("  skipped: benchmarks/bench_norms.py does not write through --out DIR yet", flush=True)
                continue
            code, seconds = regenerate_one(entry, out)
            if code != 0:
                failed.append(f"{entry.name}: the command failed (exit status {code})")
                print(f"  FAILED (exit status {code}) after {seconds:.1f} s", flush=True)
                continue
            if not args.check:
                print(f"  written in {seconds:.1f} s", flush=True)
                continue
            try:
                reference = results.load(entry.name)
            except FileNotFoundError:
                failed.append(f"{entry.name}: not shipped (run gradiv regenerate --only {entry.name} and commit it)")
                print("  NOT SHIPPED: nothing to compare with", flush=True)
                continue
            problems = compare(reference, results.load(entry.name, root=out), entry)
            if problems:
                failed.append(f"{entry.name}: {len(problems)} difference(s), first: {problems[0]}")
                print(f"  DIFFERS from the shipped result ({len(problems)} difference(s)) after {seconds:.1f} s:",
                      flush=True)
                for line in problems[:10]:
                    print(f"    {line}")
            else:
                print(f"  matches the shipped result ({entry.compare}, rtol {entry.rtol:g}) in {seconds:.1f} s",
                      flush=True)
        elapsed = time.perf_counter() - total
    what = "checked" if args.check else "regenerated"
    print(f"\ngradiv regenerate: {len(entries) - len(failed)} of {len(entries)} results {what} in {elapsed:.0f} s"
          + ("" if args.check else f" into {results.RESULTS_DIR}"))
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return 1 if failed else 0


def _norms_takes_out() -> bool:
    from .. import results

    root = results.repo_root()
    script = None if root is None else root / "benchmarks" / "bench_norms.py"
    return script is not None and script.is_file() and "--out" in script.read_text()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradiv_lib.experiments.regenerate [--cheap] [--check] [--only NAME ...] [--list]``."""
    from ..cli import main as cli_main

    return cli_main(["regenerate", *(sys.argv[1:] if argv is None else argv)], prog="gradiv")


if __name__ == "__main__":
    raise SystemExit(main())
