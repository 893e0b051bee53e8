"""Crafted hostile inputs: every declared size is checked against need before it is allocated.

The cases of issue 13 and docs/reliability.md: a 2 MB .pt whose storage inflates to
2 GiB of zeros behind a 2,304-element tensor, a storage larger than its tensors, a
storage key reused with two sizes, strides past the storage, an element count that
overflows int64, a zip with thousands of entries, a pickle memo index that would
make CPython allocate 64 GiB, and the matching safetensors / GGUF / config.json
cases.  Each must be refused with a typed error naming the file, quickly and
without a large allocation (tracemalloc in-process; wait4's peak RSS for the bomb).
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import hostile as H
import numpy as np
import pytest
from test_converter_adapter import upstream_config, upstream_weights, write_adapter_dir, write_base_gguf

from deltamem_edge.converter.adapter import BUDGET_HEADROOM, adapter_read_limits, convert_adapter
from deltamem_edge.converter.base_model import read_base_model
from deltamem_edge.converter.config import config_from_dict
from deltamem_edge.converter.model import _read_hf_config
from deltamem_edge.converter.safetensors_reader import read_safetensors
from deltamem_edge.converter.torch_zip import read_torch_zip
from deltamem_edge.errors import ConversionError, DeltaMemError, GGUFFormatError
from deltamem_edge.gguf_header import read_gguf_header
from deltamem_edge.limits import DEFAULT_READ_LIMITS, MAX_HF_CONFIG_BYTES, ReadLimits

BOMB_BYTES = 2 << 30  # 2 GiB of zeros
D_SMOL = 576  # SmolLM2-135M's hidden size: memory_q_proj of a rank-4 adapter is 4 x 576 = 2,304 elements
BOMB_KEY = "model.layers.0.self_attn.memory_q_proj"


def refused(fn, exc=DeltaMemError, match: str | None = None, peak_mb: float = 32, seconds: float = 1.0):
    """Run ``fn``; it must raise ``exc`` (matching), within ``seconds``, tracing under ``peak_mb`` MB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(exc, match=match) as ei:
            fn()
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    assert peak < peak_mb * 2**20, f"allocated {peak / 2**20:.1f} MB before refusing"
    return ei.value


# ------------------------------------------------------------------------------------------------
# the zip bomb of the issue, end to end through `convert adapter`, in a subprocess
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bomb")
    base = write_base_gguf(d / "base.gguf", n_layer=2, n_embd=D_SMOL)
    cfg = upstream_config()
    weights = {k: v.numpy() for k, v in upstream_weights(cfg, d=D_SMOL).items()}
    good = write_adapter_dir(d / "good", cfg, {})  # config only; the weights are written below
    tensors, storages = H.torch_like_dict(weights)
    H.write(good / "delta_mem_adapter.pt", H.checkpoint(tensors, storages))
    evil = write_adapter_dir(d / "evil", cfg, {})
    key = tensors[BOMB_KEY].storage.key
    assert tensors[BOMB_KEY].size == (4, D_SMOL) and math.prod(tensors[BOMB_KEY].size) == 2304
    tensors[BOMB_KEY].storage.numel = BOMB_BYTES // 4
    entry = H.zeros_bomb(BOMB_BYTES)
    entry.name = f"archive/data/{key}"
    storages[key] = entry
    H.write(evil / "delta_mem_adapter.pt", H.checkpoint(tensors, storages))
    return {"base": base, "good": good, "evil": evil}


def test_the_bomb_is_a_real_bomb_and_its_twin_converts(bomb: dict[str, Path]) -> None:
    import zipfile

    pt = bomb["evil"] / "delta_mem_adapter.pt"
    assert pt.stat().st_size < 3 << 20
    with zipfile.ZipFile(pt) as z:  # zipfile's own view: the entry really declares and inflates to 2 GiB
        info = next(i for i in z.infolist() if i.file_size == BOMB_BYTES)
        with z.open(info) as fh:
            assert fh.read(1 << 20) == bytes(1 << 20)
    out = convert_adapter(bomb["good"], bomb["base"], bomb["good"] / "out.gguf")  # the same adapter, honest
    assert out.stat().st_size > 0


