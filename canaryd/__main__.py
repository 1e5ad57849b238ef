"""``python -m canaryd``: the same as the ``canaryd`` command."""

import sys

from canaryd.cli import main

sys.exit(main())
