"""Markdown of a run and docs/benchmarks.md: the "latest" block per profile, the history, rebuilding both.

Only the text between the markers is the tool's; everything outside them is written by hand and kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .derived import goals, seq_table
from .plan import METRICS, SLOT_LABELS
from .stats import us_stats


def _fmt_range(st: dict, fmt: str = "{:.1f}") -> str:
    if not st:
        return "–"
    return f"{fmt.format(st['median'])} ({fmt.format(st['min'])}–{fmt.format(st['max'])})"


def _fmt_ratio(st: dict) -> str:
    if not st:
        return "–"
    return f"{st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f})"


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f} MiB"


def render_run(result: dict) -> str:
    """Markdown for one run: header, then per model the tables."""
    m = result["machine"]
    names = result.get("metric_names") or {k: k.replace("_", " ") for k in METRICS}
    lines = [f"### {result['profile']} run, {m['date'][:16].replace('T', ' ')}, commit {m['commit']}"
             f"{' (dirty tree)' if m.get('dirty') else ''}", "",
             f"- command: `{result['command']}`",
             f"- machine: {m['cpu']}, {m['cores']} cores, {(m.get('mem_bytes') or 0) / 2**30:.0f} GiB, "
             f"kernel {m['kernel']}, Python {m['python']}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
             f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', []))}",
             f"- threads: {m['threads']}; llama.cpp {result['libs']['llama_cpp_commit'][:9]} (stock and patched, same "
             f"flags: GGML_NATIVE=OFF, Release); run took {result.get('total_s', 0) / 60:.1f} min", ""]
    for mr in result["models"].values():
        info = mr["model"]
        lines += [f"#### {info['label']}", "",
                  f"File {Path(info['path']).name} ({info['model_bytes'] / 2**20:.0f} MiB), adapter "
                  f"{Path(info['adapter']).name} ({info['adapter_bytes'] / 2**20:.1f} MiB); "
                  f"{mr.get('rounds_done', 0)} rounds; shape {info['shape']}."
                  + (f" Generated once in {info['gen_seconds']:.0f} s (peak disk "
                     f"{info['gen_peak_disk_bytes'] / 2**30:.1f} GiB, f16 deleted)." if info.get("synthetic") else ""),
                  ""]
        summ = mr["summary"]
        slots = [s for s in ("a", "b", "b2", "c", "d") if s in summ["tps"]]
        ratio_keys = [k for k in ("c/b", "d/b", "b/a", "b2/b") if k in summ["ratios"]]
        head = ["tokens/s, median (min–max)"] + [SLOT_LABELS[s].split(":")[0] for s in slots] + \
               [f"{k}{' (A/A)' if k == 'b2/b' else ''}" for k in ratio_keys]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for met in METRICS:
            if met == "prefill_2048" and names.get(met) == names.get("prefill_512"):
                continue  # the longest prefill is the chunk itself: one row
            row = [names[met]] + [_fmt_range(summ["tps"][s].get(met, {})) for s in slots] + \
                  [_fmt_ratio(summ["ratios"][k].get(met, {})) for k in ratio_keys]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Slots: " + "; ".join(SLOT_LABELS[s] for s in slots) + ". Ratios are per-round time ratios "
                  "(> 1 = slower), median (min–max) over rounds; b2/b is the A/A band.", ""]
        cpu = mr.get("summary_cpu", {}).get("ratios", {})
        if cpu.get("c/b"):
            shown = [mm for mm in METRICS if not (mm == "prefill_2048" and names.get(mm) == names.get("prefill_512"))]
            lines += ["CPU-time ratios (process user+sys, same rounds; medians): " + "; ".join(
                f"{k} " + ", ".join(f"{names[mm]} {cpu[k][mm]['median']:.3f}" for mm in shown if mm in cpu[k])
                for k in ratio_keys if k in cpu), ""]
        cg = mr.get("callgrind") or {}
        if cg.get("ratio_c_b"):
            b, c = cg["b"], cg["c"]
            lines += ["Instructions inside llama_decode (callgrind, 1 thread; repeatable to < 0.1 %):", "",
                      "| | b | c | c/b |", "|---|---|---|---|",
                      f"| one decode step (after {b['prefill_tokens']} tokens) | {b['decode_step_ir'] / 1e6:.1f} M | "
                      f"{c['decode_step_ir'] / 1e6:.1f} M | {cg['ratio_c_b']['decode_step']:.4f} |"]
            if "prefill" in cg["ratio_c_b"]:
                lines.append(f"| prefill {b['prefill_tokens']} tokens | {b['prefill_ir'] / 1e9:.2f} G | "
                             f"{c['prefill_ir'] / 1e9:.2f} G | {cg['ratio_c_b']['prefill']:.4f} |")
            lines.append("")
        rss = mr.get("rss", {})
        if rss:
            lines += ["Peak RSS per worker (VmHWM; weights are repacked into private memory, so each process holds "
                      "its own copy): " + ", ".join(f"{w} {_mib(v.get('VmHWM', v.get('maxrss_bytes')))}"
                                                   for w, v in rss.items()), ""]
        sc = mr.get("statecost")
        if sc:
            u = us_stats(sc["us"])
            lines += [f"δ-state: {sc['state_floats']} floats = {sc['state_bytes']} B in RAM; state file "
                      f"{sc['file_bytes']} B (header + payload + sha256); round trip exact: {sc['roundtrip_exact']}.",
                      "", "| µs, median (min–max) over " + str(u["get"]["n"]) + " | |", "|---|---|"]
            for k, label in (("get", "save: llama_dmem_state_get"), ("encode", "save: encode (statefile)"),
                             ("file_save", "save: atomic write + fsync"), ("save_total", "**save total**"),
                             ("file_load", "load: read + validate"), ("decode", "load: decode"),
                             ("set", "load: llama_dmem_state_set"), ("load_total", "**load total**"),
                             ("save_mem", "save without the file"), ("load_mem", "load without the file")):
                lines.append(f"| {label} | {_fmt_range(u[k], '{:.0f}')} |")
            lines.append("")
        rows = seq_table(mr)
        if rows:
            lines += ["| conversation length | llama.cpp `llama_state_seq_get_size` | our state file | ratio |",
                      "|---|---|---|---|"]
            for r in rows:
                mark = "" if r["how"] == "measured" else " (extrapolated)"
                lines.append(f"| {r['tokens']} | {r['seq_state_bytes']:,} B{mark} | {r['ours_bytes']:,} B | "
                             f"{r['ratio']:,.0f}× |")
            lines.append("")
        gl = goals(mr)
        if gl:
            lines += ["| goal | measured | met |", "|---|---|---|"]
            for g in gl:
                band = f" (A/A band ±{g['aa_band'] * 100:.1f} %)" if g.get("aa_band") is not None else ""
                met = "n/a (no A/A twin in this run)" if g["met"] is None else "yes" if g["met"] else "**no**"
                lines.append(f"| {g['goal']} | {g['value']}{band} | {met} |")
            lines.append("")
        lines += [f"Model section took {mr.get('seconds', 0) / 60:.1f} min.", ""]
    return "\n".join(lines)


def history_row(result: dict, json_link: str) -> list[str]:
    m = result["machine"]
    rows = []
    for name, mr in result["models"].items():
        def g(k: str, met: str, r: dict = mr["summary"]["ratios"]) -> str:
            st = r.get(k, {}).get(met)
            return f"{st['median']:.3f}" if st else "–"

        tps = mr["summary"]["tps"]
        dec_b = tps.get("b", {}).get("decode_128", {}).get("median")
        pre_b = tps.get("b", {}).get("prefill_2048", {}).get("median")
        cg = (mr.get("callgrind") or {}).get("ratio_c_b", {})
        sc = mr.get("statecost") or {}
        rows.append(f"| {m['date'][:10]} | {m['commit']}{'+' if m.get('dirty') else ''} | {result['profile']} | {name} "
                    f"| {m['threads']} | {dec_b or 0:.1f} | {pre_b or 0:.1f} ({result.get('plan', {}).get('prefill', 2048)}) | "
                    f"{g('c/b', 'decode_128')} | "
                    f"{g('c/b', 'prefill_2048')} | {g('b/a', 'decode_128')} | {g('b/a', 'prefill_2048')} | "
                    f"{g('b2/b', 'decode_128')} | {format(cg['decode_step'], '.4f') if cg.get('decode_step') else '–'} | "
                    f"{sc.get('file_bytes', '–')} | "
                    f"[json]({json_link}) |")
    return rows


HISTORY_HEAD = ["| date | commit | profile | model | threads | b decode tok/s | b longest-prefill tok/s (tokens) | "
                "c/b decode | c/b longest prefill | b/a decode | b/a longest prefill | A/A decode | Ir c/b decode | "
                "state file B | raw |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
MARK = {"latest": ("<!-- bench:latest:begin -->", "<!-- bench:latest:end -->"),
        "history": ("<!-- bench:history:begin -->", "<!-- bench:history:end -->")}
DOC_TEMPLATE = """# Benchmarks

