"""torchrunx 0.4's documented path to ``torchrunx.integrations.cli`` (the same module).

::

    from torchrunx.integrations.parsing import add_torchrunx_argument_group, launcher_from_args
"""

import sys

from torchrunx.integrations import cli
from torchrunx.integrations.cli import add_torchrunx_argument_group, launcher_from_args

__all__ = ["add_torchrunx_argument_group", "launcher_from_args"]

# The import system hands back whatever sys.modules holds under this name once the file has run:
# both paths then name one module object, with one set of globals (nothing to drift apart).
sys.modules[__name__] = cli
