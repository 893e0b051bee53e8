"""The recipe of the shipped SmolLM2-135M-Instruct adapter: the defaults of ``deltamem-edge train``.

Why one constant: ``models/README.md`` states the command that reproduces the
shipped adapter, and that command is ``deltamem-edge train`` with no flags, so the
recipe must live in one place.  How each choice was made is in docs/training.md.
"""

from __future__ import annotations

from .loop import TrainConfig
from .model import DeltaMemSpec

DEFAULT_RECIPE = TrainConfig(
    spec=DeltaMemSpec(rank=8, state_heads=1, alpha=16.0, delta_heads=("q", "o"), beta_bias_init=-1.5,
                      online_gain=0.05),
    steps=240,
    batch=16,
    lr=2e-3,
    seed=1,
    n_fact_episodes=4000,
    n_generic_episodes=400,
    facts_per_memory=(1, 1, 2, 3),
    small_values=4,
    small_fraction=0.3,
)