def peak_rss_of(script: str) -> tuple[str, float, float]:
    """Run ``script`` in a fresh interpreter; return (its stdout, peak RSS in MB by wait4, by VmHWM).

    Why a launcher in between: Linux carries the parent's RSS high-water mark across
    fork + exec into the child's ru_maxrss, and this pytest process holds torch
    (~250 MB).  A bare launcher (~10 MB) starts the worker, so the worker's wait4 figure
    is its own; VmHWM (per address space, reset by exec) is read in the worker as a check.
    """
    launcher = textwrap.dedent(
        """
        import json, os, subprocess, sys
        proc = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "out": out, "maxrss_kb": usage.ru_maxrss}))
        """
    )
    res = subprocess.run([sys.executable, "-c", launcher, script], capture_output=True, text=True, check=True)
    r = json.loads(res.stdout)
    assert r["rc"] == 0, r["out"]
    worker = json.loads(r["out"])
    return worker, r["maxrss_kb"] / 1024, worker["vmhwm_kb"] / 1024


_HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"


def test_zip_bomb_is_refused_in_under_a_second_with_small_peak_rss(bomb: dict[str, Path], tmp_path: Path) -> None:
    """`convert adapter` on the bomb in a fresh process: wall time of the call, peak RSS of the process."""
    script = textwrap.dedent(
        f"""
        import json, time
        from deltamem_edge.converter.adapter import convert_adapter
        from deltamem_edge.errors import ConversionError
        t0 = time.perf_counter()
        try:
            convert_adapter({str(bomb["evil"])!r}, {str(bomb["base"])!r}, {str(tmp_path / "out.gguf")!r})
            res = {{"ok": True}}
        except ConversionError as e:
            res = {{"ok": False, "s": time.perf_counter() - t0, "error": str(e)}}
        res["vmhwm_kb"] = {_HWM}
        print(json.dumps(res))
        """
    )
    result, rss_mb, hwm_mb = peak_rss_of(script)
    print(f"bomb refused in {result.get('s', -1):.4f} s, peak RSS {rss_mb:.0f} MB (wait4), {hwm_mb:.0f} MB (VmHWM)")
    assert result["ok"] is False, "the bomb was converted"
    assert "delta_mem_adapter.pt" in result["error"] and "2147483648" in result["error"]
    assert result["s"] < 1.0
    assert rss_mb < 300 and hwm_mb < 300
    assert not (tmp_path / "out.gguf").exists()


def test_peak_rss_of_convert_adapter_is_bounded_by_its_output(bomb: dict[str, Path], tmp_path: Path) -> None:
    """The stated bound of docs/reliability.md on an honest input: peak RSS <= 2 x output + 200 MB."""
    out = tmp_path / "honest.gguf"
    script = textwrap.dedent(
        f"""
        import json
        from deltamem_edge.converter.adapter import convert_adapter
        convert_adapter({str(bomb["good"])!r}, {str(bomb["base"])!r}, {str(out)!r})
        print(json.dumps({{"vmhwm_kb": {_HWM}}}))
        """
    )
    _, rss_mb, _ = peak_rss_of(script)
    assert rss_mb < 2 * out.stat().st_size / 2**20 + 200


# ------------------------------------------------------------------------------------------------
# .pt reader: each check on its own
# ------------------------------------------------------------------------------------------------


def test_stored_storage_larger_than_its_tensor_is_refused_before_reading(tmp_path: Path) -> None:
    """Uncompressed (no ratio to see): 8 MiB of storage behind 2,304 elements."""
    numel = (8 << 20) // 4
    st = H.StorageRef("0", numel)
    pt = H.write(tmp_path / "big.pt", H.checkpoint({"w": H.contiguous(st, (4, D_SMOL))}, {"0": bytes(numel * 4)}))
    err = refused(lambda: read_torch_zip(pt), ConversionError, match="storage 0", peak_mb=4)
    text = str(err)
    assert "archive/data/0" in text and f"{numel} elements" in text and "reach only 2304" in text
    assert str(pt) in text


def test_storage_within_slack_is_accepted(tmp_path: Path) -> None:
    """The slack is real: a view of 2,304 of 2,400 elements (torch saves whole storages of views) reads fine."""
    vals = np.arange(2400, dtype=np.float32)
    st = H.StorageRef("0", 2400)
    pt = H.write(tmp_path / "ok.pt", H.checkpoint({"w": H.contiguous(st, (4, D_SMOL), offset=10)}, {"0": vals.tobytes()}))
    got = read_torch_zip(pt)["w"]
    np.testing.assert_array_equal(got, vals[10 : 10 + 2304].reshape(4, D_SMOL))


