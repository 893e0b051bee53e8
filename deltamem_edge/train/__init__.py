"""``deltamem-edge train``: δ-mem adapters trained on a CPU for a frozen GGUF base (needs torch).

Reading order: ``model`` (the torch forward, checked against the numpy reference)
-> ``episodes`` (the runtime's two-run token layout) -> ``data`` (the seeded mix and
batches) -> ``loop`` (AdamW, checkpoints) -> ``export`` (upstream folder -> GGUF)
-> ``run`` (all of it, for the CLI); ``recipe`` holds the shipped defaults.
Nothing outside this package imports it: chatting never needs torch.
"""
