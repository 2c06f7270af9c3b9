"""Admission: the checks every request passes and what it may cost before the model runs.

Per-request limits (``limits``), the check -> decode -> prepare chain (``request``), a request's
cost in tokens and bytes (``cost``) and the server-wide budgets that make new work wait
(``budget``). Nothing here imports torch when it loads: the edges check requests without it.
"""