Produced by `deltamem-edge bench` (`make bench`); see `deltamem_edge/bench/` for the method.
Raw numbers of every run are in `docs/bench/*.json` (kept for every commit, so regressions show),
with a plot of overhead against prompt length next to each.

## Latest runs

{latest_begin}
{latest_end}

## History

One row per model and run; new runs append.

{history_begin}
{history_head}
{history_end}
"""


def latest_key(result: dict) -> str:
    """Which "latest" block a run replaces: its profile, and for custom runs also its models and
    thread count, so that a custom 4B run and a custom 1-thread SmolLM2 run each keep their table."""
    if result["profile"] != "custom":
        return result["profile"]
    threads = (result.get("plan") or {}).get("threads")
    return "custom:" + "+".join(sorted(result["models"])) + (f":t{threads}" if threads else "")


def update_doc(doc: Path, result: dict, json_link: str, png_link: str | None) -> None:
    """Replace this profile's "latest" section and append history rows; text outside the markers stays."""
    if doc.exists():
        text = doc.read_text()
    else:
        text = DOC_TEMPLATE.format(latest_begin=MARK["latest"][0], latest_end=MARK["latest"][1],
                                   history_begin=MARK["history"][0], history_end=MARK["history"][1],
                                   history_head="\n".join(HISTORY_HEAD))
    for k, (b, e) in MARK.items():
        if b not in text or e not in text:
            text += f"\n\n{b}\n" + ("\n".join(HISTORY_HEAD) + "\n" if k == "history" else "") + f"{e}\n"
    # latest: one block per profile, delimited by its own sub-markers
    b, e = MARK["latest"]
    head, rest = text.split(b, 1)
    latest, tail = rest.split(e, 1)
    key = latest_key(result)
    pb, pe = f"<!-- profile:{key}:begin -->", f"<!-- profile:{key}:end -->"
    block = f"{pb}\n{render_run(result)}\n" + (f"![overhead vs prompt length]({png_link})\n\n" if png_link else "") \
        + f"Raw: [{json_link}]({json_link})\n{pe}"
    if pb in latest and pe in latest:
        pre, post = latest.split(pb, 1)
        latest = pre + block + post.split(pe, 1)[1]
    else:
        latest = latest.rstrip("\n") + "\n" + block + "\n"
    text = head + b + latest + e + tail
    b, e = MARK["history"]
    head, rest = text.split(b, 1)
    hist, tail = rest.split(e, 1)
    hist = hist.rstrip("\n") + "\n" + "\n".join(history_row(result, json_link)) + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(head + b + hist + e + tail)



def rebuild_doc(doc: Path, out_dir: Path) -> int:
    """Re-render the latest blocks and the history of `doc` from every bench JSON in `out_dir` (oldest first).

    The folder also holds ``deltamem-edge bench-server`` results (``server-*.json``, another
    section with its own renderer): only results with a ``profile`` are ``bench`` runs.
    """
    if doc.exists():
        text = doc.read_text()
        b, e = MARK["latest"]
        if b in text and e in text:
            text = text.split(b, 1)[0] + b + "\n" + e + text.split(e, 1)[1]
        b, e = MARK["history"]
        if b in text and e in text:
            text = text.split(b, 1)[0] + b + "\n" + "\n".join(HISTORY_HEAD) + "\n" + e + text.split(e, 1)[1]
        doc.write_text(text)
    prefix = os.path.relpath(out_dir.resolve(), doc.parent.resolve())
    prefix = "" if prefix == "." else prefix + "/"
    runs = [(p, json.loads(p.read_text())) for p in sorted(out_dir.glob("*.json"))]
    runs = [(p, r) for p, r in runs if "profile" in r]
    for path, result in runs:
        png = path.with_suffix(".png")
        update_doc(doc, result, prefix + path.name, prefix + png.name if png.exists() else None)
    return len(runs)
