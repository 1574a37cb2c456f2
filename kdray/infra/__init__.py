"""Plumbing every layer above shares, knowing nothing of distillation.

Where caches and tables live and how they are written atomically (:mod:`.store`), the storage
every node of a cluster shares (:mod:`.remote`), the named points where kdray can be crashed on
purpose (:mod:`.faults`), and what a person watches: progress bars and the live trials table
(:mod:`.progress`), TensorBoard scalars of a single run (:mod:`.tracking`).
"""
