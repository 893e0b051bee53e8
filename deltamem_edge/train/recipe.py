"""The recipe for the SmolLM2-135M-Instruct adapter: the defaults of ``deltamem-edge train``.

Why one constant: ``models/README.md`` states the command that reproduces the
shipped adapter (``models/smollm2-135m-instruct.dmem.gguf``, variant v4 of
docs/training.md), and that command is ``deltamem-edge train`` with no flags, so the
recipe must live in one place.  How each choice was made, and what it measured, is in
docs/training.md.
"""

from __future__ import annotations

from .loop import TrainConfig
from .model import DeltaMemSpec

DEFAULT_RECIPE = TrainConfig(
    # tied init: memory keys = queries and δ_o = normalize(W_vᵀ)·8, a copy path that already reads a
    # novel value back under perfect addressing; δ_q starts small; the plain delta rule (no decay)
    spec=DeltaMemSpec(rank=8, state_heads=1, alpha=16.0, delta_heads=("q", "o"), beta_bias_init=-3.0,
                      online_gain=8.0, init="tied", query_gain=0.05, update_mode="no_lambda"),
    steps=280,
    batch=16,
    lr=2e-3,
    seed=1,
    n_fact_episodes=4000,
    n_generic_episodes=400,
    n_prose_episodes=800,  # without them the gate opens on prose: perplexity +64 % (docs/training.md)
    facts_per_memory=(1, 1, 2, 3),
    value_weight=3.0,
    # supervised addressing (addressing.py): the answer loss alone never found it
    addressing_weight=2.0,
    key_weight=1.0,
    beta_lr_mult=20.0,
    # the memory must not spoil ordinary text (v3) nor copying from the context, and a state another
    # conversation wrote must not spoil prose read after it (v4): +1.3 % / +8.8 % perplexity, not +7.7 % / +120 %
    lm_weight=1.0,
    n_in_context_episodes=800,
    n_prose_read_episodes=800,
)
