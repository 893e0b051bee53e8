"""Hugging Face model → GGUF (llama.cpp's converter + quantizer), upstream adapters end to end, ``inspect``, CLI.

The HF checkpoints are tiny random Qwen3 and Llama models built here with
transformers, with REAL tokenizers: llama.cpp's own vocab-only GGUFs
(``ggml-vocab-qwen2.gguf``, ``ggml-vocab-llama-bpe.gguf``) read out of the cached
llama-cpp-python sdist.  Loading them through the tokenizer class directly
(``Qwen2Tokenizer`` / ``PreTrainedTokenizerFast``) takes ~2 s each; going through
``AutoTokenizer`` would parse the whole GGUF a second time (~25 s).  Each HF model
and each f32 conversion is built once per module.

The adapter tests take a genuine upstream adapter (``torch.save`` of the upstream
keys), convert it with ``convert_adapter``, and compare the engine's logits with a
float64 numpy forward pass written in HF order straight from the HF torch weights
and the torch adapter tensors.  For the Llama base that comparison only passes
because the converter permutes the δ_q/δ_k rows the way ``convert_hf_to_gguf``
permutes q_proj/k_proj; the test shows that it fails without it.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engines import exact_engine, rel
from ggufs import write_tiny_model

from deltamem_edge import gguf_schema as S
from deltamem_edge.cli.main import main as cli_main
from deltamem_edge.converter import base_model as base_model_mod
from deltamem_edge.converter.adapter import convert_adapter
from deltamem_edge.converter.base_model import rope_row_permutation
from deltamem_edge.converter.inspect import NO_DMEM, inspect_gguf, read_gguf_header, render_text
from deltamem_edge.converter.model import INSTALL_HINT, convert_model
from deltamem_edge.engine import Engine
from deltamem_edge.errors import ConversionError
from deltamem_edge.reference import (
    AdapterConfig,
    attention,
    delta_outputs,
    delta_scan,
    memory_inputs,
    rms_norm,
    rope,
    silu,
)

torch = pytest.importorskip("torch")

VOCABS = {"qwen3": "ggml-vocab-qwen2.gguf", "llama": "ggml-vocab-llama-bpe.gguf"}
TEXT = "The quick brown fox jumps over the lazy dog. 你好, world! 12345"
HP = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TOL_HF = 1e-4  # max abs logit difference, engine (f32 weights, f32 KV) vs transformers
TOL_REL = 1e-4  # max abs difference / max |reference logit|, engine vs the float64 HF-order reference


# --------------------------------------------------------------------------------------------
# fixtures: vocab files, tiny HF models, their f32 conversions
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deltamem_edge.native.build import VENDOR_PREFIX, fetch_sdist

    d = tmp_path_factory.mktemp("vocab")
    want = {f"{VENDOR_PREFIX}models/{name}": name for name in VOCABS.values()}
    with tarfile.open(fetch_sdist(), "r:gz") as tar:
        for member in tar:
            if member.name in want:
                f = tar.extractfile(member)
                assert f is not None
                (d / want[member.name]).write_bytes(f.read())
    assert sorted(p.name for p in d.iterdir()) == sorted(VOCABS.values())
    return d


def _build_hf(kind: str, vocab_dir: Path, out: Path) -> dict[str, Any]:
    """A tiny random HF checkpoint with a real tokenizer; returns dir, model, tokenizer, config."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("safetensors")
    if kind == "qwen3":
        tok = tf.Qwen2Tokenizer.from_pretrained(str(vocab_dir), gguf_file=VOCABS[kind])
        # intermediate 256: ffn_down rows are 256 wide, so q4_k_m really writes k-quant blocks
        cfg = tf.Qwen3Config(vocab_size=len(tok), intermediate_size=256, rms_norm_eps=1e-6, rope_theta=1e6,
                             tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **HP)
        model = tf.Qwen3ForCausalLM(cfg)
    else:
        tok = tf.PreTrainedTokenizerFast.from_pretrained(str(vocab_dir), gguf_file=VOCABS[kind])
        cfg = tf.LlamaConfig(vocab_size=len(tok), intermediate_size=128, rms_norm_eps=1e-5, rope_theta=1e4,
                             tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, **HP)
        model = tf.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1 if kind == "qwen3" else 2)
    with torch.no_grad():  # the default 0.02 init gives nearly flat logits, which would prove little
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.2 if p.dim() >= 2 else 1.0 + 0.1 * noise)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"dir": out, "model": model, "tok": tok, "cfg": cfg, "kind": kind}


