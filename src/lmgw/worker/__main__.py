"""``python -m lmgw.worker`` (see :mod:`lmgw.worker.cli`)."""

import sys

from .cli import main

sys.exit(main())
