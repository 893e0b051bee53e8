"""``deltamem_edge.train``: the torch δ-mem against the numpy reference and the engine, training, resuming.

The torch forward is what the adapter is trained through; if it meant something
else than the runtime, a trained adapter would not work there.  So it is checked
against the float64 numpy oracle (deltamem_edge.reference) after the real export
path (upstream folder -> converter -> adapter GGUF), with random NON-ZERO weights,
for TSW and MSW, on every trainable arch, over the two-run layout (run 1 written,
run 2 partly read-only), and against the patched engine itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from ggufs import write_tiny_model

from deltamem_edge import Engine
from deltamem_edge.reference import RefAdapter, RefModel
from deltamem_edge.train.data import Example
from deltamem_edge.train.dev import text_probe
from deltamem_edge.train.episodes import TokenEpisode
from deltamem_edge.train.export import export_gguf, upstream_weights
from deltamem_edge.train.loop import CHECKPOINT, TrainConfig, episode_loss, train, written_text_nll
from deltamem_edge.train.model import DeltaMem, DeltaMemModel, DeltaMemSpec, FrozenBase, delta_scan

RUN1 = [1, 5, 9, 30, 7, 2, 100, 41, 17]
RUN2 = [3, 4, 8, 60, 12]
RUN2_WRITES = [False, False, True, True, True]


def randomized(mem: DeltaMem, seed: int, scale: float = 0.3) -> DeltaMem:
    """Every δ-mem weight random and non-zero (an init-only adapter would prove little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mem.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return mem


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("train")
    return {arch: write_tiny_model(d / f"{arch}.gguf", arch, seed=3) for arch in ("llama", "qwen3", "qwen2")}


def _two_runs(model: DeltaMemModel) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(run-1 logits, state after run 1, run-2 logits, state after run 2) from the torch model."""
    with torch.no_grad():
        h1, s1 = model(torch.tensor([RUN1]), torch.arange(len(RUN1))[None], torch.ones(1, len(RUN1), dtype=torch.bool))
        h2, s2 = model(torch.tensor([RUN2]), torch.arange(len(RUN2))[None], torch.tensor([RUN2_WRITES]), s1)
    flat = lambda s: s[0].reshape(s.shape[1], -1, s.shape[-1]).numpy()  # noqa: E731 - [L, H*r, r]
    return model.logits(h1)[0].numpy(), flat(s1), model.logits(h2)[0].numpy(), flat(s2)


def _ref_two_runs(ref: RefModel, adapter: RefAdapter) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    s = ref.session(adapter)
    l1 = s.feed(RUN1)
    st1 = s.state()
    s2 = ref.session(adapter)  # run 2: empty KV, positions from 0, the saved state
    s2.set_state(st1)
    first = RUN2_WRITES.index(True)
    la = s2.feed(RUN2[:first], write=False)
    lb = s2.feed(RUN2[first:], write=True)
    return l1, st1, np.concatenate([la, lb]), s2.state()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
@pytest.mark.parametrize("state_heads,delta_heads,mode", [(1, ("q", "o"), "standard"), (1, ("q", "o"), "no_lambda"),
                                                         (2, ("q", "k", "v", "o"), "standard"),
                                                         (4, ("q", "o"), "no_lambda")])
def test_forward_matches_reference_after_export(tiny: dict[str, Path], tmp_path: Path, arch: str, state_heads: int,
                                                delta_heads: tuple[str, ...], mode: str) -> None:
    base = FrozenBase(tiny[arch])
    spec = DeltaMemSpec(rank=4, state_heads=state_heads, delta_heads=delta_heads, update_mode=mode)
    mem = randomized(DeltaMem(base, spec), 11)
    gguf_path = export_gguf(mem, base, tmp_path / "a.dmem.gguf", outtype="f32")
    ref = RefModel(tiny[arch])
    ours = _two_runs(DeltaMemModel(base.double(), mem.double()))
    theirs = _ref_two_runs(ref, RefAdapter(gguf_path, ref))
    for name, a, b in zip(("run-1 logits", "state 1", "run-2 logits", "state 2"), ours, theirs, strict=True):
        assert rel(a, b) < 1e-9, f"{name}: {rel(a, b):.2e}"
    # the adapter is not inert: its logits differ from the base model's
    base_logits = ref.forward(RUN1)
    assert rel(ours[0], base_logits) > 1e-3


def test_forward_matches_engine(tiny: dict[str, Path], tmp_path: Path) -> None:
    base = FrozenBase(tiny["llama"])
    mem = randomized(DeltaMem(base, DeltaMemSpec(rank=8, state_heads=1)), 12, scale=0.2)
    gguf_path = export_gguf(mem, base, tmp_path / "a.dmem.gguf", outtype="f32")
    l1, st1, l2, st2 = _two_runs(DeltaMemModel(base.double(), mem.double()))
    with Engine(tiny["llama"], gguf_path, n_ctx=64, exact=True) as eng:
        s = eng.session()
        e1 = s.feed(RUN1)
        e_st1 = s.state()
        s.reset()
        s.set_state(e_st1)
        first = RUN2_WRITES.index(True)
        e2 = np.concatenate([s.feed(RUN2[:first], write=False), s.feed(RUN2[first:], write=True)])
        e_st2 = s.state()
    assert rel(e1, l1) < 1e-4 and rel(e2, l2) < 1e-4
    assert rel(e_st1, st1) < 1e-4 and rel(e_st2, st2) < 1e-4


@pytest.mark.parametrize("decay", [True, False])
def test_scan_gradients_match_finite_differences(decay: bool) -> None:
    g = torch.Generator().manual_seed(3)
    B, T, H, r = 2, 5, 2, 3
    q, k, v = (torch.randn(B, T, H, r, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    beta = torch.rand(B, T, H, r, generator=g, dtype=torch.float64, requires_grad=True)
    S0 = torch.randn(B, H, r, r, generator=g, dtype=torch.float64, requires_grad=True)
    write = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    torch.autograd.gradcheck(lambda *a: delta_scan(*a[:4], write, a[4], decay=decay), (q, k, v, beta, S0))


def test_scan_skips_tokens_that_do_not_write() -> None:
    """A token with writes off reads the state and leaves it exactly as it was."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 3, 1, 4, generator=g, dtype=torch.float64) for _ in range(3))
    beta = torch.rand(1, 3, 1, 4, generator=g, dtype=torch.float64)
    S0 = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    reads, S = delta_scan(q, k, v, beta, torch.zeros(1, 3, dtype=torch.bool), S0)
    assert torch.equal(S, S0)
    np.testing.assert_allclose(reads[0, :, 0].numpy(), (S0[0, 0] @ q[0, :, 0].T).T.numpy(), rtol=1e-12)


def test_export_undoes_the_llama_row_order(tiny: dict[str, Path]) -> None:
    """δ_q rows are trained in the GGUF's (permuted) q order and written in HF order."""
    base = FrozenBase(tiny["llama"])
    mem = randomized(DeltaMem(base, DeltaMemSpec(rank=4)), 5)
    hp = base.hp
    w = upstream_weights(mem, base)["model.layers.0.self_attn.delta_q_proj"]
    ours = mem.delta["q"][0].detach().numpy()
    half = hp.head_dim_k // 2
    # HF row h*d + s*half + j is GGUF row h*d + 2*j + s
    for h, s, j in [(0, 0, 0), (0, 1, 0), (1, 0, 3), (hp.n_head - 1, 1, half - 1)]:
        assert np.array_equal(w[h * hp.head_dim_k + s * half + j], ours[h * hp.head_dim_k + 2 * j + s])


# ---------------------------------------------------------------------------------------------
# training on a tiny random model: a toy recall task made of token ids
# ---------------------------------------------------------------------------------------------

def toy_examples(n: int, seed: int) -> list[Example]:
    """Run 1 writes a 'value' token among fillers; run 2 must answer with it (no tokenizer needed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        value = int(rng.integers(200, 208))
        write = [1, *map(int, rng.integers(10, 100, 3)), 150, value, 2]
        read = [1, 160, 161, 2]
        out.append(Example(TokenEpisode(tuple(write), tuple(read), (False, True, True, True), (value, 2),
                                        value_positions=((5,),), asked=0), (0, 1)))
    return out


def toy_config(**kw: object) -> TrainConfig:
    spec = DeltaMemSpec(rank=4, state_heads=1, online_gain=0.5)
    return TrainConfig(spec=spec, steps=30, batch=8, lr=3e-2, bf16=False, checkpoint_every=5, **kw)


def test_tiny_training_lowers_the_loss_and_exports_for_the_engine(tiny: dict[str, Path], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    base = FrozenBase(tiny["llama"])
    examples = toy_examples(64, 1)
    cfg = toy_config()
    model = DeltaMemModel(base, DeltaMem(base, cfg.spec, seed=cfg.seed))
    from deltamem_edge.train.data import collate

    held = collate(toy_examples(32, 2))
    with torch.no_grad():
        before = float(episode_loss(model, held)[0])
    history = train(model, examples, cfg, tmp_path)
    with torch.no_grad():
        after = float(episode_loss(model, held)[0])
    assert len(history) == cfg.steps
    assert after < 0.8 * before, (before, after)
    out = export_gguf(model.mem, base, tmp_path / "toy.dmem.gguf")
    with Engine(tiny["llama"], out, n_ctx=64) as eng:
        assert eng.adapter is not None and eng.adapter.rank == 4
        s = eng.session()
        s.feed(list(examples[0].ep.write_ids))
        assert np.abs(s.state()).max() > 0


def test_interrupted_training_resumes_to_the_same_weights(tiny: dict[str, Path], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    base = FrozenBase(tiny["llama"])
    examples = toy_examples(40, 3)
    cfg = dataclasses.replace(toy_config(), steps=12)

    def fresh() -> DeltaMemModel:
        return DeltaMemModel(base, DeltaMem(base, cfg.spec, seed=cfg.seed))

    straight = fresh()
    train(straight, examples, cfg, tmp_path / "straight")

    class Stop(KeyboardInterrupt):
        pass

    def ctrl_c_at_7(p: object) -> None:
        if p.step == 7:
            raise Stop

    first = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(first, examples, cfg, tmp_path / "resumed", on_step=ctrl_c_at_7)
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert saved["step"] == 7
    second = fresh()  # a new process: starts from the checkpoint, not from scratch
    history = train(second, examples, cfg, tmp_path / "resumed")
    assert [h["step"] for h in history] == list(range(1, 13))
    for (name, a), b in zip(straight.mem.state_dict().items(), second.mem.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_contrast_term_rewards_only_what_the_own_state_gives(tiny: dict[str, Path]) -> None:
    """The margin term is zero when rows share one state (nothing to tell apart) and positive otherwise."""
    from deltamem_edge.train.data import collate

    base = FrozenBase(tiny["llama"])
    model = DeltaMemModel(base, randomized(DeltaMem(base, DeltaMemSpec(rank=4)), 8, scale=0.1))
    batch = collate(toy_examples(6, 9))
    with torch.no_grad():
        plain, details = episode_loss(model, batch)
        shared = details["state"][:1].expand_as(details["state"]).contiguous()
        same, _ = episode_loss(model, batch, state=shared)
        same_c, _ = episode_loss(model, batch, state=shared, contrast_weight=2.0, contrast_margin=1.0)
        with_c, _ = episode_loss(model, batch, contrast_weight=2.0, contrast_margin=50.0)
    # identical states: every gap is 0, so the term is weight * margin exactly
    assert float(same_c - same) == pytest.approx(2.0, abs=1e-5)
    assert float(with_c) > float(plain)


def test_train_cli_end_to_end_on_smollm2(tmp_path: Path) -> None:
    """`deltamem-edge train` with a tiny budget: folder, GGUF, log, and an adapter the engine runs."""
    import json

    from deltamem_edge.cli.main import main
    from deltamem_edge.defaults import default_model_path

    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--steps", "2", "--batch", "2", "--episodes", "8", "--generic", "0",
               "--facts", "1", "-t", "1"])
    assert rc == 0
    adapter = out / "SmolLM2-135M-Instruct.Q4_1.dmem.gguf"
    assert (out / "adapter" / "delta_mem_config.json").is_file() and adapter.is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [1, 2]
    with Engine(default_model_path(), adapter, n_ctx=128, n_threads=1) as eng:
        assert eng.adapter.rank == 8 and eng.adapter.layers == tuple(range(30))
        s = eng.session()
        s.feed(eng.tokenize("My sister is called Ines."))
        assert np.abs(s.state()).max() > 0


def test_an_architecture_we_cannot_train_is_a_clear_error(tmp_path: Path) -> None:
    """smollm3 loads in the reference but is not in the trainer's list: a ModelLoadError naming the file."""
    from deltamem_edge.errors import ModelLoadError

    path = write_tiny_model(tmp_path / "s.gguf", "smollm3")
    with pytest.raises(ModelLoadError, match="smollm3") as info:
        FrozenBase(path)
    assert info.value.path == path


def test_facts_flag_is_checked_before_any_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from deltamem_edge.cli.main import main

    for bad, says in (("1,12", "each value must be in 1..11"), ("one", "expected comma-separated numbers")):
        assert main(["train", "--out", str(tmp_path / bad), "--facts", bad, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert "--facts" in err and says in err, err
        assert not (tmp_path / bad).exists()  # refused before the run started


def test_precision_is_decided_for_this_cpu_unless_asked() -> None:
    """bf16 only where the CPU multiplies it natively (emulated bf16 is ~50x slower than f32)."""
    from dataclasses import replace

    from deltamem_edge.train.loop import TrainConfig, native_bf16, resolved

    auto = resolved(TrainConfig())
    assert auto.bf16 is native_bf16()
    assert auto.digest() != resolved(replace(TrainConfig(), bf16=not native_bf16())).digest()
    for asked in (True, False):
        assert resolved(replace(TrainConfig(), bf16=asked)).bf16 is asked


def test_update_and_precision_flags_are_checked_before_any_work(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    from deltamem_edge.cli.main import main

    for flags, says in ((["--update", "lambda"], "no_lambda"), (["--precision", "fp8"], "auto, bf16 or f32")):
        out = tmp_path / flags[1]
        assert main(["train", "--out", str(out), "--steps", "1", *flags]) == 2
        err = capsys.readouterr().err
        assert flags[0] in err and says in err, err
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# supervised addressing: the write-gate and key losses against a plain numpy computation
# ---------------------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_addressing_losses_match_numpy() -> None:
    """β BCE and the query-key cosine (with the repel term), written out per row in float64."""
    from deltamem_edge.train.addressing import beta_loss, key_loss

    rng = np.random.default_rng(4)
    B, Tw, Tr, H, r, L = 2, 7, 5, 2, 3, 2
    value_of = np.full((B, Tw), -1)
    value_of[0, [2, 3]] = 0
    value_of[0, 5] = 1
    value_of[1, 1] = 0
    asked = np.array([1, 0])
    write_mask = np.ones((B, Tw), bool)
    write_mask[1, 6] = False  # a pad
    read_writes = np.zeros((B, Tr), bool)
    read_writes[:, 2:] = True
    answer = np.zeros((B, Tr), bool)
    answer[:, 3:] = True
    t1 = [tuple(rng.uniform(0.05, 0.95, (B, Tw, H, r)) if i == 3 else _unit(rng.normal(size=(B, Tw, H, r)))
                for i in range(4)) for _ in range(L)]
    t2 = [tuple(rng.uniform(0.05, 0.95, (B, Tr, H, r)) if i == 3 else _unit(rng.normal(size=(B, Tr, H, r)))
                for i in range(4)) for _ in range(L)]
    want_b, want_k = 0.0, 0.0
    for (_, k1, _, b1), (q2, _, _, b2) in zip(t1, t2, strict=True):
        g1, g2 = b1.mean((2, 3)), b2.mean((2, 3))
        on = (value_of >= 0) & write_mask
        off = (value_of < 0) & write_mask
        want_b += -np.log(g1[on]).mean() - np.log(1 - g1[off]).mean() - np.log(1 - g2[read_writes]).mean()
        asked_cos, other_cos = [], []
        for b in range(B):
            for f in sorted(set(value_of[b][value_of[b] >= 0])):
                key = _unit(k1[b, value_of[b] == f].mean(0))  # [H, r]
                for t in np.flatnonzero(answer[b]):
                    c = float((q2[b, t] * key).sum(-1).mean())
                    (asked_cos if f == asked[b] else other_cos).append(c)
        want_k += (1 - np.mean(asked_cos)) + np.maximum(np.array(other_cos), 0).mean()
    T = lambda tr: [tuple(torch.from_numpy(np.asarray(x)) for x in layer) for layer in tr]  # noqa: E731
    got_b, _, _ = beta_loss(T(t1), T(t2), torch.from_numpy(value_of >= 0), torch.from_numpy(write_mask),
                            torch.from_numpy(read_writes))
    got_k, _ = key_loss(T(t1), T(t2), torch.from_numpy(value_of), torch.from_numpy(asked), torch.from_numpy(answer))
    assert float(got_b) == pytest.approx(want_b / L, rel=1e-5)
    assert float(got_k) == pytest.approx(want_k / L, rel=1e-5)


def test_addressing_training_opens_the_gate_on_values_only(tiny: dict[str, Path], tmp_path: Path) -> None:
    """With the addressing terms on, the write gate opens on the value token and not on the others."""
    torch.set_num_threads(1)
    base = FrozenBase(tiny["llama"])
    cfg = dataclasses.replace(toy_config(addressing_weight=1.0, key_weight=1.0, beta_lr_mult=5.0), steps=15)
    model = DeltaMemModel(base, DeltaMem(base, cfg.spec, seed=cfg.seed))
    history = train(model, toy_examples(48, 6), cfg, tmp_path)
    first, last = history[0], history[-1]
    assert abs(first["beta_on"] - first["beta_off"]) < 0.05, first  # β_proj starts at 0: one gate for all
    assert last["beta_on"] - last["beta_off"] > 0.4, last
    assert last["key_cos"] > first["key_cos"], (first, last)


def _ref_nll(ref: RefModel, adapter: RefAdapter, ids: list[int]) -> float:
    """Mean next-token NLL of ``ids`` read while written, in float64 numpy (the reference runtime)."""
    logits = np.asarray(ref.session(adapter).feed(ids), dtype=np.float64)[:-1]
    top = logits.max(-1, keepdims=True)
    logz = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
    return float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).mean())


def test_written_text_loss_matches_the_reference(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``written_text_nll`` is run 1's next-token loss through the δ-mem reference, pads excluded."""
    base = FrozenBase(tiny["llama"])
    mem = randomized(DeltaMem(base, DeltaMemSpec(rank=4, state_heads=1)), 13, scale=0.3)
    gguf_path = export_gguf(mem, base, tmp_path / "a.dmem.gguf", outtype="f32")
    ref = RefModel(tiny["llama"])
    adapter = RefAdapter(gguf_path, ref)
    short = RUN1[:6]  # a shorter row: its pads must not count
    ep = lambda w: Example(TokenEpisode(tuple(w), tuple(RUN2), tuple(RUN2_WRITES), (RUN2[-1],)), (0, 0))  # noqa: E731
    from deltamem_edge.train.data import collate

    batch = collate([ep(RUN1), ep(short)])
    model = DeltaMemModel(base.double(), mem.double())
    with torch.no_grad():
        pos = torch.arange(batch.write_ids.shape[1]).expand(2, -1)
        got = float(written_text_nll(model, model(batch.write_ids, pos, batch.write_mask)[0], batch))
        bare = DeltaMemModel(base.double(), None)
        got_bare = float(written_text_nll(bare, bare(batch.write_ids, pos, batch.write_mask)[0], batch))
    n1, n2 = len(RUN1) - 1, len(short) - 1
    want = (_ref_nll(ref, adapter, RUN1) * n1 + _ref_nll(ref, adapter, short) * n2) / (n1 + n2)
    assert got == pytest.approx(want, rel=1e-6)  # the loss takes its softmax in float32
    assert abs(got - got_bare) > 1e-3  # the memory really changes the loss (a zero adapter would not)


def test_text_loss_term_keeps_written_text_as_the_base_reads_it(tiny: dict[str, Path], tmp_path: Path) -> None:
    """From a loud random memory that hurts the text it is written from, ``lm_weight`` undoes the harm.

    Two runs from the same weights and data, with and without the term: the answer loss
    alone also shrinks the harm a little, so the test compares the two.
    """
    torch.set_num_threads(1)
    base = FrozenBase(tiny["llama"])
    held = toy_examples(32, 7)
    harm: dict[float, float] = {}
    for weight in (0.0, 1.0):
        cfg = dataclasses.replace(toy_config(lm_weight=weight), steps=20)
        model = DeltaMemModel(base, randomized(DeltaMem(base, cfg.spec, seed=cfg.seed), 14, scale=0.3))
        before = text_probe(model, held)
        assert before["text_nll"] > before["text_nll_base"] + 0.1, before  # the test starts from real harm
        history = train(model, toy_examples(64, 8), cfg, tmp_path / str(weight))
        after = text_probe(model, held)
        harm[weight] = after["text_nll"] - after["text_nll_base"]
        assert ("text_nll" in history[-1]) == (weight > 0)
    assert harm[1.0] < 0.5 * harm[0.0], harm


def _logsoftmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))


def test_question_in_the_told_run_continues_its_context(tiny: dict[str, Path], tmp_path: Path) -> None:
    """An in-context row attends to its run 1 and continues its positions and state, as one conversation.

    The reference is one numpy session fed run 1 then the question and answer; a second row
    of the same batch, asked in a new run, must still read as a new run (empty KV, positions
    from 0), and a shorter run 1 checks that its pads are not attended to.
    """
    base = FrozenBase(tiny["llama"])
    mem = randomized(DeltaMem(base, DeltaMemSpec(rank=4, state_heads=2, delta_heads=("q", "k", "v", "o"))), 21)
    gguf_path = export_gguf(mem, base, tmp_path / "a.dmem.gguf", outtype="f32")
    ref = RefModel(tiny["llama"])
    adapter = RefAdapter(gguf_path, ref)
    short = RUN1[:6]
    answer = [60, 12]
    question = [3, 4, 8]
    ids = question + answer
    targets = (*answer, 9)
    ctx = Example(TokenEpisode(tuple(short), tuple(ids), (True,) * len(ids), targets, in_context=True), (0, 0))
    new_run = Example(TokenEpisode(tuple(RUN1), tuple(RUN2), tuple(RUN2_WRITES), (RUN2[-1],)), (0, 0))
    from deltamem_edge.train.data import collate

    batch = collate([ctx, new_run])
    model = DeltaMemModel(base.double(), mem.double())
    with torch.no_grad():
        _, info = episode_loss(model, batch)
    got = info["logp"].numpy()

    s = ref.session(adapter)
    s.feed(short)
    lp = _logsoftmax(s.feed(ids))  # the same context: KV cache and positions go on
    n = len(targets)
    want_ctx = lp[len(ids) - n + np.arange(n), list(targets)]
    assert got[:n] == pytest.approx(want_ctx, rel=1e-6)  # the log-softmax is taken in float32
    _, _, run2_logits, _ = _ref_two_runs(ref, adapter)
    assert got[n] == pytest.approx(_logsoftmax(run2_logits)[len(RUN2) - 1, RUN2[-1]], rel=1e-6)

    told = ref.session(adapter)
    told.feed(short)
    fresh = ref.session(adapter)  # the same question in a new run on that state reads differently
    fresh.set_state(told.state())
    assert abs(_logsoftmax(fresh.feed(ids))[len(ids) - n, targets[0]] - want_ctx[0]) > 1e-3


def test_prose_read_from_a_told_state_is_a_next_token_loss(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Prose after a told run: every run-2 token predicts the next, from the told state, out of the answer mean."""
    from deltamem_edge.train.data import collate
    from deltamem_edge.train.dev import read_text_nll

    base = FrozenBase(tiny["llama"])
    mem = randomized(DeltaMem(base, DeltaMemSpec(rank=4, state_heads=1)), 22)
    gguf_path = export_gguf(mem, base, tmp_path / "a.dmem.gguf", outtype="f32")
    ref = RefModel(tiny["llama"])
    adapter = RefAdapter(gguf_path, ref)
    window = [1, 40, 41, 42, 7, 8, 90]
    prose = Example(TokenEpisode(tuple(RUN1), tuple(window[:-1]), (True,) * (len(window) - 1), tuple(window[1:]),
                                 "prose-read"), (0, 0), text=True)
    answer = Example(TokenEpisode(tuple(RUN1), tuple(RUN2), tuple(RUN2_WRITES), (RUN2[-1],)), (0, 0))
    model = DeltaMemModel(base.double(), mem.double())
    got = read_text_nll(model, [prose, answer])

    told = ref.session(adapter)
    told.feed(RUN1)
    s = ref.session(adapter)
    s.set_state(told.state())
    lp = _logsoftmax(s.feed(window[:-1]))
    want = -float(lp[np.arange(len(window) - 1), window[1:]].mean())
    assert got == pytest.approx(want, rel=1e-6)

    batch = collate([prose, answer])
    assert batch.text_target.tolist() == [True] * (len(window) - 1) + [False]
    with torch.no_grad():
        loss_answer_only, info = episode_loss(model, batch)
        loss_with_text, _ = episode_loss(model, batch, lm_weight=0.5)
    answer_nll = -float(info["logp"][~batch.text_target].mean())
    assert float(loss_answer_only) == pytest.approx(answer_nll, rel=1e-9)  # text targets stay out of the answer mean
    with torch.no_grad():
        hidden1 = model(batch.write_ids, torch.arange(len(RUN1)).expand(2, -1), batch.write_mask)[0]
        written = float(written_text_nll(model, hidden1, batch))
    assert float(loss_with_text) == pytest.approx(answer_nll + 0.5 * (written + want), rel=1e-6)
