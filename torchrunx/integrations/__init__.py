"""Adapters: command lines (argparse; ``tyro.cli(torchrunx.Launcher)`` works as is), Lightning."""
