"""``python -m lmgw.simulators``: run one simulated worker process (see :mod:`.worker`)."""

import sys

from .worker import main

if __name__ == "__main__":
    sys.exit(main())
