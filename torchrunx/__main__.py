"""``python -m torchrunx``: the ``torchrunx`` command (see ``torchrunx.command``)."""

import sys

from torchrunx.command import main

sys.exit(main())
