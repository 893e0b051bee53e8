"""The patched llama.cpp engine against the float64 numpy reference.

Every model and adapter here is built by the test itself (tests/ggufs.py): random
weights, random NON-ZERO adapters (an all-zero adapter would make every check
vacuous), f32 weights and an f32 KV cache so that the engine's float32 graph can
be held to a tight tolerance against the float64 oracle.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from engines import close, count_decodes, exact_engine
from ggufs import (
    write_adapter,
    write_random_adapter,
    write_tiny_model,
    write_unnormalized_qk_adapter,
)

from deltamem_edge import gguf_schema as S
from deltamem_edge.errors import AdapterError, ArgumentError, EngineError
from deltamem_edge.gguf_header import read_gguf_header
from deltamem_edge.reference import RefAdapter, RefModel

RNG_IDS = [int(x) for x in np.random.default_rng(7).integers(0, 256, 24)]
SCANS = ["fused", "standard"]  # Engine(scan=...): the one-op CPU scan and the standard-op graph

# ``tiny`` (tests/conftest.py): one random model per arch, qwen3, llama, qwen2 and smollm3


def _adapter(tiny: Mapping[str, Path], arch: str, tmp_path: Path, **kw) -> Path:
    return write_random_adapter(tmp_path / f"{arch}.dmem.gguf", tiny[arch], **kw)


# ---------------------------------------------------------------------------------------------
# logits and state against the reference
# ---------------------------------------------------------------------------------------------

CASES = [
    ("qwen3", dict(rank=4, state_heads=1, delta_heads="q,o")),
    ("qwen3", dict(rank=8, state_heads=1, delta_heads="q,o")),
    ("qwen3", dict(rank=4, state_heads=4, delta_heads="q,k,v,o")),
    ("qwen3", dict(rank=8, state_heads=4, delta_heads="q,o", delta_o_rmsnorm=True)),
    ("llama", dict(rank=4, state_heads=1, delta_heads="q,o")),
    ("llama", dict(rank=8, state_heads=4, delta_heads="q,k,v,o")),
    ("qwen2", dict(rank=8, state_heads=1, delta_heads="q,v,o")),
    ("smollm3", dict(rank=4, state_heads=2, delta_heads="q,k,o")),
    ("qwen3", dict(rank=4, update_mode="standard", couple_lambda=False)),
    ("qwen3", dict(rank=4, update_mode="lambda_outside", couple_lambda=True)),
    ("qwen3", dict(rank=4, update_mode="lambda_outside", couple_lambda=False)),
    ("llama", dict(rank=4, update_mode="no_lambda")),
    ("qwen3", dict(rank=32, state_heads=1, delta_heads="o")),
    # the engine pads state rows to P = 16 keys up to rank 16 and to 32 above: both sides of the edge
    ("qwen3", dict(rank=16, state_heads=2, delta_heads="q,k,o")),
    ("llama", dict(rank=17, state_heads=1, delta_heads="q,v,o")),
    ("llama", dict(rank=4, layers=[1])),
]


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for a, kw in CASES])
@pytest.mark.parametrize("scan", SCANS)
def test_logits_and_state_match_reference(tiny, tmp_path, arch, kw, scan):
    adapter = _adapter(tiny, arch, tmp_path, seed=11, **kw)
    ref = RefModel(tiny[arch])
    rs = ref.session(RefAdapter(adapter, ref))
    ref_logits = rs.feed(RNG_IDS)
    base_logits = ref.session(None).feed(RNG_IDS)
    # the adapter must matter, or the comparison below proves nothing
    assert np.abs(ref_logits - base_logits).max() > 0.1 * np.abs(base_logits).max()

    with exact_engine(tiny[arch], adapter, scan=scan) as eng:
        s = eng.session()
        close(s.feed(RNG_IDS), ref_logits)
        close(s.state(), rs.state())
        assert s.tokens_written == len(RNG_IDS)


@pytest.mark.parametrize("scan", SCANS)
def test_unnormalized_memory_qk_matches_reference(tiny, tmp_path, scan):
    """normalize_qk=False: raw memory q/k; k is kept small so the delta rule stays contractive."""
    adapter = write_unnormalized_qk_adapter(tmp_path / "raw.dmem.gguf", tiny["qwen3"], rank=4)
    ref = RefModel(tiny["qwen3"])
    rs = ref.session(RefAdapter(adapter, ref))
    ref_logits = rs.feed(RNG_IDS)
    with exact_engine(tiny["qwen3"], adapter, scan=scan) as eng:
        s = eng.session()
        close(s.feed(RNG_IDS), ref_logits)
        close(s.state(), rs.state())


def test_dtype_f16_adapter_matches_reference(tiny, tmp_path):
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=8, dtype="f16", seed=3)
    ref = RefModel(tiny["qwen3"])
    rs = ref.session(RefAdapter(adapter, ref))
    with exact_engine(tiny["qwen3"], adapter) as eng:
        # f16 weights are exact in the reference too; the engine rounds activations to f16 for them
        close(eng.session().feed(RNG_IDS), rs.feed(RNG_IDS), tol=5e-3)


# ---------------------------------------------------------------------------------------------
# invariances
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", SCANS)
def test_chunking_invariance(tiny, tmp_path, scan):
    """One call, token by token, and several ubatches give the same logits and state."""
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=8, state_heads=2)
    with exact_engine(tiny["qwen3"], adapter, scan=scan) as eng:
        s = eng.session()
        whole = s.feed(RNG_IDS)
        whole_state = s.state()
        s.reset()
        single = np.concatenate([s.feed([t]) for t in RNG_IDS])
        single_state = s.state()
        s.reset()
        parts = np.concatenate([s.feed(RNG_IDS[:5]), s.feed(RNG_IDS[5:6]), s.feed(RNG_IDS[6:])])
        parts_state = s.state()
    with exact_engine(tiny["qwen3"], adapter, n_batch=4, scan=scan) as eng4:  # 24 tokens -> 6 ubatches
        s4 = eng4.session()
        ubatched = s4.feed(RNG_IDS)
        ubatched_state = s4.state()
    for logits, state in ((single, single_state), (parts, parts_state), (ubatched, ubatched_state)):
        close(logits, whole, tol=1e-5)
        close(state, whole_state, tol=1e-5)


@pytest.mark.parametrize("scan", SCANS)
def test_get_reset_set_continue_equals_uninterrupted(tiny, tmp_path, scan):
    """The δ-state round trip: get, reset it, set it back, go on = never interrupted (bit for bit)."""
    adapter = _adapter(tiny, "llama", tmp_path, rank=4, state_heads=2)
    a, b = RNG_IDS[:10], RNG_IDS[10:]
    with exact_engine(tiny["llama"], adapter, scan=scan) as eng:
        s = eng.session()
        s.feed(a)
        straight = s.feed(b)
        straight_state = s.state()

        s.reset()
        s.feed(a)
        saved = s.state()
        s.reset_state()
        assert np.abs(s.state()).max() == 0.0
        s.set_state(saved)
        np.testing.assert_array_equal(s.feed(b), straight)
        np.testing.assert_array_equal(s.state(), straight_state)


@pytest.mark.parametrize("scan", SCANS)
def test_memory_regime_state_without_kv(tiny, tmp_path, scan):
    """A new session given a saved state behaves like the old one with its KV cache dropped."""
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=8)
    a, b = RNG_IDS[:14], RNG_IDS[14:]
    ref = RefModel(tiny["qwen3"])
    rs = ref.session(RefAdapter(adapter, ref))
    rs.feed(a)
    ref_state = rs.state()
    fresh = ref.session(RefAdapter(adapter, ref))
    fresh.set_state(ref_state)
    ref_b = fresh.feed(b)
    with exact_engine(tiny["qwen3"], adapter, n_seq_max=2, scan=scan) as eng:
        old = eng.session()
        old.feed(a)
        saved = old.state()
        close(saved, ref_state)
        old.truncate(0)  # KV gone, state kept
        dropped = old.feed(b)
        new = eng.session()
        new.set_state(saved)
        resumed = new.feed(b)
        close(resumed, dropped, tol=1e-5)  # other KV cells: summation order may differ
        close(resumed, ref_b)


@pytest.mark.parametrize("scan", SCANS)
def test_read_only_leaves_state_bit_identical(tiny, tmp_path, scan):
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=8, state_heads=4, delta_heads="q,k,v,o")
    ref = RefModel(tiny["qwen3"])
    rs = ref.session(RefAdapter(adapter, ref))
    rs.feed(RNG_IDS[:12])
    ref_ro = rs.feed(RNG_IDS[12:], write=False)
    with exact_engine(tiny["qwen3"], adapter, scan=scan) as eng:
        s = eng.session()
        s.feed(RNG_IDS[:12])
        before = s.state()
        ro = s.feed(RNG_IDS[12:], write=False)
        after = s.state()
        np.testing.assert_array_equal(before, after)
        assert s.tokens_written == 12
        close(ro, ref_ro)
        close(after, rs.state())


@pytest.mark.parametrize("scan", SCANS)
def test_first_token_after_reset_equals_base_model(tiny, tmp_path, scan):
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=8, delta_heads="q,k,v,o")
    with exact_engine(tiny["qwen3"], False) as base:
        expected = base.session().feed(RNG_IDS[:1])
    with exact_engine(tiny["qwen3"], adapter, scan=scan) as eng:
        s = eng.session()
        s.feed(RNG_IDS)
        s.reset()
        first = s.feed(RNG_IDS[:1])
    np.testing.assert_array_equal(first, expected)  # the first read is exactly 0, so every δ is 0


def test_detached_adapter_gives_the_vanilla_model(tiny, tmp_path):
    adapter = _adapter(tiny, "smollm3", tmp_path, rank=4)
    with exact_engine(tiny["smollm3"], False) as base:
        expected = base.session().feed(RNG_IDS)
    with exact_engine(tiny["smollm3"], adapter) as eng:
        s = eng.session()
        with_memory = s.feed(RNG_IDS)
        assert np.abs(with_memory - expected).max() > 0.1
        eng.detach()
        s.reset()
        np.testing.assert_array_equal(s.feed(RNG_IDS), expected)
        with pytest.raises(EngineError, match="no δ-mem adapter"):
            s.state()


@pytest.mark.parametrize("scan", SCANS)
def test_two_sequences_interleaved_equal_each_alone(tiny, tmp_path, scan):
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=4, state_heads=2)
    x, y = RNG_IDS, [int(t) for t in np.random.default_rng(9).integers(0, 256, 24)]
    with exact_engine(tiny["qwen3"], adapter, scan=scan) as eng:
        s = eng.session()
        alone_x, state_x = s.feed(x), s.state()
        s.reset()
        alone_y, state_y = s.feed(y), s.state()
    with exact_engine(tiny["qwen3"], adapter, n_seq_max=2, scan=scan) as eng2:
        sx, sy = eng2.session(), eng2.session()
        assert sx.seq != sy.seq
        out_x, out_y = [], []
        for i in range(0, 24, 6):
            out_x.append(sx.feed(x[i:i + 6]))
            out_y.append(sy.feed(y[i:i + 6]))
        close(np.concatenate(out_x), alone_x, tol=1e-5)
        close(np.concatenate(out_y), alone_y, tol=1e-5)
        close(sx.state(), state_x, tol=1e-5)
        close(sy.state(), state_y, tol=1e-5)


def test_bundle_equals_standalone_adapter(tiny, tmp_path):
    standalone = _adapter(tiny, "qwen3", tmp_path, rank=4, seed=5)
    bundle = write_random_adapter(tmp_path / "a.dmem.gguf", tiny["qwen3"], rank=4, seed=5,
                                  bundle_into=tmp_path / "bundle.gguf")
    with exact_engine(tiny["qwen3"], standalone) as eng:
        expected = eng.session().feed(RNG_IDS)
    with exact_engine(bundle, None) as eng:  # adapter_path=None: the bundled tensors are found
        assert eng.adapter is not None and eng.adapter.bundled
        np.testing.assert_array_equal(eng.session().feed(RNG_IDS), expected)
    with exact_engine(bundle, False) as eng:  # and the bundle still loads as a plain model
        assert eng.adapter is None


@pytest.mark.parametrize("granularity", S.WRITE_GRANULARITIES)
def test_the_engine_reports_the_write_granularity_the_file_says(tiny, tmp_path, granularity):
    """The engine takes the granularity from the native loader (the file is parsed once per load):
    for a standalone adapter and for a bundle it must be what the file's header says."""
    standalone = tmp_path / "a.dmem.gguf"
    bundle = write_random_adapter(standalone, tiny["qwen3"], rank=4, seed=23, write_granularity=granularity,
                                  bundle_into=tmp_path / "bundle.gguf")
    for model, adapter, path in ((tiny["qwen3"], standalone, standalone), (bundle, None, bundle)):
        says = read_gguf_header(path).get(S.KEY_WRITE_GRANULARITY)
        assert says == granularity
        with exact_engine(model, adapter) as eng:
            assert eng.adapter is not None and eng.adapter.write_granularity == says


