"""What a benchmark run measures: the variants ("slots"), the metrics, the `Plan` and its profiles.

Kept apart from the code that runs it so that the CLI, the runner and the report all read
one definition of the slots, their labels and the ratios taken between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# deltamem_edge/bench/plan.py -> the repository (git commit of a run, docs/bench and docs/benchmarks.md)
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SLOT_LABELS = {
    "a": "a: stock llama.cpp",
    "b": "b: patched, no adapter",
    "b2": "b2: patched, no adapter (A/A twin)",
    "c": "c: δ-mem, writes on",
    "d": "d: δ-mem, writes off",
}
SLOT_WORKER = {"a": "a", "b": "b", "b2": "b2", "c": "cd", "d": "cd"}
RATIOS = (("c", "b"), ("d", "b"), ("b", "a"), ("b2", "b"))  # time ratios, > 1 = slower
METRICS = ("prefill_128", "prefill_512", "prefill_2048", "decode_128")


@dataclass
class Plan:
    """What one run measures; the defaults are the full spec, tests shrink them."""

    models: list[str]
    reps: int = 5
    threads: int = 2
    n_gpu_layers: int = 0  # -1: everything on the GPU (needs a GPU build, DELTAMEM_BACKEND=cuda|metal)
    slots: tuple[str, ...] = ("a", "b", "b2", "c", "d")
    prompt: int = 128  # D task: prefill length
    decode: int = 128  # D task: decode steps
    prefill: int = 2048  # P task: total length
    chunk: int = 512  # P task: tokens per llama_decode (the 512 figure)
    seq_lengths: tuple[int, ...] = (512, 2048, 8192)  # measured in one conversation
    seq_lengths_for: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-model override
    statecost_reps: int = 50
    callgrind: bool = True
    callgrind_prefill: dict[str, int] = field(default_factory=dict)  # model -> prefill length (0: decode only)
    budget_s: float | None = None  # stop after the round that would overrun (at least 3 rounds)
    profile: str = "custom"

    def metric_names(self) -> dict[str, str]:
        return {"prefill_128": f"prefill {self.prompt}", "prefill_512": f"prefill {self.chunk}",
                "prefill_2048": f"prefill {self.prefill}", "decode_128": f"decode {self.decode}"}

    def metric_tokens(self) -> dict[str, int]:
        return {"prefill_128": self.prompt, "prefill_512": self.chunk, "prefill_2048": self.prefill,
                "decode_128": self.decode}


PROFILES = {
    # default (`make bench`): about 20 minutes on 2 cores
    # (the 0.6B shape's 8192-token sequence state is extrapolated: feeding 8192 tokens costs ~6 CPU-minutes)
    "quick": dict(models=["smollm2", "qwen3-0.6b"], reps=5, callgrind_prefill={"smollm2": 512, "qwen3-0.6b": 128},
                  seq_lengths_for={"qwen3-0.6b": (512, 2048)}),
    # the goals' model: about 75 minutes on 2 cores; seq sizes measured to 2048, 8192 extrapolated (exact: linear)
    "full": dict(models=["qwen3-4b"], reps=5, seq_lengths=(512, 2048), callgrind_prefill={"qwen3-4b": 0},
                 slots=("a", "b", "b2", "c", "d")),
}
