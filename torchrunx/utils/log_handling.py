"""torchrunx 0.4's path to the logging helpers; they live in ``torchrunx.logs``.

::

    from torchrunx.utils.log_handling import RedirectHandler, get_handler_filter
"""

from torchrunx.logs import RedirectHandler, default_handlers, file_handlers, get_handler_filter

__all__ = ["RedirectHandler", "default_handlers", "file_handlers", "get_handler_filter"]
