"""Tests of the upstream-adapter → GGUF converter and its safe readers.

torch is a test-only dependency here: it writes genuine upstream-format inputs
(``torch.save`` zips, safetensors), and the expected GGUF contents are re-derived
in numpy from those torch tensors, independently of the converter's code path.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from deltamem_edge import gguf_schema as S
from deltamem_edge.converter.adapter import convert_adapter, default_output_path
from deltamem_edge.converter.adapter_tensors import build_adapter_tensors
from deltamem_edge.converter.config import DeltaMemConfig, config_from_dict, load_config
from deltamem_edge.converter.safetensors_reader import read_safetensors
from deltamem_edge.converter.torch_zip import read_torch_zip
from deltamem_edge.errors import AdapterError, ConversionError, UnsafeInputError

torch = pytest.importorskip("torch")  # test-only: writes genuine upstream-format inputs

# Base model used throughout: 4 layers, n_embd 64, 4 heads of 16, 2 kv heads.
N_LAYER, N_EMBD, N_HEAD, N_KV, HEAD_DIM = 4, 64, 4, 2, 16
Q_OUT, KV_OUT = N_HEAD * HEAD_DIM, N_KV * HEAD_DIM


# --------------------------------------------------------------------------------------------
# helpers: base GGUF, upstream adapter, expected contents
# --------------------------------------------------------------------------------------------


def write_base_gguf(
    path: Path,
    *,
    arch: str = "qwen3",
    n_layer: int = N_LAYER,
    n_embd: int = N_EMBD,
    with_tensors: bool = False,
    alignment: int | None = None,
) -> Path:
    """A minimal llama.cpp-style base model GGUF: the shape keys, a few extra keys, some tensors."""
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_type("model")
    w.add_name("tiny base")
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.attention.head_count", N_HEAD)
    w.add_uint32(f"{arch}.attention.head_count_kv", N_KV)
    w.add_uint32(f"{arch}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{arch}.attention.value_length", HEAD_DIM)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_array("tokenizer.ggml.tokens", ["<a>", "b", "ç"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    rng = np.random.default_rng(7)
    w.add_tensor("output_norm.weight", rng.standard_normal(n_embd).astype(np.float32))
    if with_tensors:
        w.add_tensor("token_embd.weight", rng.standard_normal((3, n_embd)).astype(np.float16))
        q8 = gguf.quants.quantize(
            rng.standard_normal((Q_OUT, n_embd)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
        )
        w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("blk.0.attn_k.weight", rng.standard_normal((KV_OUT, n_embd)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def upstream_config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "rank": 4,
        "alpha": 8.0,
        "beta_bias_init": -1.5,
        "normalize_qk": True,
        "couple_lambda": True,
        "state_update_mode": "standard",
        "rankwise_gates": True,
        "output_init": "random",
        "num_state_heads": 1,
        "memory_write_granularity": "token",
        "target_modules": ["self_attn"],
        "target_layers": [],
        "delta_heads": ["q", "o"],
        "delta_o_rmsnorm": False,
        "trainable_delta_scale": False,
        "delta_scale_max": 2.0,
        "delta_scale_granularity": "layer",
    }
    cfg.update(over)
    return cfg


def upstream_weights(
    cfg: dict[str, Any], *, layers=range(2), d: int = N_EMBD, dtype=torch.float32, seed: int = 0
) -> dict[str, Any]:
    """Upstream state dict (§1.2 registration order); inactive δ heads are zeros, as upstream saves them."""
    g = torch.Generator().manual_seed(seed)
    r, h = cfg["rank"], cfg["num_state_heads"]
    big_r = r * h
    gate = big_r if cfg["rankwise_gates"] else h
    heads = cfg["delta_heads"].split(",") if isinstance(cfg["delta_heads"], str) else cfg["delta_heads"]

    def rnd(*shape: int, std: float = 0.2) -> Any:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    out: dict[str, Any] = {}
    for il in layers:
        p = f"model.layers.{il}.self_attn."
        if cfg["trainable_delta_scale"]:
            out[p + "delta_scale_raw"] = rnd(4 if cfg["delta_scale_granularity"] == "head" else 1, std=1.0)
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            out[p + name] = rnd(big_r, d)
        for head, n_out in (("q", Q_OUT), ("k", KV_OUT), ("v", KV_OUT), ("o", d)):
            out[p + f"delta_{head}_proj"] = (
                rnd(n_out, big_r) if head in heads else torch.zeros(n_out, big_r, dtype=dtype)
            )
        if cfg["delta_o_rmsnorm"]:
            out[p + "delta_o_rmsnorm_weight"] = (1 + rnd(d)).to(dtype)
        out[p + "beta_proj"] = rnd(gate, d)
        out[p + "beta_bias"] = rnd(gate, std=0.5)
        if not cfg["couple_lambda"]:
            out[p + "lambda_proj"] = rnd(gate, d)
            out[p + "lambda_bias"] = rnd(gate, std=0.5)
    return out


def write_adapter_dir(path: Path, cfg: dict[str, Any], weights: dict[str, Any], *, fmt: str = "pt") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "delta_mem_config.json").write_text(json.dumps(cfg, indent=2))
    if fmt == "pt":
        torch.save(weights, path / "delta_mem_adapter.pt")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "adapter_model.safetensors"))
    return path


def expected_contents(cfg: dict[str, Any], weights: dict[str, Any]) -> tuple[dict[str, np.ndarray], set[str]]:
    """Numpy re-derivation of the schema tensors from the torch tensors; also returns the names of folded heads."""
    r, h = cfg["rank"], cfg["num_state_heads"]
    perm = S.gdn_permutation(r, h)
    heads = cfg["delta_heads"].split(",") if isinstance(cfg["delta_heads"], str) else list(cfg["delta_heads"])
    separate_lambda = cfg["state_update_mode"] != "no_lambda" and not cfg["couple_lambda"]
    layers = sorted({int(k.split(".")[2]) for k in weights})
    out: dict[str, np.ndarray] = {}
    folded: set[str] = set()

    def npf(key: str) -> np.ndarray:
        return weights[key].float().numpy()

    def gate(x: np.ndarray) -> np.ndarray:
        if not cfg["rankwise_gates"]:  # one gate per state head → repeated for its r rows (upstream order)
            x = np.concatenate([np.repeat(x[i : i + 1], r, axis=0) for i in range(h)], axis=0)
        return x[perm]

    for il in layers:
        p = f"model.layers.{il}.self_attn."
        rows = [
            npf(p + "memory_q_proj"),
            npf(p + "memory_k_proj"),
            npf(p + "memory_v_proj")[perm],
            gate(npf(p + "beta_proj")),
        ]
        if separate_lambda:
            rows.append(gate(npf(p + "lambda_proj")))
        out[f"blk.{il}.dmem_in.weight"] = np.concatenate(rows)
        out[f"blk.{il}.dmem_beta.bias"] = gate(npf(p + "beta_bias"))
        if separate_lambda:
            out[f"blk.{il}.dmem_lambda.bias"] = gate(npf(p + "lambda_bias"))
        for idx, head in enumerate("qkvo"):
            if head not in heads:
                continue
            w = npf(p + f"delta_{head}_proj")[:, perm]
            name = f"blk.{il}.dmem_d{head}.weight"
            if cfg["trainable_delta_scale"]:
                raw = weights[p + "delta_scale_raw"].double()
                c = (
                    float(torch.sigmoid(raw[0 if cfg["delta_scale_granularity"] == "layer" else idx]))
                    * cfg["delta_scale_max"]
                )
                w = (w.astype(np.float64) * c).astype(np.float32)
                folded.add(name)
            out[name] = w
        if cfg["delta_o_rmsnorm"] and "o" in heads:
            out[f"blk.{il}.dmem_do_norm.weight"] = npf(p + "delta_o_rmsnorm_weight")
    return out, folded


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields {key: contents}, tensors {name: ReaderTensor}) of a GGUF file."""
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def dir_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    return _base(tmp_path)