# ---------------------------------------------------------------------------------------------
# SSW: segment (message_mean) writes
# ---------------------------------------------------------------------------------------------

MSG_IDS = [-1, -1, 0, 0, 0, 1, 1, -1, 2, 2, 2, 2, -1, 3, 3, 1]  # ids need not be contiguous in a call


@pytest.mark.parametrize("kw", [dict(rank=4), dict(rank=8, state_heads=2, delta_heads="q,k,v,o"),
                                dict(rank=4, update_mode="lambda_outside", couple_lambda=False)],
                         ids=["r4", "r8-msw-qkvo", "lambda-outside-separate"])
@pytest.mark.parametrize("scan", SCANS)
def test_segment_writes_match_reference(tiny, tmp_path, kw, scan):
    adapter = _adapter(tiny, "qwen3", tmp_path, write_granularity="message_mean", seed=21, **kw)
    ref = RefModel(tiny["qwen3"])
    rs = ref.session(RefAdapter(adapter, ref))
    calls = [(RNG_IDS[:16], MSG_IDS), (RNG_IDS[16:20], [4, 4, 5, -1]), (RNG_IDS[20:21], [5]),
             (RNG_IDS[21:24], [-1, -1, -1])]  # the last call has no active token: per-token writes
    with exact_engine(tiny["qwen3"], adapter, scan=scan) as eng:
        s = eng.session()
        for ids, mids in calls:
            close(s.feed(ids, message_ids=mids), rs.feed(ids, message_ids=mids))
            close(s.state(), rs.state())


