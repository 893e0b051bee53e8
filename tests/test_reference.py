"""Tests of the numpy oracle (deltamem_edge.reference) and of the GGUF fixture builders.

Only numpy and gguf are needed: no native library.  The oracle's backbone was checked
against stock llama.cpp separately (see the report of the change that added it); here
we pin the δ-mem math (spec §1.3-§1.9, §10.1) and the invariances the engine must share.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from ggufs import (
    ARCHS,
    random_adapter_weights,
    write_adapter,
    write_random_adapter,
    write_tiny_model,
)

from deltamem_edge import gguf_schema as S
from deltamem_edge.reference import RefAdapter, RefModel, delta_scan, l2n, sigmoid

IDS = [5, 17, 250, 3, 99, 42, 7, 180, 64, 1, 33, 128]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ref-models")
    return {arch: write_tiny_model(d / f"{arch}.gguf", arch, seed=1) for arch in ARCHS}


@pytest.fixture(scope="module")
def ref_models(models: dict[str, Path]) -> dict[str, RefModel]:
    return {arch: RefModel(p) for arch, p in models.items()}


# --------------------------------------------------------------------------------------
# §10.1 hand vector
# --------------------------------------------------------------------------------------


def test_hand_vector_10_1() -> None:
    q_raw = np.array([[0.5, -1.0], [2.0, 0.25], [-0.3, 0.8]])
    k_raw = np.array([[1.0, 0.0], [0.3, -0.7], [0.0, 1.5]])
    v = np.array([[0.2, -0.4], [1.0, 0.5], [-0.6, 0.1]])
    z_beta = np.array([[0.0, 1.0], [-1.0, 0.5], [2.0, -2.0]])
    q, k = l2n(np.tanh(q_raw), 1e-6), l2n(np.tanh(k_raw), 1e-6)
    beta = sigmoid(z_beta)
    keep, erase, write = 1.0 - beta, beta, beta  # standard mode, coupled λ
    S0 = np.zeros((2, 2))

    want_reads = np.array([[0.0, 0.0], [0.096921, -0.283420], [-0.286469, -0.345662]])
    want_states = [
        np.array([[0.1, 0.0], [-0.292423, 0.0]]),
        np.array([[0.184811, -0.231747], [0.059052, -0.351556]]),
        np.array([[0.022030, -0.351981], [0.052013, -0.255822]]),
    ]
    reads, S3 = delta_scan(q, k, v, keep, erase, write, S0)
    np.testing.assert_allclose(reads, want_reads, atol=1e-6)
    for t, want in enumerate(want_states, start=1):
        _, St = delta_scan(q[:t], k[:t], v[:t], keep[:t], erase[:t], write[:t], S0)
        np.testing.assert_allclose(St, want, atol=1e-6)
    np.testing.assert_array_equal(S0, 0.0)  # the input state is not modified

    # resuming from S_1 gives the same tail (the scan is chunkable)
    S1 = want_states[0]
    _, S1_exact = delta_scan(q[:1], k[:1], v[:1], keep[:1], erase[:1], write[:1], S0)
    tail_reads, tail_S = delta_scan(q[1:], k[1:], v[1:], keep[1:], erase[1:], write[1:], S1_exact)
    np.testing.assert_allclose(tail_reads, reads[1:], atol=1e-15)
    np.testing.assert_allclose(tail_S, S3, atol=1e-15)
    assert np.abs(S1_exact - S1).max() < 1e-6


# --------------------------------------------------------------------------------------
# Update-mode table against an independent scalar loop
# --------------------------------------------------------------------------------------


def _independent_scan(x: np.ndarray, lw: dict[str, np.ndarray], rank: int, H: int, mode: str, couple: bool,
                      S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec §1.3-§1.5 with explicit loops; x [T, D], S [H, r, r] -> reads [T, H*r], S_T."""
    S = S.copy()
    reads = np.zeros((len(x), H * rank))
    for t, xt in enumerate(x):
        for h in range(H):
            rows = slice(h * rank, (h + 1) * rank)
            q = np.tanh(lw["memory_q_proj"][rows] @ xt)
            k = np.tanh(lw["memory_k_proj"][rows] @ xt)
            q = q / max(np.sqrt(np.sum(q * q)), 1e-6)
            k = k / max(np.sqrt(np.sum(k * k)), 1e-6)
            v = lw["memory_v_proj"][rows] @ xt
            beta = 1.0 / (1.0 + np.exp(-(lw["beta_proj"][rows] @ xt + lw["beta_bias"][rows])))
            if mode == "no_lambda":
                lam = np.ones(rank)
            elif couple:
                lam = 1.0 - beta
            else:
                lam = 1.0 / (1.0 + np.exp(-(lw["lambda_proj"][rows] @ xt + lw["lambda_bias"][rows])))
            new = np.zeros((rank, rank))
            for i in range(rank):
                reads[t, h * rank + i] = sum(S[h, i, j] * q[j] for j in range(rank))
                pred = sum(S[h, i, j] * k[j] for j in range(rank))
                keep = {"standard": lam[i], "lambda_outside": lam[i], "no_lambda": 1.0}[mode]
                erase = {"standard": beta[i], "lambda_outside": lam[i] * beta[i], "no_lambda": beta[i]}[mode]
                for j in range(rank):
                    new[i, j] = keep * S[h, i, j] - erase * pred * k[j] + beta[i] * v[i] * k[j]
            S[h] = new
    return reads, S