def _base(tmp_path: Path, **kw: Any) -> Path:
    d = tmp_path / "models"
    d.mkdir(exist_ok=True)
    return write_base_gguf(d / kw.pop("name", "tiny-qwen3.gguf"), **kw)


# --------------------------------------------------------------------------------------------
# conversion: math and metadata, across config variants
# --------------------------------------------------------------------------------------------

CASES = {
    "r4_H1_qo_coupled_rankwise_f32": (upstream_config(), torch.float32),
    "r8_H4_qkvo_lambda_scalar_headscale_bf16": (
        upstream_config(
            rank=8,
            num_state_heads=4,
            delta_heads="q,k,v,o",
            couple_lambda=False,
            rankwise_gates=False,
            trainable_delta_scale=True,
            delta_scale_granularity="head",
        ),
        torch.bfloat16,
    ),
    "r4_H4_qo_scalar_layerscale_rmsnorm_f16": (
        upstream_config(
            num_state_heads=4,
            rankwise_gates=False,
            trainable_delta_scale=True,
            delta_o_rmsnorm=True,
            delta_scale_max=3.0,
        ),
        torch.float16,
    ),
    "r8_H1_qkvo_lambda_outside_layerscale": (
        upstream_config(
            rank=8,
            delta_heads=["q", "k", "v", "o"],
            couple_lambda=False,
            state_update_mode="lambda_outside",
            trainable_delta_scale=True,
        ),
        torch.float32,
    ),
    "r8_H4_qo_no_lambda_uncoupled_bf16": (
        upstream_config(rank=8, num_state_heads=4, couple_lambda=False, state_update_mode="no_lambda"),
        torch.bfloat16,
    ),
    "r4_H1_qkvo_scalar_headscale_rmsnorm": (
        upstream_config(
            delta_heads=["q", "k", "v", "o"],
            rankwise_gates=False,
            trainable_delta_scale=True,
            delta_scale_granularity="head",
            delta_o_rmsnorm=True,
        ),
        torch.float32,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_matches_numpy_rederivation(tmp_path: Path, base: Path, case: str) -> None:
    cfg, dtype = CASES[case]
    weights = upstream_weights(cfg, dtype=dtype, seed=len(case))
    src = write_adapter_dir(tmp_path / "adapter", cfg, weights)
    out = convert_adapter(src, base, tmp_path / "out.gguf")
    assert out == tmp_path / "out.gguf"

    fields, tensors = read_gguf(out)
    expected, folded = expected_contents(cfg, weights)
    assert set(tensors) == set(expected), "tensor set (dropped heads, λ presence, norm) differs"
    for name, want in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        got = np.asarray(t.data)
        assert got.shape == want.shape, name
        if name in folded:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=name)
        else:  # permutation and expansion are exact; bf16/f16 → f32 is exact
            assert np.array_equal(got, want), name

    heads = cfg["delta_heads"].split(",") if isinstance(cfg["delta_heads"], str) else cfg["delta_heads"]
    assert fields[S.KEY_GENERAL_TYPE] == "adapter"
    assert fields[S.KEY_ADAPTER_TYPE] == "deltamem"
    assert fields[S.KEY_GENERAL_ARCHITECTURE] == "qwen3"
    assert fields[S.KEY_VERSION] == S.SCHEMA_VERSION
    assert fields[S.KEY_RANK] == cfg["rank"]
    assert fields[S.KEY_STATE_HEADS] == cfg["num_state_heads"]
    assert fields[S.KEY_ALPHA] == pytest.approx(cfg["alpha"])
    assert fields[S.KEY_UPDATE_MODE] == cfg["state_update_mode"]
    assert fields[S.KEY_COUPLE_LAMBDA] is cfg["couple_lambda"]
    assert fields[S.KEY_NORMALIZE_QK] is True
    assert fields[S.KEY_NORM_EPS] == pytest.approx(1e-6)
    assert fields[S.KEY_GATE_CLAMP] == pytest.approx(20.0)
    assert fields[S.KEY_DELTA_HEADS] == ",".join(h for h in "qkvo" if h in heads)
    assert fields[S.KEY_DELTA_O_RMSNORM] is cfg["delta_o_rmsnorm"]
    assert fields[S.KEY_DELTA_O_RMSNORM_EPS] == pytest.approx(1e-6)
    assert fields[S.KEY_WRITE_GRANULARITY] == "token"
    assert fields[S.KEY_LAYERS] == [0, 1]
    assert fields[S.KEY_ROW_ORDER] == "gdn"
    assert "delta_mem_adapter.pt" in fields[S.KEY_SOURCE]
    in_rows = tensors["blk.0.dmem_in.weight"].data.shape[0]
    r_rows = cfg["rank"] * cfg["num_state_heads"]
    assert in_rows == (5 if S.uses_lambda_projection(cfg["state_update_mode"], cfg["couple_lambda"]) else 4) * r_rows


def test_gdn_order_and_gate_expansion_by_hand() -> None:
    """Spell out the layout for r=2, H=2 without gdn_permutation: row h*r+i of upstream goes to i*H+h."""
    cfg = config_from_dict(upstream_config(rank=2, num_state_heads=2, rankwise_gates=False, delta_heads="q"))
    d, p = 3, "model.layers.0.self_attn."
    up = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, d), np.float32)  # row value = upstream index
    weights = {
        p + "memory_q_proj": up,
        p + "memory_k_proj": up + 10,
        p + "memory_v_proj": up + 20,
        p + "delta_q_proj": np.tile(np.arange(4, dtype=np.float32), (5, 1)),  # column value = upstream index
        p + "beta_proj": np.array([[100.0] * d, [101.0] * d], np.float32),  # one gate per state head
        p + "beta_bias": np.array([-1.0, -2.0], np.float32),
    }
    meta, t = build_adapter_tensors(weights, cfg)
    dmem_in = t["blk.0.dmem_in.weight"][:, 0]
    assert dmem_in[0:4].tolist() == [0, 1, 2, 3]  # memory q: upstream order
    assert dmem_in[4:8].tolist() == [10, 11, 12, 13]  # memory k: upstream order
    assert dmem_in[8:12].tolist() == [20, 22, 21, 23]  # memory v: (h0,i0) (h1,i0) (h0,i1) (h1,i1)
    assert dmem_in[12:16].tolist() == [100, 101, 100, 101]  # β: head gate repeated per row, GDN order
    assert t["blk.0.dmem_beta.bias"].tolist() == [-1, -2, -1, -2]
    assert t["blk.0.dmem_dq.weight"][0].tolist() == [0, 2, 1, 3]
    assert set(t) == {"blk.0.dmem_in.weight", "blk.0.dmem_beta.bias", "blk.0.dmem_dq.weight"}
    assert meta[S.KEY_DELTA_HEADS] == "q"


