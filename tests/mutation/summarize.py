"""Helper of run.sh: draw a mutant sample, and summarise mutmut's results (kill rate, survivors)."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code


def _results(workdir: Path) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for meta in sorted((workdir / "mutants").rglob("*.meta")):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def sample(workdir: str, n: str, seed: str) -> None:
    names = sorted(_results(Path(workdir)))
    if not names:
        sys.exit(f"no mutants were generated in {workdir}; see {workdir}/list.log")
    chosen = names if int(n) >= len(names) else sorted(random.Random(int(seed)).sample(names, int(n)))
    print(" ".join(chosen))


def summary(workdir: str, module: str, n: str, seed: str, seconds: str, rev: str) -> None:
    wd = Path(workdir)
    results = _results(wd)
    checked = {k: status_by_exit_code[v] for k, v in results.items() if v is not None}
    counts: dict[str, int] = {}
    for status in checked.values():
        counts[status] = counts.get(status, 0) + 1
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    total = len(checked)
    rate = killed / total if total else float("nan")
    survivors = sorted(k for k, s in checked.items() if s in ("survived", "no tests", "suspicious"))
    report = {"module": module, "source": rev, "mutants_generated": len(results), "mutants_checked": total,
              "sampled": int(n) > 0 and int(n) < len(results), "sample_seed": int(seed), "counts": counts,
              "kill_rate": rate, "seconds": int(seconds), "survivors": survivors}
    (wd / "summary.json").write_text(json.dumps(report, indent=1))
    print(f"   {module}: {killed}/{total} killed ({100 * rate:.1f} %; timeouts count as killed) of "
          f"{len(results)} mutants{' (sample, seed ' + seed + ')' if report['sampled'] else ''}; "
          f"{counts} in {seconds} s")
    if survivors:
        print(f"   not killed ({len(survivors)}; see one with: cd {wd} && mutmut show NAME):")
        for name in survivors:
            print(f"     {name}")


if __name__ == "__main__":
    {"sample": sample, "summary": summary}[sys.argv[1]](*sys.argv[2:])
