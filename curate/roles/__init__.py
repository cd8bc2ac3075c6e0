"""Training roles: which samples feed which part of a unified model's training.

A recipe's `roles:` section names roles (generation, understanding, editing,
interleaved, ...) with a condition over sample fields (`when:`), the caption
variants each role prefers and the resolution its exporter resizes to. The
conditions are parsed by a small safe parser (expression.py) over a fixed
catalogue of fields (fields.py); the engine assigns the roles as the last
per-sample step of a run (assign.py) and stores them in the `roles` column.
"""
