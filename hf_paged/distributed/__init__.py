"""Distributed: tensor parallelism, with pool sizing agreed across ranks (all-reduce MIN).

May import: `memory` and the root modules.
"""
