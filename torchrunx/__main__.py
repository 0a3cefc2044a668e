"""``python -m torchrunx``: start an agent (the launcher does this; users never need to)."""

from torchrunx.agent import main

main()
