#!/usr/bin/env bash
# Mutation testing of one module (or all) against its own tests, with mutmut 3 (pip install mutmut).
#
#   bash tests/mutation/run.sh [MODULE...|all] [--sample N] [--seed S] [--only GLOB] [--rev GIT_REV] [--workdir DIR]
#
# MODULE is a name of tests/mutation/modules.txt (batching, federated, topology, sharpness, stateless, plasticity;
# of the norm engine fused, engine, batch_axes, attention, rules (also against the harness), and norms for all of
# gradiv_lib/norms against tests/test_norms.py only; default: all but norms). Each module runs in its own scratch
# copy (DIR/<module>, default ${TMPDIR:-/tmp}/gradiv-mutation) holding gradiv_lib and the module's test files,
# with one worker (--max-children 1), so the checkout is never touched. --sample N tests a random sample of N
# mutants (seeded by --seed, default 0; the same seed gives the same sample for the same source), for modules too
# big to test in full. --only GLOB tests only the mutants whose mutmut name matches GLOB, to check one changed
# function: --only 'gradiv_lib.norms.rules.x__conv1d_sq_norms_shifted_gram__mutmut_*'. --rev takes gradiv_lib
# and the tests from a git revision instead of the working tree (to measure a "before"). The summary (killed /
# timeout / survived / no tests, kill rate) is printed and written to DIR/<module>/summary.json; the surviving
# mutants are listed with `mutmut show NAME` hints.
# --paired-with BEFORE_DIR (after a --sample run into another DIR) also checks every mutant that the earlier run
# (e.g. --rev of the base commit) checked in functions that did not change, and prints the paired kill rates.
# Not part of CI: it takes minutes per module.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python}"
paired=""; only=""; sample=0; seed=0; rev=""; workdir="${TMPDIR:-/tmp}/gradiv-mutation"
while [ $# -gt 0 ]; do
  case "$1" in
    --sample) sample="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --rev) rev="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --paired-with) paired="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) modules_given="${modules_given:-} $1"; shift ;;
  esac
done
mutmut="$("$python" -c 'import shutil, sys, os; print(os.path.join(os.path.dirname(sys.executable), "mutmut"))')"
[ -x "$mutmut" ] || { echo "mutmut not found next to $python: pip install mutmut" >&2; exit 2; }

modules() { grep -v '^#' "$here/modules.txt" | awk 'NF {print $1}'; }
modules_given="$(echo ${modules_given:-})"
if [ -z "$modules_given" ]; then set -- $(modules | grep -v '^norms$'); elif [ "$modules_given" = "all" ]; then set -- $(modules); else set -- $modules_given; fi

for m in "$@"; do
  line="$(grep -v '^#' "$here/modules.txt" | awk -v m="$m" '$1 == m')"
  [ -n "$line" ] || { echo "unknown module $m; one of: $(modules | tr '\n' ' ')" >&2; exit 2; }
  pattern="$(echo "$line" | awk '{print $2}')"
  tests="$(echo "$line" | awk '{for (i = 3; i <= NF; i++) printf "%s ", $i}' | xargs)"
  dir="$workdir/$m"
  rm -rf "$dir"; mkdir -p "$dir/tests"
  if [ -n "$rev" ]; then
    git -C "$root" archive "$rev" gradiv_lib pyproject.toml | tar -x -C "$dir"
    git -C "$root" show "$rev:tests/conftest.py" > "$dir/tests/conftest.py" 2>/dev/null || rm -f "$dir/tests/conftest.py"
    present=""
    for t in $tests; do
      if git -C "$root" cat-file -e "$rev:$t" 2>/dev/null; then git -C "$root" show "$rev:$t" > "$dir/$t"; present="$present $t"; fi
    done
    tests="$(echo $present)"
  else
    cp -r "$root/gradiv_lib" "$dir/"; cp "$root/pyproject.toml" "$dir/"
    [ -f "$root/tests/conftest.py" ] && cp "$root/tests/conftest.py" "$dir/tests/"  # shared fixtures (one_thread)
    present=""
    for t in $tests; do [ -f "$root/$t" ] && { cp "$root/$t" "$dir/$t"; present="$present $t"; }; done
    tests="$(echo $present)"
  fi
  find "$dir" -name __pycache__ -prune -exec rm -rf {} +
  {
    echo "[mutmut]"
    echo "source_paths=gradiv_lib"
    echo "only_mutate=$pattern"
    echo "pytest_add_cli_args_test_selection=$(echo "$tests" | sed 's/ /\n    /g')"
  } > "$dir/setup.cfg"
  echo "== $m: mutating $pattern against $tests${rev:+ (at $rev)}"
  start=$(date +%s)
  cd "$dir"
  export PYTHONPATH="" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  if [ -n "$only" ]; then
    "$mutmut" run --max-children 1 "$only" > run.log 2>&1 || true
  elif [ "$sample" -gt 0 ]; then
    # generate the mutants and the test statistics only (no mutant matches this name), then draw the sample
    "$mutmut" run --max-children 1 "__gradiv_list_only__" > list.log 2>&1 || true
    names="$("$python" "$here/summarize.py" sample "$dir" "$sample" "$seed")"
    "$mutmut" run --max-children 1 $names > run.log 2>&1 || true
  else
    "$mutmut" run --max-children 1 > run.log 2>&1 || true
  fi
  if grep -qs "failed to collect stats" "$dir"/list.log "$dir"/run.log; then
    echo "   $m: the module's tests fail on the unmutated code in the scratch copy (see $dir/run.log); no kill rate" >&2
    exit 1
  fi
  "$python" "$here/summarize.py" summary "$dir" "$m" "$sample" "$seed" "$(( $(date +%s) - start ))" "${rev:-worktree}${only:+ (only $only)}"
  if [ -n "$paired" ] && [ -d "$paired/$m/mutants" ]; then
    names="$("$python" "$here/summarize.py" paired "$paired/$m" "$dir")"
    [ -z "$names" ] || "$mutmut" run --max-children 1 $names > paired.log 2>&1 || true
    "$python" "$here/summarize.py" paired-summary "$paired/$m" "$dir" "$m"
  fi
  cd "$root"
done