def test_zip_entry_of_an_unknown_version_is_a_conversion_error(tmp_path: Path) -> None:
    """Found by `make fuzz`: zipfile raises NotImplementedError ("zip file version 6.4") for a central
    directory entry whose "version needed" it does not know; it must be our typed error naming the file."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"t0": torch.ones(3)}, buf)
    data = bytearray(buf.getvalue())
    assert read_torch_zip(H.write(tmp_path / "ok.pt", bytes(data)))["t0"].tolist() == [1.0, 1.0, 1.0]
    at = data.find(b"PK\x01\x02")  # the first central directory entry; "version needed" is at +6
    assert at >= 0
    struct.pack_into("<H", data, at + 6, 64)
    pt = H.write(tmp_path / "v64.pt", bytes(data))
    err = refused(lambda: read_torch_zip(pt), ConversionError, match="zip file version 6.4")
    assert str(pt) in str(err)


def test_storage_key_reused_with_conflicting_sizes_or_dtypes(tmp_path: Path) -> None:
    for other in (H.StorageRef("0", 7), H.StorageRef("0", 6, "HalfStorage")):
        tensors = {"a": H.contiguous(H.StorageRef("0", 6), (6,)), "b": H.contiguous(other, (6,))}
        pt = H.write(tmp_path / "reuse.pt", H.checkpoint(tensors, {"0": bytes(24)}))
        err = refused(lambda pt=pt: read_torch_zip(pt), ConversionError, match="storage 0 is referenced with two")
        assert str(pt) in str(err)


@pytest.mark.parametrize(
    "size,stride,offset",
    [((2, 3), (4, 1), 0), ((6,), (1,), 1), ((2,), (2**62,), 0), ((1, 2), (0, 2**63 - 1), 0)],
)
def test_strides_reaching_outside_the_storage(tmp_path: Path, size, stride, offset) -> None:
    st = H.StorageRef("0", 6)
    pt = H.write(tmp_path / "s.pt", H.checkpoint({"w": H.TensorRef(st, offset, size, stride)}, {"0": bytes(24)}))
    refused(lambda: read_torch_zip(pt), ConversionError, match="storage 0 smaller than shape")


def test_numel_overflowing_int64_and_stride_zero_giants(tmp_path: Path) -> None:
    st = H.StorageRef("0", 1)
    huge = H.TensorRef(st, 0, (2**32, 2**32), (0, 0))  # 2**64 elements
    pt = H.write(tmp_path / "o.pt", H.checkpoint({"w": huge}, {"0": bytes(4)}))
    refused(lambda: read_torch_zip(pt), ConversionError, match="overflows int64")
    empty_but_huge = H.TensorRef(H.StorageRef("0", 0), 0, (2**63 - 1, 0), (1, 1))  # holds nothing, numpy refuses it
    pt = H.write(tmp_path / "e.pt", H.checkpoint({"w": empty_but_huge}, {"0": b""}))
    refused(lambda: read_torch_zip(pt), ConversionError, match="overflows int64")
    # fits int64 and stays inside the 1-element storage (stride 0), but would materialize 2**50 floats
    giant = H.TensorRef(st, 0, (2**30, 2**20), (0, 0))
    pt = H.write(tmp_path / "g.pt", H.checkpoint({"w": giant}, {"0": bytes(4)}))
    refused(lambda: read_torch_zip(pt), ConversionError, match=f"over the {DEFAULT_READ_LIMITS.max_tensor_bytes} byte")
    big_dim = H.TensorRef(st, 0, (2**64,), (0,))
    pt = H.write(tmp_path / "d.pt", H.checkpoint({"w": big_dim}, {"0": bytes(4)}))
    refused(lambda: read_torch_zip(pt), ConversionError, match="invalid size")


def _many_entries(n: int, name_pad: int = 0) -> bytes:
    tensors, storages = H.torch_like_dict({"w": np.ones(4, np.float32)})
    junk = [H.Entry(f"archive/junk/{'x' * name_pad}{i}", b"") for i in range(n)]
    return H.zip_bytes([H.Entry("archive/data.pkl", H.tensor_pickle(tensors)), H.Entry("archive/data/0", storages["0"]),
                        *junk])


def test_zip_with_thousands_of_entries_is_refused_before_parsing(tmp_path: Path) -> None:
    pt = H.write(tmp_path / "many.pt", _many_entries(50_000))
    err = refused(lambda: read_torch_zip(pt), ConversionError, match="50002 entries", peak_mb=8)
    assert str(pt) in str(err)
    # the end record may lie about the count: the directory size still gives it away
    pt = H.write(tmp_path / "lying.pt", _many_entries(60_000, name_pad=80))  # ~8 MB of directory
    data = bytearray(pt.read_bytes())
    struct.pack_into("<HH", data, len(data) - 22 + 8, 3, 3)
    H.write(pt, bytes(data))
    refused(lambda: read_torch_zip(pt), ConversionError, match="central directory", peak_mb=8)


def test_convert_bounds_entries_by_the_base_model(tmp_path: Path) -> None:
    """5,000 entries is fine for no adapter: a 2-layer base allows 2 x 13 x 2 tensors."""
    base = write_base_gguf(tmp_path / "base.gguf", n_layer=2)
    src = write_adapter_dir(tmp_path / "a", upstream_config(), {})
    H.write(src / "delta_mem_adapter.pt", _many_entries(5000))
    refused(lambda: convert_adapter(src, base), ConversionError, match="5002 entries", peak_mb=16)


def test_pickle_memo_index_that_would_allocate_64_gib_is_refused(tmp_path: Path) -> None:
    """LONG_BINPUT 0xFFFFFFFF: CPython's unpickler would grow its memo to 2**33 pointers."""
    payload = b"\x80\x02K\x01r\xff\xff\xff\xff."
    pt = H.write(tmp_path / "memo.pt", H.zip_bytes([H.Entry("archive/data.pkl", payload)]))
    refused(lambda: read_torch_zip(pt), ConversionError, match="memo index 4294967295", peak_mb=4)