@pytest.mark.parametrize("scan", SCANS)
def test_segment_reads_use_the_call_start_state(tiny, tmp_path, scan):
    """Inside one SSW call nothing written in that call is visible: logits equal a read-only pass."""
    adapter = _adapter(tiny, "llama", tmp_path, write_granularity="message_mean", seed=22)
    with exact_engine(tiny["llama"], adapter, scan=scan) as eng:
        s = eng.session()
        s.feed(RNG_IDS[:8], message_ids=[0] * 8)
        before = s.state()
        written = s.feed(RNG_IDS[8:], message_ids=[1] * 16)
        after = s.state()
        s.reset()
        s.feed(RNG_IDS[:8], message_ids=[0] * 8)
        np.testing.assert_array_equal(s.state(), before)
        read_only = s.feed(RNG_IDS[8:], write=False)
    np.testing.assert_array_equal(written, read_only)
    assert np.abs(after - before).max() > 1e-3  # but the call did write


def test_segment_call_must_fit_one_batch(tiny, tmp_path):
    adapter = _adapter(tiny, "qwen3", tmp_path, write_granularity="message_mean")
    with exact_engine(tiny["qwen3"], adapter, n_batch=8) as eng:
        s = eng.session()
        with pytest.raises(EngineError, match="must fit one batch"):
            s.feed(RNG_IDS[:12], message_ids=[0] * 12)
        with pytest.raises(EngineError, match="one id per token"):
            s.feed(RNG_IDS[:4], message_ids=[0] * 3)
        assert s.n_past == 0 and np.abs(s.state()).max() == 0.0  # nothing happened


