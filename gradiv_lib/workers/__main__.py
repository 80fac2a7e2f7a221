"""``torchrun --nproc-per-node K -m gradiv_lib.workers [options]``: see :func:`gradiv_lib.workers.distributed.main`."""
from .distributed import main

if __name__ == "__main__":
    raise SystemExit(main())