def test_pickle_and_byteorder_entries_are_size_checked(tmp_path: Path) -> None:
    big = H.zip_bytes([H.Entry("archive/data.pkl", b"\x80\x02}." + bytes(DEFAULT_READ_LIMITS.max_pickle_bytes))])
    pt = H.write(tmp_path / "p.pt", big)
    refused(lambda: read_torch_zip(pt), ConversionError, match="data.pkl is")
    bomb = H.zeros_bomb(16 << 20)
    bomb.name = "archive/byteorder"
    pt = H.write(tmp_path / "b.pt", H.zip_bytes([H.Entry("archive/data.pkl", b"\x80\x02}."), bomb]))
    refused(lambda: read_torch_zip(pt), ConversionError, match="byteorder is 16777216 bytes")


def test_budget_is_the_largest_adapter_for_the_base() -> None:
    """Independent arithmetic for a Qwen3-4B-shaped base and the released rank-8 config."""
    from deltamem_edge.converter.base_model import BaseModelInfo

    base = BaseModelInfo(Path("q.gguf"), "qwen3", 36, 2560, (32,) * 36, (8,) * 36, 128, 128)
    cfg = config_from_dict(upstream_config(rank=8, delta_heads=["q", "k", "v", "o"]))
    limits = adapter_read_limits(cfg, base)
    r, d = 8, 2560
    per_layer = 3 * r * d + 2 * (r * d + r) + r * (4096 + 1024 + 1024 + 2560) + d + 4
    assert limits.max_tensor_bytes == BUDGET_HEADROOM * 36 * per_layer * 4 + (1 << 20)
    assert limits.max_tensor_bytes < 64 << 20  # tens of MB, not 8 GiB
    assert limits.max_entries == BUDGET_HEADROOM * 13 * 36


def test_convert_refuses_tensors_over_the_base_budget(tmp_path: Path) -> None:
    """A tensor that honestly uses its whole (stored) storage, but more than any adapter of this base has."""
    base = write_base_gguf(tmp_path / "base.gguf", n_layer=1)
    cfg = upstream_config()
    limits = adapter_read_limits(config_from_dict(cfg), read_base_model(base))
    numel = limits.max_tensor_bytes // 4 + 1
    st = H.StorageRef("0", numel)
    src = write_adapter_dir(tmp_path / "a", cfg, {})
    H.write(src / "delta_mem_adapter.pt", H.checkpoint({BOMB_KEY: H.contiguous(st, (numel,))}, {"0": bytes(numel * 4)}))
    err = refused(lambda: convert_adapter(src, base), ConversionError, match="byte limit", peak_mb=16)
    assert str(limits.max_tensor_bytes) in str(err)


# ------------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------------


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_bounds(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    small = ReadLimits(max_tensor_bytes=64, max_entries=2)
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    H.write(p, _safetensors(ok, bytes(8)))
    assert read_safetensors(p, limits=small)["a"].tolist() == [0.0, 0.0]
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(3)}
    H.write(p, _safetensors(many))
    refused(lambda: read_safetensors(p, limits=small), ConversionError, match="lists 3 tensors")
    over = {"a": {"dtype": "F32", "shape": [17], "data_offsets": [0, 68]}}
    H.write(p, _safetensors(over, bytes(68)))
    refused(lambda: read_safetensors(p, limits=small), ConversionError, match="over the 64 byte limit")
    overflow = {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}
    H.write(p, _safetensors(overflow))
    refused(lambda: read_safetensors(p), ConversionError, match="overflows int64")
    empty_but_huge = {"a": {"dtype": "F32", "shape": [2**63 - 1, 0], "data_offsets": [0, 0]}}  # found by make fuzz
    H.write(p, _safetensors(empty_but_huge))
    refused(lambda: read_safetensors(p), ConversionError, match="overflows int64")
    H.write(p, struct.pack("<Q", DEFAULT_READ_LIMITS.max_safetensors_header_bytes + 1) + b"{}")
    refused(lambda: read_safetensors(p), ConversionError, match="header length")


