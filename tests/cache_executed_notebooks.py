"""File the notebooks nbval executed (see book/conftest.py) in the book's jupyter-cache.

Usage: ``python tests/cache_executed_notebooks.py EXECUTED_DIR CACHE_DIR``. The book build
(``execute_notebooks: cache``) then takes their outputs instead of executing them again; a notebook
whose code changed since has another hash and is executed as usual.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn

ROOT = Path(__file__).resolve().parents[1]


def main(executed_dir: str, cache_dir: str) -> int:
    executed = sorted(Path(executed_dir).rglob("*.ipynb"))
    cache = get_cache(cache_dir)
    for path in executed:
        source = ROOT / path.relative_to(executed_dir)
        nb = nbformat.read(path, as_version=4)
        cache.cache_notebook_bundle(CacheBundleIn(nb, str(source), data={"executed_by": "nbval"}),
                                    check_validity=False, overwrite=True)
    print(f"cached {len(executed)} notebooks executed by nbval in {cache_dir}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