def test_rmsnorm_with_folded_o_scale_is_unchanged() -> None:
    """Errata: with delta_o_rmsnorm the o scale is folded before the norm, so the normalised δ_o is the same."""
    cfg_d = upstream_config(delta_o_rmsnorm=True, trainable_delta_scale=True, delta_scale_max=2.0)
    weights = upstream_weights(cfg_d, layers=[0])
    np_w = {k: v.numpy() for k, v in weights.items()}
    _, t = build_adapter_tensors(np_w, config_from_dict(cfg_d))
    reads = np.random.default_rng(1).standard_normal((5, 4))
    perm = S.gdn_permutation(4, 1)
    w_up = np_w["model.layers.0.self_attn.delta_o_proj"].astype(np.float64)
    c = 2.0 / (1 + np.exp(-float(np_w["model.layers.0.self_attn.delta_scale_raw"][0])))

    def rms(x: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    upstream = rms(reads @ w_up.T * 2.0 * c)  # s = alpha/rank = 2
    ours = rms(reads[:, perm] @ t["blk.0.dmem_do.weight"].astype(np.float64).T * 2.0)
    np.testing.assert_allclose(ours, upstream, rtol=1e-5, atol=1e-6)


def test_bf16_input_converts_exactly(tmp_path: Path, base: Path) -> None:
    cfg = upstream_config(rank=8, delta_heads="q,k,v,o")
    weights = upstream_weights(cfg, dtype=torch.bfloat16, seed=3)
    src = write_adapter_dir(tmp_path / "a", cfg, weights)
    _, tensors = read_gguf(convert_adapter(src, base, tmp_path / "o.gguf"))
    p = "model.layers.1.self_attn."
    got_in = np.asarray(tensors["blk.1.dmem_in.weight"].data)
    assert np.array_equal(got_in[:8], weights[p + "memory_q_proj"].float().numpy())
    assert np.array_equal(got_in[8:16], weights[p + "memory_k_proj"].float().numpy())
    assert np.array_equal(np.asarray(tensors["blk.1.dmem_dk.weight"].data), weights[p + "delta_k_proj"].float().numpy())


def test_safetensors_input_equals_pt_input(tmp_path: Path, base: Path) -> None:
    cfg, _ = CASES["r8_H4_qkvo_lambda_scalar_headscale_bf16"]
    weights = upstream_weights(cfg, dtype=torch.bfloat16, seed=11)
    a = convert_adapter(write_adapter_dir(tmp_path / "pt", cfg, weights), base, tmp_path / "a.gguf")
    b = convert_adapter(write_adapter_dir(tmp_path / "st", cfg, weights, fmt="st"), base, tmp_path / "b.gguf")
    fa, ta = read_gguf(a)
    fb, tb = read_gguf(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert np.array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data)), name
    assert {k: v for k, v in fa.items() if k not in (S.KEY_SOURCE, S.KEY_GENERAL_NAME)} == {
        k: v for k, v in fb.items() if k not in (S.KEY_SOURCE, S.KEY_GENERAL_NAME)
    }


