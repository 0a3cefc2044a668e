"""Machinery for the tests and benchmarks, not part of the installed package.

- :mod:`testbed.cluster`: hosts on this machine (network namespaces, each with its own sshd).
- :mod:`testbed.slurm`: a real SLURM cluster on those hosts.
- :mod:`testbed.process`: bounded commands and ``/proc`` lookups that both use.

All of it needs root and Linux; tests skip where :class:`testbed.cluster.ClusterUnavailableError`
or :class:`testbed.slurm.SlurmUnavailableError` says this machine cannot host them.
"""
