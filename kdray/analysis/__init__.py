"""From tables to verdicts: what a results folder holds and what it shows.

The Parquet tables every run writes and how they are read back (:mod:`.results`; training
writes them, so this layer sits below it), verdicts from paired seeds with calibrated error rates
(:mod:`.stats`), the Pareto front of a multi-objective sweep (:mod:`.pareto`), the report's
tables and words (:mod:`.report`) and its plots (:mod:`.plots`). No torch, no Ray.
"""