def test_outtype_f16_and_default_output_path(tmp_path: Path, base: Path) -> None:
    cfg = upstream_config(couple_lambda=False, delta_o_rmsnorm=True)
    weights = upstream_weights(cfg, seed=5)
    out = convert_adapter(write_adapter_dir(tmp_path / "a", cfg, weights), base, outtype="f16")
    assert out == base.with_name("tiny-qwen3.dmem.gguf") == default_output_path(base)
    _, tensors = read_gguf(out)
    expected, _ = expected_contents(cfg, weights)
    for name, want in expected.items():
        t = tensors[name]
        if want.ndim == 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            assert np.array_equal(np.asarray(t.data), want.astype(np.float16)), name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            assert np.array_equal(np.asarray(t.data), want), name
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]


def test_bundle_copies_base_byte_for_byte(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tensors=True, alignment=64)
    cfg = upstream_config(num_state_heads=4, delta_heads="q,k,v,o")
    weights = upstream_weights(cfg, layers=range(4), seed=9)
    out = convert_adapter(write_adapter_dir(tmp_path / "a", cfg, weights), base, bundle=True, outtype="f16")
    assert out == base.with_name("tiny-qwen3.dmem-bundle.gguf")

    base_fields, base_tensors = read_gguf(base)
    fields, tensors = read_gguf(out)
    for key, value in base_fields.items():
        assert fields[key] == value, key
    assert fields[S.KEY_GENERAL_TYPE] == "model"  # still a model file, not an adapter
    assert fields[S.KEY_RANK] == 4 and fields[S.KEY_LAYERS] == [0, 1, 2, 3]
    assert gguf.GGUFReader(out).alignment == 64
    for name, t in base_tensors.items():
        assert tensors[name].tensor_type == t.tensor_type, name
        assert np.asarray(tensors[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    expected, _ = expected_contents(cfg, weights)
    assert set(tensors) == set(base_tensors) | set(expected)
    for name, want in expected.items():
        assert np.array_equal(np.asarray(tensors[name].data), want.astype(np.float16) if want.ndim == 2 else want)


def test_two_layer_adapter_fits_four_layer_base_but_layer_5_does_not(tmp_path: Path, base: Path) -> None:
    cfg = upstream_config()
    ok = convert_adapter(
        write_adapter_dir(tmp_path / "ok", cfg, upstream_weights(cfg, layers=[0, 1])), base, tmp_path / "ok.gguf"
    )
    assert read_gguf(ok)[0][S.KEY_LAYERS] == [0, 1]

    bad = write_adapter_dir(tmp_path / "bad", cfg, upstream_weights(cfg, layers=[1, 5]))
    with pytest.raises(AdapterError) as ei:
        convert_adapter(bad, base, tmp_path / "bad.gguf")
    msg = str(ei.value)
    assert "layer 5" in msg and "block_count is 4" in msg
    assert not (tmp_path / "bad.gguf").exists()


def test_shape_mismatches_are_all_reported_with_both_numbers(tmp_path: Path) -> None:
    base = _base(tmp_path, n_embd=96)
    cfg = upstream_config()
    src = write_adapter_dir(tmp_path / "a", cfg, upstream_weights(cfg, d=N_EMBD))
    before = dir_listing(base.parent)
    with pytest.raises(AdapterError) as ei:
        convert_adapter(src, base)
    msg = str(ei.value)
    assert "D = 64" in msg and "needs 96 (n_embd)" in msg  # hidden size
    assert "δ_o has 64 outputs" in msg  # δ_o out, reported in the same error
    assert "δ_q has 64 outputs but the base needs 96 (n_head*head_dim_k = 4*16)" not in msg  # q uses key_length: fits
    assert dir_listing(base.parent) == before


def test_unsupported_architecture(tmp_path: Path) -> None:
    base = _base(tmp_path, arch="gpt2")
    cfg = upstream_config()
    with pytest.raises(AdapterError, match="gpt2"):
        convert_adapter(write_adapter_dir(tmp_path / "a", cfg, upstream_weights(cfg)), base, tmp_path / "o.gguf")


def test_unknown_and_missing_keys(tmp_path: Path, base: Path) -> None:
    cfg = upstream_config()
    w = upstream_weights(cfg)
    w["model.layers.0.self_attn.mystery"] = torch.zeros(2)
    w["lm_head.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"mystery.*lm_head\.weight|lm_head\.weight.*mystery"):
        convert_adapter(write_adapter_dir(tmp_path / "u", cfg, w), base, tmp_path / "o.gguf")

    w = upstream_weights(cfg)
    del w["model.layers.1.self_attn.beta_bias"]
    del w["model.layers.0.self_attn.delta_q_proj"]
    with pytest.raises(ConversionError) as ei:
        convert_adapter(write_adapter_dir(tmp_path / "m", cfg, w), base, tmp_path / "o.gguf")
    assert "layer 0: missing delta_q_proj" in str(ei.value) and "layer 1: missing beta_bias" in str(ei.value)

    # an inactive head may be absent (Q9), a stray lambda with couple_lambda=true may not
    w = upstream_weights(cfg)
    del w["model.layers.0.self_attn.delta_k_proj"]
    w["model.layers.1.self_attn.lambda_bias"] = torch.zeros(4)
    with pytest.raises(ConversionError, match="unexpected lambda_bias"):
        convert_adapter(write_adapter_dir(tmp_path / "x", cfg, w), base, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_wrong_shape_for_config(tmp_path: Path, base: Path) -> None:
    cfg = upstream_config()
    w = upstream_weights(upstream_config(rank=8))  # weights of rank 8, config says 4
    with pytest.raises(ConversionError, match=r"memory_q_proj has shape \(8, 64\), expected \(4, 64\)"):
        convert_adapter(write_adapter_dir(tmp_path / "a", cfg, w), base, tmp_path / "o.gguf")


def test_dropped_nonzero_head_warns() -> None:
    cfg_d = upstream_config()
    w = {k: v.numpy() for k, v in upstream_weights(cfg_d, layers=[0]).items()}
    w["model.layers.0.self_attn.delta_v_proj"] = np.ones_like(w["model.layers.0.self_attn.delta_v_proj"])
    with pytest.warns(UserWarning, match="delta_v_proj is not all zero"):
        _, t = build_adapter_tensors(w, config_from_dict(cfg_d))
    assert "blk.0.dmem_dv.weight" not in t and "blk.0.dmem_dk.weight" not in t


# --------------------------------------------------------------------------------------------
# hostile or broken inputs: refused, nothing executed, nothing written
# --------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, cmd: str, fn: Any) -> None:
        self.cmd, self.fn = cmd, fn

    def __reduce__(self) -> Any:
        return (self.fn, (self.cmd,))


def _replace_pickle(pt: Path, payload: bytes) -> None:
    """Swap data.pkl of a genuine torch.save zip, keeping every other entry (byteorder, data/*, version)."""
    with zipfile.ZipFile(pt) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(pt, "w") as z:
        for info, data in entries:
            z.writestr(info, payload if info.filename.endswith("/data.pkl") else data)


def _globals_in(payload: bytes) -> list[str]:
    found, strings = [], []
    for op, arg, _ in pickletools.genops(payload):
        if op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.append(".".join(strings[-2:]))
    return found


@pytest.mark.parametrize(("fn", "protocol"), [(os.system, 2), (eval, 4)], ids=["os.system-GLOBAL", "eval-STACK_GLOBAL"])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path: Path, base: Path, fn: Any, protocol: int) -> None:
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w').close()"
    cfg = upstream_config()
    src = write_adapter_dir(tmp_path / "evil", cfg, upstream_weights(cfg))
    payload = pickle.dumps({"model.layers.0.self_attn.memory_q_proj": _Evil(cmd, fn)}, protocol=protocol)
    gname = f"{fn.__module__}.{fn.__name__}"
    assert gname in _globals_in(payload)  # the payload really would call it under plain pickle.load
    _replace_pickle(src / "delta_mem_adapter.pt", payload)
    out_dir = base.parent
    before = dir_listing(out_dir)

    with pytest.raises(UnsafeInputError) as ei:
        convert_adapter(src, base)
    assert gname in str(ei.value) and "delta_mem_adapter.pt" in str(ei.value)
    assert ei.value.hint
    assert not marker.exists()
    assert dir_listing(out_dir) == before  # no output, no temp file
    with pytest.raises(UnsafeInputError):
        read_torch_zip(src / "delta_mem_adapter.pt")
    assert not marker.exists()


def test_truncated_zip_is_refused(tmp_path: Path, base: Path) -> None:
    cfg = upstream_config()
    src = write_adapter_dir(tmp_path / "t", cfg, upstream_weights(cfg))
    pt = src / "delta_mem_adapter.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    before = dir_listing(base.parent)
    with pytest.raises(ConversionError, match="truncated"):
        convert_adapter(src, base)
    assert dir_listing(base.parent) == before


def _tensor_pickle(size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0, numel: int = 6) -> bytes:
    """Hand-assembled protocol-2 pickle of {'w': tensor} exactly as torch lays it out."""

    def u(s: str) -> bytes:
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def i(n: int) -> bytes:
        return b"J" + struct.pack("<i", n)

    def tup(xs: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(i(x) for x in xs) + b"t"

    return (
        b"\x80\x02}(" + u("w") + b"ctorch._utils\n_rebuild_tensor_v2\n"
        b"((" + u("storage") + b"ctorch\nFloatStorage\n" + u("0") + u("cpu") + i(numel) + b"tQ"
        + i(offset) + tup(size) + tup(stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"Ru."
    )  # fmt: skip


def test_storage_smaller_than_shape_is_refused(tmp_path: Path) -> None:
    pt = tmp_path / "w.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, pt)
    _replace_pickle(pt, _tensor_pickle((2, 3), (3, 1)))
    assert np.array_equal(read_torch_zip(pt)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))  # the layout is right
    for size, stride, offset in (((4, 3), (3, 1), 0), ((2, 3), (3, 1), 1), ((3, 3), (1, 3), 0)):
        _replace_pickle(pt, _tensor_pickle(size, stride, offset))
        with pytest.raises(ConversionError, match="storage 0 smaller than shape"):
            read_torch_zip(pt)
    _replace_pickle(pt, _tensor_pickle((2, 3), (3, 1), numel=7))  # claimed numel disagrees with entry size
    with pytest.raises(ConversionError, match="bytes but its zip entry has 24"):
        read_torch_zip(pt)
    _replace_pickle(pt, _tensor_pickle((2, -3), (3, 1)))
    with pytest.raises(ConversionError, match="invalid size"):
        read_torch_zip(pt)


def test_torch_zip_reads_views_and_dtypes_like_torch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base_t = torch.randn(6, 8, generator=g)
    d = {
        "f32": base_t,
        "transposed": base_t.t(),
        "strided": base_t[1:, ::3],
        "row": base_t[2],
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "bf16_view": torch.randn(5, 7, generator=g).to(torch.bfloat16).t()[2:],
        "f16": torch.randn(3, 4, generator=g).to(torch.float16),
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 4),
    }
    torch.save(d, tmp_path / "x.pt")
    got = read_torch_zip(tmp_path / "x.pt")
    assert set(got) == set(d)
    for k, v in d.items():
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert got[k].dtype == want.dtype and got[k].shape == want.shape and np.array_equal(got[k], want), k
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "sd.pt")  # OrderedDict with BUILD metadata
    assert set(read_torch_zip(tmp_path / "sd.pt")) == {"weight", "bias"}


def test_torch_zip_rejects_big_endian_and_other_dtypes(tmp_path: Path) -> None:
    pt = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2, dtype=torch.float64)}, pt)
    with pytest.raises(ConversionError, match="only float32, float16 and bfloat16"):
        read_torch_zip(pt)
    torch.save({"w": torch.ones(2)}, pt)
    with zipfile.ZipFile(pt) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(pt, "w") as z:
        for info, data in entries:
            z.writestr(info, b"big" if info.filename.endswith("/byteorder") else data)
    with pytest.raises(ConversionError, match="little-endian"):
        read_torch_zip(pt)


