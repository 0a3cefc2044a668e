"""Import paths of torchrunx 0.4 (``torchrunx.utils.log_handling``), kept for its code."""
