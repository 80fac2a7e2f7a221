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


def _hashes(workdir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for meta in sorted((workdir / "mutants").rglob("*.meta")):
        module = str(meta.relative_to(workdir / "mutants"))[: -len(".py.meta")].replace("/", ".")
        out.update({f"{module}.{k}": v for k, v in json.loads(meta.read_text())["hash_by_function_name"].items()})
    return out


def _paired_names(before: Path, after: Path) -> list[str]:
    """Mutants checked in the ``before`` run whose function is unchanged in ``after`` (same mutmut hash, so the
    same mutant number is the same mutation)."""
    hb, ha = _hashes(before), _hashes(after)
    checked = [k for k, v in _results(before).items() if v is not None]
    return sorted(k for k in checked if hb.get(k.split("__mutmut_")[0]) is not None
                  and hb.get(k.split("__mutmut_")[0]) == ha.get(k.split("__mutmut_")[0]))


def paired(before: str, after: str) -> None:
    """Names to run in ``after`` for a paired comparison with ``before`` (the ones not yet checked there)."""
    done = _results(Path(after))
    print(" ".join(k for k in _paired_names(Path(before), Path(after)) if done.get(k) is None))


def paired_summary(before: str, after: str, module: str) -> None:
    names = _paired_names(Path(before), Path(after))
    rb, ra = _results(Path(before)), _results(Path(after))
    def rate(r):
        st = [status_by_exit_code[r[k]] for k in names if r.get(k) is not None]
        return sum(s in ("killed", "timeout") for s in st), len(st)
    (kb, nb), (ka, na) = rate(rb), rate(ra)
    newly = sorted(k for k in names if ra.get(k) is not None and status_by_exit_code[rb[k]] not in ("killed", "timeout")
                   and status_by_exit_code[ra[k]] in ("killed", "timeout"))
    print(f"   {module} (paired, the same {len(names)} mutants of unchanged functions): before {kb}/{nb} "
          f"({100 * kb / max(nb, 1):.1f} %), after {ka}/{na} ({100 * ka / max(na, 1):.1f} %); newly killed: {len(newly)}")
    for k in newly:
        print(f"     {k}")


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
    {"sample": sample, "summary": summary, "paired": paired, "paired-summary": paired_summary}[sys.argv[1]](*sys.argv[2:])
