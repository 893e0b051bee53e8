"""Token sampling with llama.cpp's own sampler chain, applied to logits we already hold.

Why not ``llama_sampler_sample(ctx, -1)``: several sessions share one context,
so "the last logits of the context" may belong to another conversation.  We
apply the chain to the logits row that ``Session.feed`` returned, through
``llama_sampler_apply`` on a token-data array, which is what
``llama_sampler_sample`` does internally.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass

import numpy as np

from ._bindings import llama_lib
from .args import check_float, check_int

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's names and defaults (``--temp 0.8 --top-k 40 --top-p 0.95 --min-p 0.05``).

    ``temp <= 0`` means greedy.  ``seed = -1`` picks a random seed (see ``Sampler.seed``).
    Every field is checked on construction (``ArgumentError``): a NaN temperature
    or top-p used to switch a sampler stage off silently, and a seed of 2**32 or
    more was truncated to 32 bits by ctypes, so two "different" seeds gave one run.
    """

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = -1

    def __post_init__(self) -> None:
        # object.__setattr__: the dataclass is frozen; store the checked, plain-Python values.
        object.__setattr__(self, "temp", check_float("temp", self.temp))
        object.__setattr__(self, "top_k", check_int("top_k", self.top_k, low=0, high=2**31 - 1))
        object.__setattr__(self, "top_p", check_float("top_p", self.top_p, low=0.0, high=1.0))
        object.__setattr__(self, "min_p", check_float("min_p", self.min_p, low=0.0, high=1.0))
        object.__setattr__(self, "seed", check_int("seed", self.seed, low=-1, high=2**32 - 1))


class Sampler:
    """A llama.cpp sampler chain for one conversation."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.params = params
        self.seed = params.seed if params.seed >= 0 else random.SystemRandom().randrange(2**31)
        chain_params = llama_lib.llama_sampler_chain_default_params()
        self._chain = llama_lib.llama_sampler_chain_init(chain_params)
        add = llama_lib.llama_sampler_chain_add
        if params.temp <= 0:
            add(self._chain, llama_lib.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(self._chain, llama_lib.llama_sampler_init_top_k(params.top_k))
            if 0 < params.top_p < 1:
                add(self._chain, llama_lib.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(self._chain, llama_lib.llama_sampler_init_min_p(params.min_p, 1))
            add(self._chain, llama_lib.llama_sampler_init_temp(params.temp))
            add(self._chain, llama_lib.llama_sampler_init_dist(self.seed))
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from one logits row and tell the chain it was chosen."""
        data = self._data
        data["id"] = self._ids
        data["logit"] = logits
        data["p"] = 0.0
        arr = llama_lib.llama_token_data_array(
            data=data.ctypes.data_as(llama_lib.llama_token_data_p),
            size=data.size,
            selected=-1,
            sorted=False,
        )
        llama_lib.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if arr.selected < 0 or arr.selected >= arr.size:
            raise RuntimeError("the sampler chain selected no token")
        token = int(arr.data[arr.selected].id)
        llama_lib.llama_sampler_accept(self._chain, token)
        return token

    def reset(self) -> None:
        llama_lib.llama_sampler_reset(self._chain)

    def close(self) -> None:
        if self._chain:
            llama_lib.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()