# ---------------------------------------------------------------------------------------------
# the hand-checkable vector of deltamem-math.md §10.1, through the engine
# ---------------------------------------------------------------------------------------------

HAND = {
    "q": np.array([[0.5, -1.0], [2.0, 0.25], [-0.3, 0.8]]),
    "k": np.array([[1.0, 0.0], [0.3, -0.7], [0.0, 1.5]]),
    "v": np.array([[0.2, -0.4], [1.0, 0.5], [-0.6, 0.1]]),
    "z": np.array([[0.0, 1.0], [-1.0, 0.5], [2.0, -2.0]]),
}
HAND_STATES = [
    np.array([[0.1, 0.0], [-0.292423, 0.0]]),
    np.array([[0.184811, -0.231747], [0.059052, -0.351556]]),
    np.array([[0.022030, -0.351981], [0.052013, -0.255822]]),
]


@pytest.mark.parametrize("scan", SCANS)
def test_hand_vector_through_the_engine(tiny, tmp_path, scan):
    """Choose W_in so that layer 0 sees exactly the §10.1 raw projections for 3 tokens."""
    model = tiny["qwen3"]
    ref = RefModel(model)
    tokens = [3, 141, 77]
    emb = ref.w["token_embd.weight"][tokens].astype(np.float64)
    eps = ref.hp.norm_eps
    x = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + eps) * ref.w["blk.0.attn_norm.weight"]
    pinv = np.linalg.pinv(x)  # x @ pinv == I (3 independent 64-vectors)

    def solve(target: np.ndarray) -> np.ndarray:  # W (2, 64) with x @ W.T == target
        return (pinv @ target).T.astype(np.float32)

    rng = np.random.default_rng(0)
    weights = {0: {
        "memory_q_proj": solve(HAND["q"]), "memory_k_proj": solve(HAND["k"]),
        "memory_v_proj": solve(HAND["v"]), "beta_proj": solve(HAND["z"]),
        "beta_bias": np.zeros(2, np.float32),
        "delta_q_proj": rng.normal(0, 0.2, (64, 2)).astype(np.float32),
        "delta_o_proj": rng.normal(0, 0.2, (64, 2)).astype(np.float32),
    }}
    adapter = write_adapter(tmp_path / "hand.dmem.gguf", model, weights, rank=2)
    with exact_engine(model, adapter, scan=scan) as eng:
        s = eng.session()
        for t, expected in zip(tokens, HAND_STATES, strict=True):
            s.feed([t])
            np.testing.assert_allclose(s.state()[0], expected, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# bad adapters: a clear error, and the engine keeps working
# ---------------------------------------------------------------------------------------------


def _lora_file(path: Path, base: Path) -> Path:
    import gguf

    wr = gguf.GGUFWriter(path, "qwen3")
    wr.add_type("adapter")
    wr.add_string("adapter.type", "lora")
    wr.add_float32("adapter.lora.alpha", 8.0)
    wr.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def test_bad_adapters_are_refused_cleanly(tiny, tmp_path):
    good = _adapter(tiny, "qwen3", tmp_path, rank=4)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    wrong_arch = write_random_adapter(tmp_path / "llama.dmem.gguf", tiny["llama"], rank=4)
    other_width = write_tiny_model(tmp_path / "wide.gguf", "qwen3", n_embd=96, n_layer=2)
    wrong_width = write_random_adapter(tmp_path / "wide.dmem.gguf", other_width, rank=4)
    deeper = write_tiny_model(tmp_path / "deep.gguf", "qwen3", n_layer=4)
    too_deep = write_random_adapter(tmp_path / "deep.dmem.gguf", deeper, rank=4, layers=[3])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    cases = {
        _lora_file(tmp_path / "lora.gguf", tiny["qwen3"]): "'lora' adapter, not a δ-mem adapter",
        truncated: "truncated|not a readable GGUF",
        wrong_arch: "architecture 'llama' but the model is 'qwen3'",
        wrong_width: r"shape \[96, 16\] but .* needs \[64, 16\]",
        too_deep: "layer 3 but the model has 2 layers",
        garbage: "not a readable GGUF",
        tiny["qwen3"]: "no δ-mem metadata",
    }
    with exact_engine(tiny["qwen3"], False) as eng:
        s = eng.session()
        expected = s.feed(RNG_IDS[:4])
        for path, pattern in cases.items():
            with pytest.raises(AdapterError, match=pattern) as info:
                eng.attach(path)
            assert str(path) in str(info.value)
            assert eng.adapter is None
        s.reset()
        np.testing.assert_array_equal(s.feed(RNG_IDS[:4]), expected)
        eng.attach(good)  # and a good one still attaches afterwards
        assert eng.adapter is not None


def test_bad_states_are_refused_and_leave_the_state_alone(tiny, tmp_path):
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=4)
    with exact_engine(tiny["qwen3"], adapter) as eng:
        s = eng.session()
        s.feed(RNG_IDS)
        before = s.state()
        bad = before.copy()
        bad[1, 2, 3] = np.nan
        with pytest.raises(EngineError, match="NaN or Inf"):
            s.set_state(bad)
        with pytest.raises(EngineError, match="shape"):
            s.set_state(before[:, :2])
        np.testing.assert_array_equal(s.state(), before)


