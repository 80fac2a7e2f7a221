"""``python -m gradiv_lib``: the ``gradiv`` command line (:mod:`gradiv_lib.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m gradiv_lib"))
