"""``python -m gradiv_lib.workers [options]``: an alias of ``gradiv workers`` (:mod:`gradiv_lib.cli`).

Under ``torchrun --nproc-per-node K -m gradiv_lib.workers`` each process is one worker; without ``torchrun`` it starts
``--nproc`` processes itself.
"""
import sys

from ..cli import main

if __name__ == "__main__":
    raise SystemExit(main(["workers", *sys.argv[1:]], prog="python -m gradiv_lib.workers"))