def test_mixed_sequence_batch_is_refused_not_crashed(tiny, tmp_path):
    """A raw llama_decode with two sequences in one batch gets -1 and a log line, no abort."""
    from deltamem_edge._bindings import llama_lib

    adapter = _adapter(tiny, "qwen3", tmp_path, rank=4)
    with exact_engine(tiny["qwen3"], adapter, n_seq_max=2) as eng:
        batch = llama_lib.llama_batch_init(4, 0, 1)
        try:
            for i in range(4):
                batch.token[i] = RNG_IDS[i]
                batch.pos[i] = i // 2
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = i % 2
                batch.logits[i] = 1
            batch.n_tokens = 4
            assert llama_lib.llama_decode(eng._ctx, batch) == -1
        finally:
            llama_lib.llama_batch_free(batch)
        s = eng.session()  # still usable
        assert s.feed(RNG_IDS[:3]).shape == (3, 256)


def test_tokenizing_without_a_vocabulary_is_an_error_not_an_abort(tiny):
    with exact_engine(tiny["qwen3"], False) as eng:
        assert not eng.has_tokenizer
        with pytest.raises(EngineError, match="no tokenizer"):
            eng.tokenize("hello")


# ---------------------------------------------------------------------------------------------
# batched decode across sessions (Engine.step)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kw", [("qwen3", dict(rank=4, state_heads=2, delta_heads="q,k,v,o")),
                                     ("llama", dict(rank=8, state_heads=1, delta_heads="q,o"))])
