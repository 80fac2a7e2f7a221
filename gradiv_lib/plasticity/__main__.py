"""``python -m gradiv_lib.plasticity NAME``: an alias of ``gradiv plasticity NAME``."""
from . import main

raise SystemExit(main())