def test_safetensors_header_claiming_2_pow_60_bytes_is_refused(tmp_path: Path, base: Path) -> None:
    src = tmp_path / "st"
    src.mkdir()
    (src / "delta_mem_config.json").write_text(json.dumps(upstream_config()))
    bad = src / "adapter.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(ConversionError, match="header length 1152921504606846976 exceeds"):
        read_safetensors(bad)
    before = dir_listing(base.parent)
    with pytest.raises(ConversionError):
        convert_adapter(src, base)
    assert dir_listing(base.parent) == before

    # a tensor claiming 2^60 bytes of data in a small file
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 58], "data_offsets": [0, 1 << 60]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ConversionError, match="data section has 16 bytes"):
        read_safetensors(bad)
    header = json.dumps({"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ConversionError, match="needs 20 bytes"):
        read_safetensors(bad)
    header = json.dumps({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ConversionError, match="only F32, F16 and BF16"):
        read_safetensors(bad)
    bad.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ConversionError, match="truncated"):
        read_safetensors(bad)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def test_config_rank_zero_refused_without_output(tmp_path: Path, base: Path) -> None:
    cfg = upstream_config()
    src = write_adapter_dir(tmp_path / "a", {**cfg, "rank": 0}, upstream_weights(cfg))
    before = dir_listing(base.parent)
    with pytest.raises(ConversionError, match="rank is 0") as ei:
        convert_adapter(src, base)
    assert "delta_mem_config.json" in str(ei.value)
    assert dir_listing(base.parent) == before


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"rank": 33}, "rank is 33"),
        ({"alpha": 0}, "alpha is 0"),
        ({"num_state_heads": 0}, "num_state_heads is 0"),
        ({"state_update_mode": "gdn"}, "state_update_mode"),
        ({"delta_heads": "q,x"}, "unknown delta head"),
        ({"memory_write_granularity": "paragraph"}, "memory_write_granularity"),
        ({"delta_o_rmsnorm_eps": 0.0}, "delta_o_rmsnorm_eps"),
        ({"memory_readout_mode": "reader"}, "memory_readout_mode"),
        ({"memory_write_source": "raw"}, "memory_write_source"),
        ({"num_memory_partitions": 2}, "archived option num_memory_partitions"),
        ({"latent_memory_layers": [3]}, "archived option latent_memory_layers"),
        ({"delta_scale_granularity": "row"}, "delta_scale_granularity"),
        ({"rank": "8"}, "rank must be an integer"),
    ],
)
def test_config_rejects_impossible_values(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        config_from_dict(upstream_config(**over))


def test_config_defaults_unknown_fields_and_heads(tmp_path: Path) -> None:
    p = tmp_path / "delta_mem_config.json"
    p.write_text(json.dumps({"rank": 8, "delta_heads": "q, o", "new_thing": 1, "other": 2, "latent_gate_init": 5}))
    with pytest.warns(UserWarning) as rec:
        cfg = load_config(p)
    assert len(rec) == 1 and "new_thing, other" in str(rec[0].message) and str(p) in str(rec[0].message)
    assert cfg == DeltaMemConfig(rank=8, delta_heads=("q", "o"))
    assert cfg.state_dim == 8 and cfg.delta_scaling == 2.0
    assert config_from_dict({"delta_heads": "none"}).delta_heads == ()
    assert config_from_dict({"delta_heads": ["o", "q"]}).delta_heads == ("q", "o")  # canonical order
    assert config_from_dict({"num_state_heads": 4, "rankwise_gates": False}).gate_dim == 4
