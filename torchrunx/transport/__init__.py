"""ZeroMQ control plane: framing, serialization, local channels and how agents are started.

Nothing here imports torch at module level: the agent uses this package and must stay light.
"""