@pytest.fixture(scope="module")
def hf_qwen3(vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _build_hf("qwen3", vocab_dir, tmp_path_factory.mktemp("hf") / "tiny-qwen3")


@pytest.fixture(scope="module")
def hf_llama(vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _build_hf("llama", vocab_dir, tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def qwen3_f32(hf_qwen3: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_model(hf_qwen3["dir"], tmp_path_factory.mktemp("gguf") / "tiny-qwen3-f32.gguf", "f32")


@pytest.fixture(scope="module")
def llama_f32(hf_llama: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf"
    assert cli_main(["convert", "model", str(hf_llama["dir"]), "-o", str(out), "--outtype", "f32"]) == 0
    return out


@pytest.fixture()
def hf_case(request: pytest.FixtureRequest) -> tuple[dict[str, Any], Path]:
    """(HF model dict, its f32 GGUF) for the parametrized kind."""
    kind = request.param
    return request.getfixturevalue(f"hf_{kind}"), request.getfixturevalue(f"{kind}_f32")


def _engine(path: Path, adapter: Path | bool | None = False) -> Engine:
    """tests/engines.py's exact engine (256 positions) on two threads."""
    return exact_engine(path, adapter, n_threads=2)


def _ids(hf: dict[str, Any]) -> list[int]:
    return hf["tok"](TEXT, add_special_tokens=False).input_ids


def _gguf_tensor(path: Path, name: str) -> np.ndarray:
    header = read_gguf_header(path)  # gguf.GGUFReader would spend ~30 s on the 151k-token vocabulary
    return header.tensor_array(next(t for t in header.tensors if t.name == name))


# --------------------------------------------------------------------------------------------
# convert model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hf_case", ["qwen3", "llama"], indirect=True)
def test_f32_logits_match_transformers(hf_case: tuple[dict[str, Any], Path]) -> None:
    hf, path = hf_case
    ids = _ids(hf)
    with torch.no_grad():
        want = hf["model"](torch.tensor([ids])).logits[0].double().numpy()
    with _engine(path) as eng:
        assert eng.tokenize(TEXT) == ids  # llama.cpp's tokenizer (from the converted GGUF) agrees with HF's
        got = eng.session().feed(ids)
    err = float(np.abs(got - want).max())
    print(f"{hf['kind']}: max |engine - transformers| = {err:.2e} (logits up to {np.abs(want).max():.1f})")
    assert err <= TOL_HF
    assert (got.argmax(-1) == want.argmax(-1)).all()
    info = inspect_gguf(path)
    assert info["kind"] == "model" and info["architecture"] == hf["kind"] and info["fingerprint"] is None
    assert info["model"]["file_type_name"] == "ALL_F32"


def test_converted_qk_rows_are_permuted_for_llama_only(hf_qwen3, qwen3_f32, hf_llama, llama_f32) -> None:
    """Our rope_row_permutation is exactly what convert_hf_to_gguf did to the base q/k weights."""
    for hf, path in ((hf_qwen3, qwen3_f32), (hf_llama, llama_f32)):
        attn = hf["model"].model.layers[1].self_attn
        q, k = attn.q_proj.weight.detach().numpy(), attn.k_proj.weight.detach().numpy()
        got_q, got_k = _gguf_tensor(path, "blk.1.attn_q.weight"), _gguf_tensor(path, "blk.1.attn_k.weight")
        if hf["kind"] == "llama":
            assert np.array_equal(got_q, q[rope_row_permutation(4, 16)])
            assert np.array_equal(got_k, k[rope_row_permutation(2, 16)])
            assert not np.array_equal(got_q, q)
        else:
            assert np.array_equal(got_q, q) and np.array_equal(got_k, k)


def test_rope_row_permutation_is_llamas_permute() -> None:
    w = torch.arange(6 * 8 * 3, dtype=torch.float32).reshape(6 * 8, 3)
    for n_head in (1, 3, 6):
        head_dim = w.shape[0] // n_head
        theirs = w.reshape(n_head, 2, head_dim // 2, 3).swapaxes(1, 2).reshape(w.shape)  # LlamaModel.permute
        assert np.array_equal(w.numpy()[rope_row_permutation(n_head, head_dim)], theirs.numpy())


@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m"])
def test_quantized_model_loads_and_generates(hf_qwen3, qwen3_f32, tmp_path: Path, outtype: str) -> None:
    out = convert_model(hf_qwen3["dir"], tmp_path / f"tiny-{outtype}.gguf", outtype, echo=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left behind
    info = inspect_gguf(out)
    assert info["model"]["file_type_name"] == f"MOSTLY_{outtype.upper()}"
    types = {t["dtype"] for t in info["tensors"]}
    assert ({"Q4_K", "Q6_K"} & types) if outtype == "q4_k_m" else ("Q8_0" in types)
    f32_size = qwen3_f32.stat().st_size
    print(f"{outtype}: {out.stat().st_size} bytes (f32: {f32_size})")
    assert out.stat().st_size < 0.4 * f32_size

    ids = _ids(hf_qwen3)
    with _engine(out) as eng, eng.session() as s:
        logits = s.feed(ids, logits="last")
        generated = []
        for _ in range(6):
            assert logits.shape == (1, eng.n_vocab) and np.isfinite(logits).all()
            tok = int(logits[0].argmax())
            assert 0 <= tok < eng.n_vocab
            generated.append(tok)
            logits = s.feed([tok], logits="last")
    with _engine(qwen3_f32) as eng:
        ref = eng.session().feed(ids)[-1]
    with _engine(out) as eng:
        got = eng.session().feed(ids)[-1]
    assert np.corrcoef(ref, got)[0, 1] > 0.9, "the quantized model should still track the f32 one"


def test_convert_model_errors(hf_qwen3, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="unknown outtype 'q3'"):
        convert_model(hf_qwen3["dir"], tmp_path / "x.gguf", "q3")
    with pytest.raises(ConversionError, match="model directory not found"):
        convert_model(tmp_path / "nope", tmp_path / "x.gguf", "f32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert_model(tmp_path / "empty", tmp_path / "x.gguf", "f32")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ConversionError, match=r"convert_hf_to_gguf\.py failed \(exit code 1\)") as ei:
        convert_model(bad, tmp_path / "x.gguf", "f32", echo=None)
    assert "\n" not in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "empty"]  # nothing written, no temp file


def test_missing_convert_extra_is_one_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece → ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConversionError) as ei:
        convert_model(tmp_path, tmp_path / "out.gguf")
    assert "missing: transformers, sentencepiece" in str(ei.value)
    assert ei.value.hint == INSTALL_HINT == "pip install 'deltamem-edge[convert]'"

    assert cli_main(["convert", "model", str(tmp_path), "-o", str(tmp_path / "out.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: converting a Hugging Face model needs")
    assert err[1] == "hint: pip install 'deltamem-edge[convert]'"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# upstream adapter end to end: torch tensors → convert_adapter → engine == HF-order reference
# --------------------------------------------------------------------------------------------

ADAPTERS = {
    # the released configuration: rank 8, one state head, heads q,o, coupled λ
    "qwen3": dict(rank=8, num_state_heads=1, delta_heads=["q", "o"], couple_lambda=True),
    # everything the permutation touches: δ_q and δ_k (k has its own head count), plus v, o, λ, H=2
    "llama": dict(rank=4, num_state_heads=2, delta_heads=["q", "k", "v", "o"], couple_lambda=False),
    # MSW with scalar gates (one per head, expanded by the converter) and trainable per-head scales
    "qwen3-msw": dict(rank=4, num_state_heads=4, delta_heads=["q", "k", "v", "o"], couple_lambda=False,
                      rankwise_gates=False, trainable_delta_scale=True, delta_scale_granularity="head",
                      delta_scale_max=2.0),
}


def write_upstream_adapter(path: Path, hf_cfg: Any, over: dict[str, Any], seed: int) -> dict[str, Any]:
    """An upstream adapter directory (delta_mem_config.json + torch.save of f32 tensors); returns cfg and weights."""
    cfg = {"rank": 8, "alpha": 16.0, "beta_bias_init": -1.5, "normalize_qk": True, "couple_lambda": True,
           "state_update_mode": "standard", "rankwise_gates": True, "output_init": "base_slice_fixed",
           "num_state_heads": 1, "memory_write_granularity": "token", "target_modules": ["self_attn"],
           "target_layers": [], "delta_heads": ["q", "o"], "delta_o_rmsnorm": False, "trainable_delta_scale": False}
    cfg.update(over)
    g = torch.Generator().manual_seed(seed)
    d, hd = hf_cfg.hidden_size, hf_cfg.head_dim
    outs = {"q": hf_cfg.num_attention_heads * hd, "k": hf_cfg.num_key_value_heads * hd,
            "v": hf_cfg.num_key_value_heads * hd, "o": d}
    big_r = cfg["rank"] * cfg["num_state_heads"]
    gates = big_r if cfg["rankwise_gates"] else cfg["num_state_heads"]

    def rnd(*shape: int, std: float = 0.3) -> Any:
        return torch.randn(*shape, generator=g) * std

    weights: dict[str, Any] = {}
    for il in range(hf_cfg.num_hidden_layers):
        p = f"model.layers.{il}.self_attn."
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            weights[p + name] = rnd(big_r, d)
        for h in "qkvo":  # inactive heads are saved as zeros, as upstream does
            weights[p + f"delta_{h}_proj"] = rnd(outs[h], big_r) if h in cfg["delta_heads"] else torch.zeros(outs[h], big_r)
        weights[p + "beta_proj"] = rnd(gates, d)
        weights[p + "beta_bias"] = rnd(gates, std=0.5)
        if not cfg["couple_lambda"]:
            weights[p + "lambda_proj"] = rnd(gates, d)
            weights[p + "lambda_bias"] = rnd(gates, std=0.5)
        if cfg["trainable_delta_scale"]:
            n_scales = 4 if cfg.get("delta_scale_granularity") == "head" else 1
            weights[p + "delta_scale_raw"] = rnd(n_scales, std=1.0)
    path.mkdir(parents=True)
    (path / "delta_mem_config.json").write_text(json.dumps(cfg, indent=2))
    torch.save(weights, path / "delta_mem_adapter.pt")
    return {"cfg": cfg, "weights": weights}


def hf_reference(hf: dict[str, Any], ids: list[int], upstream: dict[str, Any] | None) -> np.ndarray:
    """float64 logits of the HF model (HF row order, rotate_half RoPE) plus δ-mem from the upstream tensors."""
    cfg, kind = hf["cfg"], hf["kind"]
    w = {k: v.detach().double().numpy() for k, v in hf["model"].state_dict().items()}
    nh, nkv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    theta = float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    T, pos = len(ids), np.arange(len(ids))
    acfg = None
    if upstream is not None:
        u = upstream["cfg"]
        acfg = AdapterConfig(
            rank=u["rank"], state_heads=u["num_state_heads"], alpha=u["alpha"], update_mode=u["state_update_mode"],
            couple_lambda=u["couple_lambda"], normalize_qk=u["normalize_qk"], norm_eps=S.DEFAULT_NORM_EPS,
            gate_clamp=S.DEFAULT_GATE_CLAMP, delta_heads=tuple(u["delta_heads"]), delta_o_rmsnorm=False,
            delta_o_rmsnorm_eps=1e-6, write_granularity="token", layers=tuple(range(cfg.num_hidden_layers)),
        )
    x = w["model.embed_tokens.weight"][ids]
    for il in range(cfg.num_hidden_layers):
        p = f"model.layers.{il}."
        a = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (a @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        deltas: dict[str, np.ndarray] = {}
        if acfg is not None:
            lw = {k_[len(p + "self_attn.") :]: t.double().numpy() for k_, t in upstream["weights"].items()
                  if k_.startswith(p + "self_attn.")}
            scale_raw = lw.pop("delta_scale_raw", None)
            lw = {n: t for n, t in lw.items() if not (n.startswith("delta_") and n[6] not in acfg.delta_heads)}
            if not u["rankwise_gates"]:  # one gate per state head, shared by its r rows (§1.4)
                for n in ("beta_proj", "beta_bias", "lambda_proj", "lambda_bias"):
                    if n in lw:
                        lw[n] = np.repeat(lw[n], acfg.rank, axis=0)
            mi = memory_inputs(a, lw, acfg)
            reads = np.empty_like(mi.v)
            for h in range(acfg.state_heads):
                reads[:, h], _ = delta_scan(mi.q[:, h], mi.k[:, h], mi.v[:, h], mi.keep[:, h], mi.erase[:, h],
                                            mi.write[:, h], np.zeros((acfg.rank, acfg.rank)))
            deltas = delta_outputs(reads.reshape(T, acfg.R), lw, acfg)
            if scale_raw is not None:  # c_h = sigmoid(raw[h]) · delta_scale_max (§1.6)
                c = 1.0 / (1.0 + np.exp(-scale_raw)) * u["delta_scale_max"]
                deltas = {h: d_ * c["qkvo".index(h) if len(c) == 4 else 0] for h, d_ in deltas.items()}
            q, k, v = q + deltas.get("q", 0.0), k + deltas.get("k", 0.0), v + deltas.get("v", 0.0)
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        if kind == "qwen3":
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = rope(q, pos, hd, theta, 1.0, "neox"), rope(k, pos, hd, theta, 1.0, "neox")  # HF rotate_half
        o = attention(q, k, v, 0, 1.0 / np.sqrt(hd)).reshape(T, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        x = x + o + deltas.get("o", 0.0)
        f = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = f @ w[p + "mlp.gate_proj.weight"].T, f @ w[p + "mlp.up_proj.weight"].T
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("hf_case,variant", [("qwen3", "qwen3"), ("llama", "llama"), ("qwen3", "qwen3-msw")],
                         indirect=["hf_case"])
def test_upstream_adapter_end_to_end(hf_case, variant: str, tmp_path: Path, monkeypatch) -> None:
    hf, base = hf_case
    kind = hf["kind"]
    ids = _ids(hf)
    up = write_upstream_adapter(tmp_path / "upstream", hf["cfg"], ADAPTERS[variant], seed=5)

    # the HF-order reference is right: without δ-mem it is transformers itself
    with torch.no_grad():
        hf_logits = hf["model"](torch.tensor([ids])).logits[0].double().numpy()
    ref_base = hf_reference(hf, ids, None)
    assert np.abs(ref_base - hf_logits).max() < 1e-4
    ref = hf_reference(hf, ids, up)
    assert rel(ref, ref_base) > 0.05, "the adapter must change the logits, or the comparison proves nothing"

    adapter = convert_adapter(tmp_path / "upstream", base, tmp_path / "a.dmem.gguf")
    with _engine(base, adapter) as eng:
        got = eng.session().feed(ids)
    err = rel(got, ref)
    print(f"{kind}: engine + converted adapter vs HF-order reference: {err:.2e} relative")
    assert err <= TOL_REL
    source = inspect_gguf(adapter)["deltamem"]["source"]
    assert (base_model_mod.ROPE_PERMUTED_NOTE in source) == (kind == "llama")

    if kind == "llama":
        # without the δ_q/δ_k row permutation the same adapter is wrong on a llama base
        monkeypatch.setattr(base_model_mod, "rope_row_permutation",
                            lambda n_head, head_dim: np.arange(n_head * head_dim))
        unpermuted = convert_adapter(tmp_path / "upstream", base, tmp_path / "wrong.dmem.gguf")
        monkeypatch.undo()
        with _engine(base, unpermuted) as eng:
            wrong = eng.session().feed(ids)
        print(f"llama without the permutation: {rel(wrong, ref):.2e} relative")
        assert rel(wrong, ref) > 100 * TOL_REL

    # the bundle made through the CLI gives the same logits (same fingerprint: see test_inspect_*)
    bundle = tmp_path / "bundle.gguf"
    rc = cli_main(["convert", "adapter", str(tmp_path / "upstream"), "--base", str(base), "-o", str(bundle), "--bundle"])
    assert rc == 0
    with _engine(bundle, None) as eng:
        assert eng.adapter is not None and eng.adapter.bundled
        assert np.array_equal(eng.session().feed(ids), got)


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny qwen3 GGUF (tests/ggufs.py), an upstream adapter for it, the adapter GGUF (f16) and a bundle."""
    d = tmp_path_factory.mktemp("small")
    base = write_tiny_model(d / "tiny.gguf", "qwen3")

    class _Cfg:  # the shape fields write_upstream_adapter reads
        hidden_size, head_dim, num_attention_heads, num_key_value_heads, num_hidden_layers = 64, 16, 4, 2, 2

    write_upstream_adapter(d / "upstream", _Cfg, {"rank": 4, "delta_heads": ["q", "o"]}, seed=3)
    adapter = convert_adapter(d / "upstream", base, d / "tiny.dmem.gguf", outtype="f16")
    bundle = convert_adapter(d / "upstream", base, d / "tiny.bundle.gguf", outtype="f16", bundle=True)
    garbage = d / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = d / "truncated.gguf"
    truncated.write_bytes(base.read_bytes()[:2000])
    return {"dir": d, "base": base, "upstream": d / "upstream", "adapter": adapter, "bundle": bundle,
            "garbage": garbage, "truncated": truncated}


def test_inspect_adapter_bundle_and_plain_model(small: dict[str, Path]) -> None:
    a, b, m = (inspect_gguf(small[k]) for k in ("adapter", "bundle", "base"))
    json.dumps([a, b, m])  # JSON-ready

    assert a["kind"] == "adapter" and a["architecture"] == "qwen3" and a["model"] is None
    assert a["deltamem"]["rank"] == 4 and a["deltamem"]["delta_heads"] == "q,o" and a["deltamem"]["layers"] == [0, 1]
    assert a["deltamem"]["norm_eps"] == 1e-6 and a["deltamem"]["couple_lambda"] is True
    assert a["state"] == {"shape": [2, 4, 4], "bytes": 2 * 4 * 4 * 4}
    assert a["totals"]["deltamem_tensors"] == a["totals"]["n_tensors"] == 8 and a["totals"]["base_tensors"] == 0
    dq = next(t for t in a["tensors"] if t["name"] == "blk.0.dmem_dq.weight")
    assert dq == {"name": "blk.0.dmem_dq.weight", "shape": [4, 64], "dtype": "F16", "bytes": 4 * 64 * 2,
                  "n_elements": 256, "deltamem": True}
    assert len(a["fingerprint"]) == 16 and int(a["fingerprint"], 16) >= 0
    assert a["note"] is None and a["problems"] == []

    assert b["kind"] == "bundle" and b["fingerprint"] == a["fingerprint"]  # same δ-mem content, same fingerprint
    assert b["totals"]["deltamem_bytes"] == a["totals"]["deltamem_bytes"]
    assert b["totals"]["base_tensors"] == m["totals"]["n_tensors"] and b["model"]["block_count"] == 2

    assert m["kind"] == "model" and m["deltamem"] is None and m["fingerprint"] is None and m["note"] == NO_DMEM
    assert m["model"] == {"block_count": 2, "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 4,
                          "attention.head_count_kv": 2, "attention.key_length": 16, "attention.value_length": 16,
                          "context_length": 4096, "vocab_size": 256, "file_type": 0, "file_type_name": "ALL_F32"}

    text = render_text(a)
    assert "adapter, qwen3" in text and f"fingerprint    {a['fingerprint']}" in text
    assert "blk.*.dmem_dq.weight" in text and "x2" in text and "0-1 (2 layers)" in text
    assert NO_DMEM in render_text(m) and "blk.*.attn_q.weight" in render_text(m)
    assert "blk.1.dmem_in.weight" in render_text(b, all_tensors=True)


def test_inspect_other_adapter_source(small: dict[str, Path]) -> None:
    other = small["dir"] / "other"
    other.mkdir(exist_ok=True)

    class _Cfg:
        hidden_size, head_dim, num_attention_heads, num_key_value_heads, num_hidden_layers = 64, 16, 4, 2, 2

    write_upstream_adapter(other / "up", _Cfg, {"rank": 4, "delta_heads": ["q", "o"]}, seed=4)
    fp = inspect_gguf(convert_adapter(other / "up", small["base"], other / "o.gguf", outtype="f16"))["fingerprint"]
    assert fp != inspect_gguf(small["adapter"])["fingerprint"]  # other weights, other fingerprint


def test_quantized_bundle_that_lost_its_tensors_is_explained(small: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp's quantizer keeps a bundle's δ-mem keys but drops its δ-mem tensors: say so, keep the model usable."""
    from deltamem_edge.converter.model import quantize
    from deltamem_edge.errors import AdapterError

    quantized = tmp_path / "bundle.q4_0.gguf"
    quantize(small["bundle"], quantized, "q4_0")
    header = read_gguf_header(quantized)
    assert header.get(S.KEY_VERSION) == S.SCHEMA_VERSION  # the keys survived ...
    assert not [t.name for t in header.tensors if S.TENSOR_MARKER in t.name]  # ... the tensors did not

    info = inspect_gguf(quantized)
    assert info["kind"] == "bundle" and len(info["problems"]) == 1 and "dropped them" in info["problems"][0]
    assert inspect_gguf(small["bundle"])["problems"] == []

    lost = "no δ-mem tensors: a tool that rewrote it (llama.cpp's quantizer does) dropped them"
    with pytest.raises(AdapterError) as ei:
        _engine(quantized, None)
    assert str(quantized) in str(ei.value) and lost in str(ei.value) and "bundle it again" in str(ei.value)
    with pytest.raises(AdapterError) as ei:  # any other adapter failure says what it is, not this
        _engine(small["base"], small["garbage"])
    assert lost not in str(ei.value)
    with _engine(quantized, False) as eng:  # the base model itself is intact
        assert eng.adapter is None and np.isfinite(eng.session().feed([1, 2, 3])).all()


@pytest.mark.parametrize("which", ["garbage", "truncated", "empty", "missing", "directory"])
def test_inspect_malformed_file_names_it(small: dict[str, Path], which: str) -> None:
    path = {"empty": small["dir"] / "empty.gguf", "missing": small["dir"] / "missing.gguf",
            "directory": small["dir"]}.get(which) or small[which]
    if which == "empty":
        path.write_bytes(b"")
    with pytest.raises(ConversionError) as ei:
        inspect_gguf(path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_inspect(small: dict[str, Path], capsys) -> None:
    assert cli_main(["inspect", str(small["adapter"])]) == 0
    out = capsys.readouterr().out
    assert "adapter, qwen3" in out and inspect_gguf(small["adapter"])["fingerprint"] in out

    assert cli_main(["inspect", str(small["bundle"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "bundle" and info["deltamem"]["rank"] == 4

    assert cli_main(["inspect", str(small["garbage"])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"error: {small['garbage']}: not a readable GGUF file")
    assert err[1].startswith("hint: ")


def test_cli_convert_adapter(small: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.dmem.gguf"
    argv = ["convert", "adapter", str(small["upstream"]), "--base", str(small["base"]), "-o", str(out)]
    assert cli_main([*argv, "--outtype", "f16"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    assert inspect_gguf(out)["fingerprint"] == inspect_gguf(small["adapter"])["fingerprint"]

    assert cli_main([*argv, "--outtype", "q4_0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown adapter outtype 'q4_0'", "hint: use f32 or f16 (δ-mem weights are tiny)"]

    wide = write_tiny_model(tmp_path / "wide.gguf", "qwen3", n_embd=96, head_dim=24)
    assert cli_main(["convert", "adapter", str(small["upstream"]), "--base", str(wide), "-o", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and "does not fit base model" in err[0]
    assert "needs 96 (n_embd)" in err[0] and err[1].startswith("hint: convert against the base model")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_convert_model_errors(tmp_path: Path, capsys) -> None:
    assert cli_main(["convert", "model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: {tmp_path / 'nope'}: model directory not found" and len(err) <= 2
    assert cli_main(["convert", "model", str(tmp_path), "-o", str(tmp_path / "x.gguf"), "--outtype", "q3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "error: unknown outtype 'q3'" and err[1].startswith("hint: use one of f32, f16, bf16, q8_0, q4_0")


# --------------------------------------------------------------------------------------------
# the fast GGUF header reader (used by inspect and by the adapter converter on base models)
# --------------------------------------------------------------------------------------------


def _all_kinds_gguf(path: Path) -> Path:
    """A qwen3 model GGUF with every metadata value type and tensors of several types and ranks."""
    import gguf

    base = write_tiny_model(path.with_suffix(".base.gguf"), "qwen3", n_vocab=64)
    r = gguf.GGUFReader(base)
    w = gguf.GGUFWriter(path, "qwen3")
    w.add_custom_alignment(64)
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    vt = gguf.GGUFValueType
    for i, (t, v) in enumerate([(vt.UINT8, 7), (vt.INT8, -7), (vt.UINT16, 700), (vt.INT16, -700), (vt.INT32, -70000),
                                (vt.FLOAT32, 0.25), (vt.BOOL, True), (vt.UINT64, 1 << 40), (vt.INT64, -(1 << 40)),
                                (vt.FLOAT64, 1e-300), (vt.STRING, "δ-mem ✓")]):
        w.add_key_value(f"test.scalar{i}", v, t)
    w.add_key_value("test.strings", ["a", "", "ü" * 3], vt.ARRAY, vt.STRING)
    w.add_key_value("test.floats", [1.5, -2.0], vt.ARRAY, vt.FLOAT32)
    w.add_key_value("test.long", list(range(5000)), vt.ARRAY, vt.INT32)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    rng = np.random.default_rng(0)
    w.add_tensor("extra.f16", rng.standard_normal((3, 64)).astype(np.float16))
    w.add_tensor("extra.q8", gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32),
                                                  gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("extra.3d", rng.standard_normal((2, 3, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_reader_matches_gguf_py(tmp_path: Path) -> None:
    import gguf

    path = _all_kinds_gguf(tmp_path / "kinds.gguf")
    r = gguf.GGUFReader(path)
    h = read_gguf_header(path, max_array=None)
    assert h.version == 3 and h.alignment == 64 and h.file_size == path.stat().st_size
    assert list(h.fields) == [k for k in r.fields if not k.startswith("GGUF.")]
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        assert h.types[key] == tuple(int(t) for t in f.types), key
        want = f.contents()
        assert h.fields[key] == (pytest.approx(want) if isinstance(want, float) else want), key
    assert [t.name for t in h.tensors] == [t.name for t in r.tensors]
    for mine, theirs in zip(h.tensors, r.tensors, strict=True):
        assert mine.shape == tuple(int(n) for n in theirs.shape) and mine.ggml_type == int(theirs.tensor_type)
        assert mine.offset == theirs.data_offset and mine.n_bytes == theirs.n_bytes
        assert np.array_equal(np.asarray(h.tensor_bytes(mine)).reshape(-1), np.asarray(theirs.data).view(np.uint8).reshape(-1))
        want = gguf.quants.dequantize(theirs.data, theirs.tensor_type).reshape(tuple(reversed(mine.shape)))
        assert np.array_equal(h.tensor_array(mine), want.astype(np.float32)), mine.name
    short = read_gguf_header(path)  # default: arrays over 4096 items are skipped, not decoded
    assert str(short.fields["test.long"]) == "[5000 items]" and short.fields["test.strings"] == ["a", "", "üüü"]


def test_bundle_of_base_with_3d_and_quantized_tensors_is_byte_exact(small: dict[str, Path], tmp_path: Path) -> None:
    import gguf

    base = _all_kinds_gguf(tmp_path / "kinds.gguf")
    out = convert_adapter(small["upstream"], base, tmp_path / "b.gguf", bundle=True)
    rb, ro = gguf.GGUFReader(base), gguf.GGUFReader(out)
    got = {t.name: t for t in ro.tensors}
    for t in rb.tensors:
        g = got[t.name]
        assert g.tensor_type == t.tensor_type and list(g.shape) == list(t.shape), t.name
        assert np.asarray(g.data).tobytes() == np.asarray(t.data).tobytes(), t.name
    assert ro.alignment == 64
    for key, f in rb.fields.items():
        if not key.startswith("GGUF."):
            assert ro.fields[key].contents() == f.contents(), key


def test_header_reader_never_crashes_on_damage(small: dict[str, Path], tmp_path: Path) -> None:
    """Every truncation inside the header and random byte damage give ConversionError (or a clean parse)."""
    data = small["adapter"].read_bytes()
    header_end = read_gguf_header(small["adapter"]).data_offset
    bad = tmp_path / "bad.gguf"
    for cut in range(0, header_end, 5):
        bad.write_bytes(data[:cut])
        with pytest.raises(ConversionError) as ei:
            read_gguf_header(bad)
        assert str(bad) in str(ei.value)
    rng = np.random.default_rng(1)
    for _ in range(300):
        damaged = bytearray(data)
        for pos in rng.integers(4, header_end, 3):
            damaged[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(damaged))
        try:
            read_gguf_header(bad)
        except ConversionError as e:
            assert str(bad) in str(e)
