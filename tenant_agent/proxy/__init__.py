"""The local/DMZ proxy (``csc-agent proxy``): bootloaders on the company network reach the
portal directly, with the same requests they send through the CSC's tunnel.
"""
