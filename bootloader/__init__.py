"""The reference bootloader (``csc-bootloader``): configuration, logon, download, installation.

It runs on devices, shipped as a zipapp, so it imports only the standard library,
``cryptography`` and ``shared.aliases``. Modules: ``config`` (SMS, flags, migration file),
``client`` (HTTP to the CSC and the portal), ``download`` (resumable package download),
``package`` (signature and content verification), ``install`` (atomic installation), ``flow``
(one run, stage by stage), ``prompts`` and ``progress`` (the user), ``cli`` (the entry point).
"""
