"""Which GGUF to run an adapter on: the known-bases table and the choice of a file by quantization.

Why a table: a δ-mem adapter repository names its base as a Hugging Face model id
(``base_model`` in its model card), but the runtime needs a llama.cpp GGUF of that
model, which lives in another repository.  The table maps a base id to a GGUF
repository; the quantization picks the file in it, the way ``llama-cli -hf
user/repo:Q4_K_M`` does.  Users extend it without a release with
``<data dir>/bases.json`` (``{"org/base-id": "org/base-GGUF"}`` or
``{"org/base-id": {"repo": "org/base-GGUF"}}``), or bypass it with ``--base``.
docs/models.md lists the table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from deltamem_edge.errors import HubError
from deltamem_edge.paths import data_dir

DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's default for -hf
USER_TABLE_NAME = "bases.json"


@dataclass(frozen=True)
class GGUFSource:
    """Where the GGUF conversions of one base model live."""

    repo: str
    note: str = ""


KNOWN_BASES: dict[str, GGUFSource] = {
    # the base of the released adapter declare-lab/delta-mem_qwen3_4b-instruct
    "Qwen/Qwen3-4B-Instruct-2507": GGUFSource("unsloth/Qwen3-4B-Instruct-2507-GGUF"),
    "Qwen/Qwen3-4B": GGUFSource("Qwen/Qwen3-4B-GGUF"),
    "Qwen/Qwen3-8B": GGUFSource("Qwen/Qwen3-8B-GGUF"),
    # the embedded default model's base (docs/embedding.md)
    "HuggingFaceTB/SmolLM2-135M-Instruct": GGUFSource("bartowski/SmolLM2-135M-Instruct-GGUF"),
}
"""Base model id → GGUF repository.  Ids compare case-insensitively, as on the hub."""

KNOWN_ADAPTERS: dict[str, str] = {
    "declare-lab/delta-mem_qwen3_4b-instruct": "Qwen/Qwen3-4B-Instruct-2507",
}
"""Adapter repository → base model id, for released adapters whose model card may not say it."""

_QUANT_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.I)
_ANY_QUANT_RE = re.compile(r"(?:^|[-._/])(I?Q\d(?:_[0-9A-Z]+)*|BF16|F16|F32)(?=[-._/]|$)", re.I)
_NOT_A_MODEL = ("mmproj", "imatrix")


def normalize_quant(quant: str, *, what: str = "quantization") -> str:
    """``q4_k_m`` → ``Q4_K_M``; anything that is not a plain word is refused."""
    if not _QUANT_RE.match(quant):
        raise HubError(f"{what} {quant!r} is not a llama.cpp quantization name",
                       hint="use a name like Q4_K_M, Q8_0 or F16")
    return quant.upper()


def _user_table() -> dict[str, GGUFSource]:
    path = data_dir() / USER_TABLE_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HubError(f"cannot read the table of bases ({e})", path=path, hint="fix or delete the file") from None
    if not isinstance(data, dict):
        raise HubError("the table of bases must be a JSON object {base id: GGUF repo}", path=path)
    table: dict[str, GGUFSource] = {}
    for base_id, value in data.items():
        repo = value.get("repo") if isinstance(value, dict) else value
        if not isinstance(base_id, str) or not isinstance(repo, str) or "/" not in repo:
            raise HubError(f"bad entry {base_id!r}: expected a GGUF repository like 'org/name-GGUF'", path=path)
        table[base_id] = GGUFSource(repo, note=f"from {path}")
    return table


def known_bases() -> dict[str, GGUFSource]:
    """The built-in table with the user's ``bases.json`` over it."""
    return {**KNOWN_BASES, **_user_table()}


def gguf_source(base_id: str) -> GGUFSource | None:
    """The GGUF repository known for ``base_id`` (case-insensitive), or None."""
    table = {k.lower(): v for k, v in known_bases().items()}
    return table.get(base_id.lower())


def known_adapter_base(adapter_repo: str) -> str | None:
    table = {k.lower(): v for k, v in KNOWN_ADAPTERS.items()}
    return table.get(adapter_repo.lower())


def available_quants(files: list[str]) -> list[str]:
    """The quantization names that appear in the GGUF file names of a listing, for error messages."""
    found = set()
    for f in files:
        if f.lower().endswith(".gguf") and not any(w in f.lower() for w in _NOT_A_MODEL):
            found.update(m.group(1).upper() for m in _ANY_QUANT_RE.finditer(f[: -len(".gguf")]))
    return sorted(found)


def pick_gguf(files: list[str], quant: str, repo: str) -> list[str]:
    """The file(s) of the ``quant`` model in a GGUF repository listing: one file, or every part of a split.

    A file matches when ``quant`` appears in its path as a whole word (``-Q4_K_M.gguf``,
    ``.q4_k_m.gguf``, ``Q4_K_M/…-00001-of-00003.gguf``), case-insensitively, so that
    Q4_0 does not pick Q4_0_4_4.  Projector and imatrix files are never models.
    Anything but exactly one model is an error naming the repository and the choices.
    """
    word = re.compile(rf"(?:^|[-._/]){re.escape(quant)}(?:[-./]|$)", re.I)  # no "_" after: Q4_0 ≠ Q4_0_4_4
    matches = [f for f in files if f.lower().endswith(".gguf") and not any(w in f.lower() for w in _NOT_A_MODEL)
               and word.search(f[: -len(".gguf")])]
    if not matches:
        quants = available_quants(files)
        listed = f"; it has {', '.join(quants)}" if quants else "; it has no GGUF files"
        raise HubError(f"{repo}: no {quant} GGUF file{listed}",
                       hint="pick one with REPO:QUANT (e.g. :Q8_0), or pass --base FILE with a local GGUF")
    groups: dict[str, list[str]] = {}
    for f in matches:
        m = _SPLIT_RE.match(f)
        groups.setdefault(m.group("stem") if m else f, []).append(f)
    if len(groups) > 1:
        raise HubError(f"{repo}: several {quant} models: {', '.join(sorted(groups))}",
                       hint="pass --base REPO:QUANT with a more precise quantization, or --base FILE")
    chosen = sorted(next(iter(groups.values())))
    m = _SPLIT_RE.match(chosen[0])
    if m:
        total = int(m.group("total"))
        parts = [int(_SPLIT_RE.match(f).group("part")) for f in chosen]  # type: ignore[union-attr]
        if parts != list(range(1, total + 1)):
            raise HubError(f"{repo}: the split {quant} model has parts {parts} of {total}",
                           hint="the repository is incomplete; pass --base FILE with a local GGUF")
    elif len(chosen) != 1:  # pragma: no cover (one stem, no split → one file)
        raise HubError(f"{repo}: ambiguous {quant} files {chosen}")
    return chosen


def quant_of(path: Path) -> str | None:
    """The quantization of a GGUF from its ``general.file_type`` (``MOSTLY_Q4_K_M`` → ``Q4_K_M``), or None."""
    import gguf

    from deltamem_edge.gguf_header import read_gguf_header

    try:
        value = read_gguf_header(path).fields.get("general.file_type")
        name = gguf.LlamaFileType(int(value)).name  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a label only: an odd header must not stop an install
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