@pytest.mark.parametrize("scan", SCANS)
def test_batched_step_equals_one_by_one_and_the_reference(tiny, tmp_path, monkeypatch, arch, kw, scan):
    """Three sessions at different positions, stepped together (and in subsets, and with writes off):
    one llama_decode per step, logits and states equal to the float64 reference and to the one-by-one path."""
    adapter = _adapter(tiny, arch, tmp_path, seed=21, **kw)
    rng = np.random.default_rng(21)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (5, 11, 8)]
    plan = [(tuple(range(3)), True)] * 3 + [((0, 2), True), ((1,), True), ((0, 1, 2), False), ((2, 1), True)]
    plan = [(who, write, [int(t) for t in rng.integers(0, 256, len(who))]) for who, write in plan]

    ref = RefModel(tiny[arch])
    refs = [ref.session(RefAdapter(adapter, ref)) for _ in prompts]
    for rs, p in zip(refs, prompts, strict=True):
        rs.feed(p)
    ref_logits = [{i: refs[i].feed([t], write=write)[0] for i, t in zip(who, toks, strict=True)}
                  for who, write, toks in plan]
    # the adapter must matter at every step, or equal logits would prove nothing about the states
    base = ref.session(None)
    base.feed(prompts[0])
    assert np.abs(ref_logits[0][0] - base.feed([plan[0][2][0]])[0]).max() > 0.05

    calls = count_decodes(monkeypatch)
    results = {}
    for unified in (False, True):
        with exact_engine(tiny[arch], adapter, n_seq_max=4, kv_unified=unified, scan=scan) as eng:
            assert eng.batches_sessions is not unified  # a unified context with an adapter decodes one by one
            ss = [eng.session() for _ in prompts]
            for s, p in zip(ss, prompts, strict=True):
                s.feed(p)
            del calls[:]
            got = []
            for k, (who, write, toks) in enumerate(plan):
                before = [s.state() for s in ss]
                out = eng.step({ss[i]: t for i, t in zip(who, toks, strict=True)}, write=write)
                assert set(out) == {ss[i] for i in who}
                got.append({i: out[ss[i]] for i in who})
                for i in who:
                    close(out[ss[i]], ref_logits[k][i])
                for i in (set(range(3)) - set(who)) if write else range(3):  # untouched or read-only: bit-identical
                    np.testing.assert_array_equal(ss[i].state(), before[i])
            assert calls == ([len(who) for who, _, _ in plan] if not unified else [1] * sum(len(w) for w, _, _ in plan))
            for i, s in enumerate(ss):
                close(s.state(), refs[i].state())
                fed = sum(1 for who, write, _ in plan if i in who)
                assert s.n_past == len(prompts[i]) + fed
                assert s.tokens_written == len(prompts[i]) + sum(1 for who, write, _ in plan if i in who and write)
            results[unified] = got
    for k in range(len(plan)):  # batched against one by one: the same numbers up to summation order
        for i in results[False][k]:
            close(results[False][k][i], results[True][k][i], tol=1e-5)


