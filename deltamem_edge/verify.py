"""``verify``: the engine against the numpy reference on a few hundred tokens.

Why the base-model comparison: on quantized models llama.cpp also rounds the
activations (to 8 bits) inside its matrix products, which the reference does not
do, so even the plain base model differs from the reference by a visible amount
(the *quantization floor*).  A wrong δ-mem implementation would add an error of
the size of the δ-mem effect itself.  So the check is: the engine's error with
the adapter exceeds its error without it by at most a small fraction of the
δ-mem effect (a strong adapter amplifies the rounding noise a little), and on
float models the error is simply tiny.  When the effect is smaller than the
floor, no verdict is possible on that model: we say so ("inconclusive").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TEXT = (
    "The river ran high after the spring rains, and the old ferryman watched the water with care. "
    "He had crossed it ten thousand times; he knew where the current pulled and where it slept. "
    "That morning a stranger asked to be taken over, carrying a box wrapped in blue cloth. "
    "Memory is a strange thing: what we keep is rarely what we chose to keep. "
)
FLOAT_TOL = 1e-3  # relative to the largest |logit|, float weights
QUANT_MARGIN = 0.02  # relative, on top of the quantization floor
EFFECT_SHARE = 0.1  # a wrong δ-mem would err by ~the whole effect; allow a tenth of it as amplified noise


@dataclass
class VerifyReport:
    tokens: int
    quantized: bool
    logit_scale: float
    adapter_rel_err: float  # max |engine - reference| / max |reference|, with the adapter
    base_rel_err: float  # the same without the adapter (the quantization floor)
    effect_rel: float  # max |reference with adapter - reference without| / max |reference|
    top1_agree: float  # fraction of positions where engine and reference pick the same token
    state_rel_err: float
    passed: bool
    conclusive: bool  # False when the δ-mem effect is below the quantization floor

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def _is_quantized(model_path: Path) -> bool:
    from .gguf_header import read_gguf_header

    return any(t.type_name not in ("F32", "F16", "BF16") for t in read_gguf_header(model_path).tensors)


def verify(model: Path, adapter: Path | None = None, *, n_tokens: int = 256, n_threads: int | None = None,
           dtype: type = np.float64, **placement: object) -> VerifyReport:
    """Engine vs reference.  ``placement``: where the layers run (``n_gpu_layers``, ``rpc_servers``,
    ``tensor_split``, as :class:`~deltamem_edge.engine.Engine` takes them)."""
    from .engine import Engine
    from .reference import RefAdapter, RefModel

    model = Path(model)
    with Engine(model, adapter, n_ctx=n_tokens + 32, n_threads=n_threads, exact=True, **placement) as eng:
        if eng.adapter is None:
            from .errors import AdapterError

            raise AdapterError("no δ-mem adapter to verify (none given, bundled or next to the model)", path=model)
        adapter_path = eng.adapter.path
        if eng.has_tokenizer:
            ids = eng.tokenize(TEXT * (1 + n_tokens // 40))[:n_tokens]
        else:  # a vocabulary-less test model: fixed pseudo-random ids
            ids = [int(t) for t in np.random.default_rng(0).integers(0, eng.n_vocab, n_tokens)]
        s = eng.session()
        eng_logits = s.feed(ids)
        eng_state = s.state()
        eng.detach()
        s.reset()
        eng_base = s.feed(ids)
        s.close()

    ref = RefModel(model, dtype=dtype)
    rs = ref.session(RefAdapter(adapter_path, ref))
    ref_logits = rs.feed(ids)
    ref_state = rs.state()
    ref_base = ref.session(None).feed(ids)

    quantized = _is_quantized(model)
    adapter_err = _rel(eng_logits, ref_logits)
    base_err = _rel(eng_base, ref_base)
    effect = _rel(ref_logits, ref_base)
    limit = base_err + max(QUANT_MARGIN, EFFECT_SHARE * effect) if quantized else FLOAT_TOL
    state_err = _rel(eng_state, ref_state)
    return VerifyReport(
        tokens=len(ids),
        quantized=quantized,
        logit_scale=float(np.abs(ref_logits).max()),
        adapter_rel_err=adapter_err,
        base_rel_err=base_err,
        effect_rel=effect,
        top1_agree=float((eng_logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        state_rel_err=state_err,
        passed=adapter_err <= limit and (quantized or state_err <= FLOAT_TOL),
        conclusive=not quantized or effect > base_err,
    )
