"""``python -m unipelt``: the command line, as a module entry point for launchers that start a
module in every process (``torchrun --nproc-per-node N -m unipelt train ...``,
``accelerate launch -m unipelt train ...``)."""
from __future__ import annotations

import sys

from unipelt.cli import main

if __name__ == "__main__":
    sys.exit(main())