def test_batched_step_refuses_bad_input_and_changes_nothing(tiny, tmp_path):
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=4, seed=22)
    with exact_engine(tiny["qwen3"], adapter, n_seq_max=3, kv_unified=False) as eng, \
            exact_engine(tiny["qwen3"], adapter) as other:
        a, b, c = eng.session(), eng.session(), eng.session()
        a.feed(RNG_IDS[:4])
        b.feed(RNG_IDS[:6])
        foreign = other.session()
        c.close()
        snapshot = [(s.n_past, s.tokens_written, s.state()) for s in (a, b)]
        bad = [({a: 1, b: 256}, EngineError), ({a: 1, b: -1}, EngineError), ({a: 1, b: 2.0}, EngineError),
               ({a: 1, foreign: 2}, EngineError), ({a: 1, c: 2}, EngineError), ([(a, 1)], EngineError)]
        for tokens, error in bad:
            with pytest.raises(error):
                eng.step(tokens)
            for s, (n_past, written, state) in zip((a, b), snapshot, strict=True):
                assert (s.n_past, s.tokens_written) == (n_past, written)
                np.testing.assert_array_equal(s.state(), state)
        assert eng.step({}) == {}
        assert eng.n_ctx_seq == eng.n_ctx // 3  # one KV stream per session
        a.feed([int(t) for t in np.random.default_rng(5).integers(0, 256, eng.n_ctx_seq - a.n_past)])
        assert a.n_past == eng.n_ctx_seq
        with pytest.raises(EngineError, match="context full"):
            eng.step({a: 1, b: 2})
        assert b.n_past == snapshot[1][0]
        assert set(eng.step({b: 3})) == {b}


