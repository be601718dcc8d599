"""The control plane of the CSC: what operators use (admin API and CLI, web console, error
log, database commands, configuration checks). Nothing here is on a bootloader request's path.
"""
