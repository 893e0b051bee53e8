"""Builders of tiny GGUF test fixtures: random base models, random δ-mem adapters, bundles.

Plain functions (no pytest fixtures) so any test, benchmark or debugging script can
import them.  Everything is seeded and takes well under a second.

The writers themselves are the product's ``deltamem_edge.random_gguf`` (shared with the
benchmark and the GPU check); this module adds the tests' choices: which architectures,
tiny default shapes, large weights, and a byte-level chat tokenizer.

Weights are drawn large on purpose (matrices N(0, 0.2), norm weights 1 + 0.1·N(0, 1)):
with the usual 0.02 init the logits of a 64-wide model are nearly flat and comparisons
prove little.  Base models carry no tokenizer (``tokenizer.ggml.model = "no_vocab"`` plus
``{arch}.vocab_size``; llama.cpp then creates dummy tokens), so tests feed token ids.

δ-mem weights are generated in UPSTREAM order and named as upstream names them (see
``deltamem_edge.reference.DmemLayer``); ``write_adapter`` applies the schema's GDN row
permutation when it writes them, exactly as the converter must.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from deltamem_edge import random_gguf as RG
from deltamem_edge.random_gguf import (  # noqa: F401 - re-exported for the tests
    adapter_tensors,
    base_shapes,
    random_adapter_weights,
    write_adapter,
    write_random_adapter,
)

ARCHS = ("qwen3", "llama", "qwen2", "smollm3")
FTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_ROPE_BASE = {"qwen3": 1e6, "qwen2": 1e6, "llama": 1e4, "smollm3": 5e6}
_TIED_BY_DEFAULT = {"qwen3": False, "qwen2": True, "llama": True, "smollm3": True}


# --------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------


def write_tiny_model(
    path: str | Path,
    arch: str = "qwen3",
    *,
    n_embd: int = 64,
    n_layer: int | None = None,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 16,
    n_ff: int = 128,
    n_vocab: int = 256,
    seed: int = 0,
    ftype: str = "f32",
    tied: bool | None = None,
    norm_eps: float = 1e-6,
    chat_tokenizer: bool = False,
) -> Path:
    """Write a random ``arch`` model GGUF that stock llama.cpp loads.

    ``chat_tokenizer=True`` gives it a real (tiny) tokenizer instead of none: byte-level
    BPE over the 256 bytes plus ChatML's special tokens (``n_vocab`` is then
    ``len(BYTE_CHAT_TOKENS)``), so that text-level code (chat template, server) can be
    tested in milliseconds instead of on a real model.

    n_layer defaults to 2, or 4 for smollm3 so that llama.cpp's hard-coded NoPE layer
    (il = 3) exists.  ``tied`` defaults per arch (qwen3 untied, others tied: no
    output.weight).  qwen2 gets q/k/v biases, qwen3 gets q/k norms.  ``ftype`` "f16"
    stores 2-D weights in f16, "q8_0" quantizes the 2-D weights (f16 where a row does
    not split into 32-blocks).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} not in {ARCHS}")
    if ftype not in FTYPES:
        raise ValueError(f"ftype {ftype!r} not in {tuple(FTYPES)}")
    if arch == "qwen2" and n_head * head_dim != n_embd:
        raise ValueError("llama.cpp's qwen2 needs n_head * head_dim == n_embd")
    n_layer = n_layer if n_layer is not None else (4 if arch == "smollm3" else 2)
    if chat_tokenizer:
        n_vocab = len(BYTE_CHAT_TOKENS)
    tied = _TIED_BY_DEFAULT[arch] if tied is None else tied
    rng = np.random.default_rng(seed)
    draw = {"mat": lambda shape: rng.normal(0.0, 0.2, shape), "norm": lambda shape: 1.0 + 0.1 * rng.normal(size=shape),
            "bias": lambda shape: rng.normal(0.0, 0.2, shape)}
    dims = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv, "head_dim": head_dim,
            "n_ff": n_ff}
    plan = RG.model_tensor_plan(arch, **dims, n_vocab=n_vocab, tied=tied, output_first=True)
    tensors = [(name, *RG.encode(draw[kind](shape), ftype)) for name, shape, kind in plan]
    return RG.write_model(path, arch, tensors, name=f"tiny-random-{arch}", file_type=FTYPES[ftype], n_ctx=4096,
                          **dims, rope_base=_ROPE_BASE[arch], norm_eps=norm_eps, n_vocab=n_vocab,
                          tokenizer=_add_byte_chat_tokenizer if chat_tokenizer else None)


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BYTE_CHAT_TOKENS = (*_byte_tokens(), "\u0120t", *CHAT_SPECIAL_TOKENS)  # one merge ("Ġ t"): llama.cpp needs >= 1


def _add_byte_chat_tokenizer(wr: gguf.GGUFWriter) -> None:
    """A gpt2-style tokenizer over BYTE_CHAT_TOKENS; <|im_end|> is EOS, so ChatML replies can end."""
    n_plain = len(BYTE_CHAT_TOKENS) - len(CHAT_SPECIAL_TOKENS)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(list(BYTE_CHAT_TOKENS))
    wr.add_token_types([1] * n_plain + [3] * len(CHAT_SPECIAL_TOKENS))  # 1 normal, 3 control
    wr.add_token_merges(["\u0120 t"])
    wr.add_bos_token_id(BYTE_CHAT_TOKENS.index("<|endoftext|>"))
    wr.add_eos_token_id(BYTE_CHAT_TOKENS.index("<|im_end|>"))
    wr.add_add_bos_token(False)


# --------------------------------------------------------------------------------------
# δ-mem adapters (the writers are deltamem_edge.random_gguf's, imported above)
# --------------------------------------------------------------------------------------


def write_unnormalized_qk_adapter(path: str | Path, base_path: str | Path, *, rank: int, seed: int = 2) -> Path:
    """A random adapter with normalize_qk=False: raw memory q/k.

    k is scaled down (×0.05) so that the delta rule stays contractive without the l2 norm; the
    one recipe for every test of the unnormalised path.
    """
    weights = random_adapter_weights(base_path, rank=rank, seed=seed)
    for w in weights.values():
        w["memory_k_proj"] *= 0.05
    return write_adapter(path, base_path, weights, rank=rank, normalize_qk=False)
