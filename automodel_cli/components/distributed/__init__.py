"""Distributed SPMD training: process groups, the device mesh, TP plans, FSDP2/HSDP.

Import the submodules (``env``, ``mesh``, ``plans``, ``parallelize``); this package imports no
torch by itself.
"""
