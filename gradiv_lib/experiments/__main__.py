"""``python -m gradiv_lib.experiments NAME [options]``: an alias of the ``gradiv`` command (:mod:`gradiv_lib.cli`)."""
from ..cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m gradiv_lib.experiments"))
