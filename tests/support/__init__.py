"""Test support: fixtures and test helpers over :mod:`harness` (what the tests share with
``bench/`` and ``demo/``; its modules are re-exported here under their old names).

Real processes and the servers they talk to: ``procs`` (start, wait for, stop by PID),
``stack`` (the whole provisioning stack), ``upstream`` (a deterministic test portal),
``delayproxy`` and ``mitm`` (a slow link; a man in the middle that cuts, holds or forges),
``attacks`` (raw hostile clients and agents: slowloris, floods, lying agents),
``browser`` (headless Chromium through Playwright), ``postgres`` (a PostgreSQL server from Debian's
binaries, a fresh database per test), ``haproxy`` (a real HAProxy in front of backends, with
its ``haproxy`` fixture), and fixtures that use the product's own code
where a test needs its data: ``admin`` and ``inproc`` (a CSC in the test's loop), ``portal`` and
``catalog`` (portal set-up), ``packages`` (signed and tampered packages, a fake portal).
"""
