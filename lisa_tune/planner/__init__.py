"""The planner: which LISA configurations fit a memory budget, and which of them is fastest.

Modules here import neither torch nor transformers, except ``fit``, so that a plan for a model whose memory fit
is cached starts and finishes in well under a second.
"""
