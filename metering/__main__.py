"""``python -m metering``: the same as the ``metering`` command."""

import sys

from metering.cli import main

sys.exit(main())