# ------------------------------------------------------------------------------------------------
# GGUF header
# ------------------------------------------------------------------------------------------------


def _s(text: str | bytes, n: int | None = None) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b) if n is None else n) + b


def gguf_bytes(kvs: bytes = b"", n_kv: int = 0, tensors: list[tuple] = (), alignment: int = 32, pad: int = 64) -> bytes:
    """A GGUF v3 by hand: ``tensors`` are (name, dims, type, offset); ``pad`` zero bytes of data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_kv) + kvs
    for name, dims, ttype, off in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, off)
    out += bytes(-len(out) % alignment)
    return out + bytes(pad)


def test_gguf_hand_written_file_parses(tmp_path: Path) -> None:
    kv = _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
    p = H.write(tmp_path / "ok.gguf", gguf_bytes(kv, 1, [("t", (4, 2), 0, 0), ("u", (8,), 0, 32)]))
    h = read_gguf_header(p)
    assert h.fields["general.architecture"] == "llama"
    assert [(t.name, t.shape, t.n_bytes) for t in h.tensors] == [("t", (4, 2), 32), ("u", (8,), 32)]


GGUF_CASES = {
    "string 2**64-1": (_s("k", 2**64 - 1), 1, [], "a key of"),
    "value string over 64 MiB": (_s("k") + struct.pack("<I", 8) + _s(b"", 2**32 - 1), 1, [], "a string of"),
    "array of 2**32-1 strings": (_s("k") + struct.pack("<IIQ", 9, 8, 2**32 - 1), 1, [], "an array of 4294967295"),
    "array of 2**64-1 u8": (_s("k") + struct.pack("<IIQ", 9, 0, 2**64 - 1), 1, [], "an array of"),
    "n_kv 2**64-1": (b"", 2**64 - 1, [], "implausible counts"),
    "tensor name of 64 bytes": (b"", 0, [("x" * 64, (4,), 0, 0)], "a tensor name of 64"),
    "5 dims": (b"", 0, [("t", (1, 1, 1, 1, 1), 0, 0)], "5 dimensions"),
    "numel overflows int64": (b"", 0, [("t", (2**32, 2**32), 0, 0)], "more elements than int64"),
    "dim 2**64-1": (b"", 0, [("t", (2**64 - 1,), 0, 0)], "more elements than int64"),
    "misaligned offset": (b"", 0, [("t", (4,), 0, 4)], "not a multiple of 32"),
    "duplicate tensor": (b"", 0, [("t", (4,), 0, 0), ("t", (4,), 0, 32)], "duplicate tensor name"),
    "data past the end": (b"", 0, [("t", (2**40,), 0, 0)], "truncated"),
    "unknown type": (b"", 0, [("t", (4,), 2**32 - 1, 0)], "unknown type"),
    "alignment 2**20": (_s("general.alignment") + struct.pack("<II", 4, 1 << 20), 1, [], "power of two up to"),
    "alignment 0": (_s("general.alignment") + struct.pack("<II", 4, 0), 1, [], "power of two"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_header_refuses_crafted_sizes(tmp_path: Path, case: str) -> None:
    kvs, n_kv, tensors, match = GGUF_CASES[case]
    p = H.write(tmp_path / "bad.gguf", gguf_bytes(kvs, n_kv, tensors))
    err = refused(lambda: read_gguf_header(p, max_array=None), GGUFFormatError, match=match)
    assert str(p) in str(err)


def test_gguf_header_of_a_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    refused(lambda: read_gguf_header(fifo), GGUFFormatError, match="not a regular file")


# ------------------------------------------------------------------------------------------------
# HF converter input
# ------------------------------------------------------------------------------------------------


def test_hf_config_json_is_size_checked_before_reading(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"[" * (MAX_HF_CONFIG_BYTES + 1))
    refused(lambda: _read_hf_config(tmp_path), ConversionError, match="config.json is")
    (tmp_path / "config.json").write_bytes(b"[" * 100_000)  # deep nesting, within the size limit
    refused(lambda: _read_hf_config(tmp_path), ConversionError, match="cannot read config.json")
