"""Starting the programs for real, shared by the tests, ``demo/`` and ``bench/``.

``procs`` (start ``csc serve``, agents, the test upstream and other processes; wait for their
ready files; stop them by PID), ``readyfile`` (the ready-file protocol of those programs),
``upstream`` (a deterministic test portal, ``python -m harness.upstream``), ``catalog`` (the
demo portal catalog, as ``csc-portal`` commands), ``stack`` (the whole provisioning stack),
``cluster`` (CSC nodes of one cluster), ``redis`` and ``postgres`` (real servers from Debian's
binaries). Nothing here imports pytest or the tests; ``tests/support`` holds the fixtures.
"""