@pytest.mark.parametrize(
    ("mode", "couple"),
    [("standard", True), ("standard", False), ("lambda_outside", True), ("lambda_outside", False),
     ("no_lambda", True)],
)
def test_update_modes_match_independent_loop(tmp_path: Path, models: dict[str, Path], ref_models: dict[str, RefModel],
                                             mode: str, couple: bool) -> None:
    rank, H, layer = 3, 2, 1
    weights = random_adapter_weights(models["qwen3"], rank=rank, state_heads=H, delta_heads="q,k,v,o",
                                     update_mode=mode, couple_lambda=couple, layers=[layer], seed=3)
    path = write_adapter(tmp_path / "a.gguf", models["qwen3"], weights, rank=rank, state_heads=H,
                         update_mode=mode, couple_lambda=couple)
    model = ref_models["qwen3"]
    sess = model.session(RefAdapter(path, model))
    trace: dict = {}
    sess.feed(IDS[:7], trace=trace)

    lw = {k: v.astype(np.float64) for k, v in weights[layer].items()}
    reads, S_T = _independent_scan(trace[f"{layer}.attn_in"], lw, rank, H, mode, couple, np.zeros((H, rank, rank)))
    np.testing.assert_allclose(trace[f"{layer}.reads"], reads, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sess.state()[0], S_T.reshape(H * rank, rank), rtol=0, atol=1e-12)
    np.testing.assert_allclose(trace[f"{layer}.delta_q"], reads @ lw["delta_q_proj"].T * (2 * rank / rank), atol=1e-12)
    assert np.abs(S_T).max() > 1e-2  # the check is not vacuous


# --------------------------------------------------------------------------------------
# Read-before-write, chunk invariance, write-disabled, state round trip
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_first_token_after_reset_equals_base(tmp_path: Path, models: dict[str, Path], ref_models: dict[str, RefModel],
                                             arch: str) -> None:
    model = ref_models[arch]
    path = write_random_adapter(tmp_path / "a.gguf", models[arch], rank=4, state_heads=2, delta_heads="q,k,v,o",
                                delta_o_rmsnorm=True, seed=4)
    base_first, base = model.forward(IDS[:1]), model.forward(IDS[:4])
    sess = model.session(RefAdapter(path, model))
    # δ is exactly 0 at position 0 (every read of S_0 = 0 is 0): bit-identical to the base model
    np.testing.assert_array_equal(sess.feed(IDS[:1]), base_first)
    rest = sess.feed(IDS[1:4])
    assert np.abs(rest - base[1:4]).max() > 1e-3  # ...and the adapter does act afterwards
    sess.reset()
    np.testing.assert_array_equal(sess.feed(IDS[:1]), base_first)
    # a multi-token first call: position 0 still equals the base model (to BLAS blocking noise)
    sess.reset()
    np.testing.assert_allclose(sess.feed(IDS[:4])[0], base[0], rtol=0, atol=1e-12)


