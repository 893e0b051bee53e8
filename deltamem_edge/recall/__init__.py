"""Measuring memory: synthetic held-out facts (``facts``) and the runtime evaluation (``evaluate``).

Nothing here imports torch: users run ``deltamem-edge eval-memory`` on any adapter.
"""