@pytest.mark.parametrize("unified", [True, False])
def test_batched_step_without_adapter_matches_the_reference(tiny, monkeypatch, unified):
    """No adapter: stock llama.cpp batches sequences on a unified cache too, so step batches there as well."""
    rng = np.random.default_rng(23)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (3, 9)]
    steps = [[int(t) for t in rng.integers(0, 256, 2)] for _ in range(4)]
    ref = RefModel(tiny["llama"])
    refs = [ref.session(None) for _ in prompts]
    for rs, p in zip(refs, prompts, strict=True):
        rs.feed(p)
    calls = count_decodes(monkeypatch)
    with exact_engine(tiny["llama"], False, n_seq_max=2, kv_unified=unified) as eng:
        assert eng.batches_sessions
        ss = [eng.session() for _ in prompts]
        for s, p in zip(ss, prompts, strict=True):
            s.feed(p)
        del calls[:]
        for toks in steps:
            out = eng.step(dict(zip(ss, toks, strict=True)))
            for s, rs, t in zip(ss, refs, toks, strict=True):
                close(out[s], rs.feed([t])[0])
        assert calls == [2] * len(steps)


# ---------------------------------------------------------------------------------------------
# the two scans: fused CPU op and standard ggml ops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(rank=8, state_heads=1, delta_heads="q,o"),
                                dict(rank=4, state_heads=4, delta_heads="q,k,v,o", update_mode="lambda_outside",
                                     couple_lambda=False)], ids=["tsw-r8", "msw-lambda-outside"])
def test_scans_agree_and_share_the_state_across_a_switch(tiny, tmp_path, kw):
    """auto = fused on a CPU context; both scans agree to float32 rounding, and switching in the middle
    of a conversation continues the same state (the two read and write the same store rows)."""
    adapter = _adapter(tiny, "qwen3", tmp_path, seed=31, **kw)
    ref = RefModel(tiny["qwen3"])
    rs = ref.session(RefAdapter(adapter, ref))
    ref_logits = rs.feed(RNG_IDS)
    runs = {}
    for scan in SCANS:
        with exact_engine(tiny["qwen3"], adapter, scan=scan) as eng:
            assert eng.scan == scan
            s = eng.session()
            runs[scan] = (s.feed(RNG_IDS), s.state())
    for a, b in zip(runs["fused"], runs["standard"], strict=True):
        close(a, b, tol=1e-5, what="fused vs standard")
    with exact_engine(tiny["qwen3"], adapter) as eng:
        assert eng.scan == "fused"  # every δ-mem layer is on the CPU here
        s = eng.session()
        first = s.feed(RNG_IDS[:10])
        eng.scan = "standard"
        second = s.feed(RNG_IDS[10:17])
        eng.scan = "fused"
        third = s.feed(RNG_IDS[17:])
        close(np.concatenate([first, second, third]), ref_logits, what="switched twice")
        close(s.state(), rs.state())


def test_scan_choice_is_checked(tiny, tmp_path):
    adapter = _adapter(tiny, "qwen3", tmp_path, rank=4)
    with pytest.raises(ArgumentError, match="scan must be one of"):
        exact_engine(tiny["qwen3"], adapter, scan="fast")
    with exact_engine(tiny["qwen3"], False) as eng:
        assert eng.scan is None
        with pytest.raises(EngineError, match="no δ-mem adapter"):
            eng.scan = "fused"
    with exact_engine(tiny["qwen3"], adapter, scan="standard") as eng:
        for bad in ("auto", "", None, 1):
            with pytest.raises(ArgumentError, match="scan must be"):
                eng.scan = bad
        assert eng.scan == "standard"
        eng.detach()
        eng.attach(adapter)
        assert eng.scan == "standard"  # the choice holds for the next adapter too