def test_smollm3_nope_layers(ref_models: dict[str, RefModel]) -> None:
    """llama.cpp hard-codes SmolLM3's NoPE pattern: every 4th layer (il % 4 == 3) skips RoPE."""
    assert ref_models["smollm3"].hp.use_rope == (True, True, True, False)
    assert ref_models["llama"].hp.rope_type == "norm" and ref_models["qwen3"].hp.rope_type == "neox"


CHUNK_CONFIGS = [
    ("qwen3", dict(rank=4, state_heads=1, delta_heads="q,o")),
    ("qwen3", dict(rank=3, state_heads=2, delta_heads="q,k,v,o", update_mode="lambda_outside", couple_lambda=False)),
    ("smollm3", dict(rank=2, state_heads=4, delta_heads="q,k,v,o", delta_o_rmsnorm=True)),
    ("qwen2", dict(rank=4, state_heads=1, delta_heads="k,v", update_mode="no_lambda", layers=[0])),
]


@pytest.mark.parametrize(("arch", "cfg"), CHUNK_CONFIGS, ids=["qwen3-qo", "qwen3-H2-qkvo-lambda_outside",
                                                          "smollm3-H4-qkvo-rmsnorm", "qwen2-kv-no_lambda-layer0"])
def test_chunk_invariance(tmp_path: Path, models: dict[str, Path], ref_models: dict[str, RefModel], arch: str,
                          cfg: dict) -> None:
    model = ref_models[arch]
    adapter = RefAdapter(write_random_adapter(tmp_path / "a.gguf", models[arch], seed=5, **cfg), model)

    def run(splits: list[int]) -> tuple[np.ndarray, np.ndarray]:
        sess = model.session(adapter)
        bounds = np.cumsum([0, *splits])
        logits = np.concatenate([sess.feed(IDS[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        return logits, sess.state()

    one, S_one = run([12])
    for splits in ([1] * 12, [3, 9], [5, 7]):
        logits, state = run(splits)
        np.testing.assert_allclose(logits, one, rtol=0, atol=1e-10)
        np.testing.assert_allclose(state, S_one, rtol=0, atol=1e-10)
    assert np.abs(S_one).max() > 1e-2


def test_write_false_leaves_state_bit_identical(tmp_path: Path, models: dict[str, Path],
                                                ref_models: dict[str, RefModel]) -> None:
    model = ref_models["qwen3"]
    adapter = RefAdapter(write_random_adapter(tmp_path / "a.gguf", models["qwen3"], rank=3, state_heads=2,
                                              delta_heads="q,k,v,o", seed=6), model)
    sess = model.session(adapter)
    sess.feed(IDS[:5])
    before = sess.state()
    trace: dict = {}
    sess.feed(IDS[5:9], write=False, trace=trace)
    np.testing.assert_array_equal(sess.state(), before)
    # every read-only token reads the same frozen state: read = S_h q_t per head (§1.8)
    H, r = 2, 3
    q = trace["0.mem_q"].reshape(4, H, r)
    S0 = before[0].reshape(H, r, r)
    want = np.einsum("hij,thj->thi", S0, q).reshape(4, H * r)
    np.testing.assert_allclose(trace["0.reads"], want, atol=1e-14)
    # the KV cache still grew, so writing resumes at the right position
    assert sess.n_past == 9
    sess.feed(IDS[9:])
    assert np.abs(sess.state() - before).max() > 1e-3


def test_set_state_resumes_a_run(tmp_path: Path, models: dict[str, Path], ref_models: dict[str, RefModel]) -> None:
    """Spec §10.2 (e): restoring the state after tokens 1..6 and feeding 7..12 equals the single run.

    The KV cache must match too (δ_o changes later layers' K/V), so it is kept and only the
    δ-state is zeroed and restored.
    """
    model = ref_models["llama"]
    adapter = RefAdapter(write_random_adapter(tmp_path / "a.gguf", models["llama"], rank=4, state_heads=2, seed=7),
                         model)
    full = model.session(adapter)
    want = full.feed(IDS)
    resumed = model.session(adapter)
    resumed.feed(IDS[:6])
    saved = resumed.state()
    resumed.reset_state()  # zero the δ-state, keep the KV cache
    np.testing.assert_array_equal(resumed.state(), 0.0)
    resumed.set_state(saved)
    np.testing.assert_allclose(resumed.feed(IDS[6:]), want[6:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(resumed.state(), full.state(), rtol=0, atol=1e-10)
    with pytest.raises(ValueError):
        resumed.set_state(saved[:, :1])


def test_zero_delta_heads_give_base_logits(tmp_path: Path, models: dict[str, Path],
                                           ref_models: dict[str, RefModel]) -> None:
    """Spec §10.2 (d): with all δ heads zero the memory runs but the model is the base model."""
    weights = random_adapter_weights(models["qwen3"], rank=4, delta_heads="q,k,v,o", seed=8)
    for lw in weights.values():
        for h in "qkvo":
            lw[f"delta_{h}_proj"][:] = 0.0
    model = ref_models["qwen3"]
    adapter = RefAdapter(write_adapter(tmp_path / "a.gguf", models["qwen3"], weights, rank=4), model)
    sess = model.session(adapter)
    np.testing.assert_array_equal(sess.feed(IDS), model.forward(IDS))
    assert np.abs(sess.state()).max() > 1e-2


# --------------------------------------------------------------------------------------
# GGUF layout: GDN permutation, bundles, dtypes
# --------------------------------------------------------------------------------------


def test_gdn_permutation_round_trip(tmp_path: Path, models: dict[str, Path], ref_models: dict[str, RefModel]) -> None:
    rank, H = 3, 4
    R = rank * H
    weights = random_adapter_weights(models["qwen3"], rank=rank, state_heads=H, delta_heads="q,k,v,o",
                                     couple_lambda=False, delta_o_rmsnorm=True, seed=9)
    path = write_adapter(tmp_path / "a.gguf", models["qwen3"], weights, rank=rank, state_heads=H,
                         couple_lambda=False)
    loaded = RefAdapter(path, ref_models["qwen3"])
    assert loaded.cfg.R == R and loaded.cfg.layers == (0, 1)
    for bid, lw in weights.items():
        assert set(loaded.layers[bid].w) == set(lw)
        for name, arr in lw.items():
            np.testing.assert_array_equal(loaded.layers[bid].w[name], arr.astype(np.float64), err_msg=name)

    # the file really holds GDN order: upstream row h*rank+i sits at i*H+h
    perm = S.gdn_permutation(rank, H)
    assert perm != list(range(R))
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    w_in, lw = raw[S.TENSOR_IN.format(bid=0)], weights[0]
    assert w_in.shape == (5 * R, ref_models["qwen3"].hp.n_embd)
    for h in range(H):
        for i in range(rank):
            up, g = h * rank + i, i * H + h
            assert S.gdn_index(up, rank, H) == g
            np.testing.assert_array_equal(w_in[up], lw["memory_q_proj"][up])  # q/k stay upstream
            np.testing.assert_array_equal(w_in[R + up], lw["memory_k_proj"][up])
            np.testing.assert_array_equal(w_in[2 * R + g], lw["memory_v_proj"][up])
            np.testing.assert_array_equal(w_in[3 * R + g], lw["beta_proj"][up])
            np.testing.assert_array_equal(w_in[4 * R + g], lw["lambda_proj"][up])
            np.testing.assert_array_equal(raw[S.TENSOR_BETA_BIAS.format(bid=0)][g], lw["beta_bias"][up])
            np.testing.assert_array_equal(raw[S.TENSOR_DELTA["q"].format(bid=0)][:, g], lw["delta_q_proj"][:, up])


def test_bundle_equals_standalone(tmp_path: Path, models: dict[str, Path], ref_models: dict[str, RefModel]) -> None:
    base = models["qwen3"]
    bundle = write_random_adapter(tmp_path / "a.gguf", base, rank=4, state_heads=2, delta_heads="q,v,o",
                                  bundle_into=tmp_path / "bundle.gguf", seed=10)
    assert bundle == tmp_path / "bundle.gguf"
    base_model, bundled_model = ref_models["qwen3"], RefModel(bundle)
    assert bundled_model.has_bundled_adapter and not base_model.has_bundled_adapter
    np.testing.assert_array_equal(bundled_model.forward(IDS), base_model.forward(IDS))

    standalone, inside = RefAdapter(tmp_path / "a.gguf", base_model), bundled_model.bundled_adapter()
    assert inside is not None and inside.cfg == standalone.cfg
    for bid in standalone.cfg.layers:
        assert set(inside.layers[bid].w) == set(standalone.layers[bid].w)
        for name, arr in standalone.layers[bid].w.items():
            np.testing.assert_array_equal(inside.layers[bid].w[name], arr)
    np.testing.assert_array_equal(bundled_model.forward(IDS, inside), base_model.forward(IDS, standalone))
    fields = gguf.GGUFReader(tmp_path / "a.gguf").fields
    assert fields[S.KEY_GENERAL_TYPE].contents() == S.GENERAL_TYPE_ADAPTER
    assert fields[S.KEY_ADAPTER_TYPE].contents() == S.ADAPTER_TYPE
    with pytest.raises(ValueError):
        RefAdapter(base)  # a plain model holds no adapter


def test_adapter_rejects_wrong_model(tmp_path: Path, models: dict[str, Path], ref_models: dict[str, RefModel]) -> None:
    path = write_random_adapter(tmp_path / "a.gguf", models["qwen3"], seed=11)
    with pytest.raises(ValueError):
        RefAdapter(path, ref_models["llama"])


@pytest.mark.parametrize(("ftype", "tol"), [("f16", 0.05), ("q8_0", 0.6)])
def test_low_precision_models_stay_close(tmp_path: Path, ftype: str, tol: float) -> None:
    """f16 / q8_0 fixtures dequantize to (nearly) the f32 weights of the same seed."""
    f32 = RefModel(write_tiny_model(tmp_path / "f32.gguf", "qwen3", seed=2))
    low = RefModel(write_tiny_model(tmp_path / f"{ftype}.gguf", "qwen3", seed=2, ftype=ftype))
    d = np.abs(low.forward(IDS) - f32.forward(IDS)).max()
    assert 0 < d < tol


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_low_precision_adapter_loads(tmp_path: Path, models: dict[str, Path], ref_models: dict[str, RefModel],
                                     dtype: str) -> None:
    weights = random_adapter_weights(models["qwen3"], rank=4, state_heads=2, seed=12)
    path = write_adapter(tmp_path / "a.gguf", models["qwen3"], weights, rank=4, state_heads=2, dtype=dtype)
    loaded = RefAdapter(path, ref_models["qwen3"])
    for name, arr in weights[0].items():
        np.testing.assert_allclose(loaded.layers[0].w[name], arr, rtol=1e-2, atol=1e-3, err_msg=name)
