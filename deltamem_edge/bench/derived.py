"""Figures derived from a model's results: sequence state sizes (measured or extrapolated) and the goals.

Separate from the markdown so that the goals' arithmetic can be checked on known numbers.
"""

from __future__ import annotations

from .stats import us_stats


def seq_table(mres: dict, want: tuple[int, ...] = (512, 2048, 8192)) -> list[dict]:
    """Rows of (tokens, llama.cpp seq state bytes, ours, ratio, how obtained).

    llama.cpp's sequence state is an affine function of the token count (KV rows of
    every layer plus per-cell metadata), so lengths that were not measured are
    extrapolated from two measured ones and marked as such.
    """
    ours = (mres.get("statecost") or {}).get("file_bytes")
    points: dict[int, int] = {}
    for key in ("probe_c", "probe_a"):
        for k, v in (mres.get("seq", {}).get(key) or {}).items():
            points.setdefault(int(k), int(v))
    for k, v in (mres.get("seq", {}).get("measured") or {}).items():
        if k.isdigit():
            points[int(k)] = int(v["seq_state_bytes"])
    rows = []
    fit = None
    if len(points) >= 2:
        (x0, y0), (x1, y1) = sorted(points.items())[:2]
        slope = (y1 - y0) / (x1 - x0)
        fit = (y0 - slope * x0, slope)
    for n in want:
        if n in points:
            seqb, how = points[n], "measured"
        elif fit:
            seqb, how = int(round(fit[0] + fit[1] * n)), "extrapolated (affine fit of measured lengths)"
        else:
            continue
        rows.append({"tokens": n, "seq_state_bytes": seqb, "ours_bytes": ours, "how": how,
                     "ratio": (seqb / ours) if ours else None})
    return rows


GOALS = {
    "decode": ("decode overhead c/b ≤ 3 %", 1.03),
    "prefill": ("prefill overhead c/b ≤ 5 % at the longest prefill", 1.05),
}


def names_of(mres: dict) -> dict[str, str]:
    return mres.get("metric_names") or {}


def goals(mres: dict) -> list[dict]:
    s = mres.get("summary", {}).get("ratios", {})
    aa = s.get("b2/b", {})
    out = []

    def band(metric: str) -> float | None:
        a = aa.get(metric)
        return max(abs(a["min"] - 1), abs(a["max"] - 1)) if a else None

    for key, metric in (("decode", "decode_128"), ("prefill", "prefill_2048")):
        r = s.get("c/b", {}).get(metric)
        if r:
            text, lim = GOALS[key]
            ir = (mres.get("callgrind") or {}).get("ratio_c_b", {}).get("decode_step" if key == "decode" else "prefill")
            if key == "prefill":
                text = text.replace("the longest prefill", names_of(mres).get(metric, metric))
            out.append({"goal": text, "value": f"{(r['median'] - 1) * 100:+.1f} % (rounds {(r['min'] - 1) * 100:+.1f}"
                        f"…{(r['max'] - 1) * 100:+.1f} %)" + (f"; instructions {(ir - 1) * 100:+.2f} %" if ir else ""),
                        "met": r["median"] <= lim, "aa_band": band(metric)})
    ba = s.get("b/a", {})
    if ba:
        worst = max(abs(v["median"] - 1) for v in ba.values())
        bands = [band(m) for m in ba if band(m) is not None]
        lim = max(bands) if bands else None
        nm = names_of(mres)
        if not bands:  # no A/A twin in this run: nothing to compare against
            lim = None
        out.append({"goal": "b vs a within noise", "value": "medians " + ", ".join(
            f"{nm.get(m, m)}: {(v['median'] - 1) * 100:+.1f} %" for m, v in ba.items()
            if not (m == "prefill_2048" and nm.get(m) == nm.get("prefill_512"))),
                    "met": None if lim is None else worst <= lim, "aa_band": lim})
    sc = mres.get("statecost")
    if sc:
        u = us_stats(sc["us"])
        total = u["save_total"]["median"] + u["load_total"]["median"]
        mem = u["save_mem"]["median"] + u["load_mem"]["median"]
        out.append({"goal": "state save + load ≤ 1 ms", "value": f"{total:.0f} µs with the file (atomic write + fsync);"
                    f" {mem:.0f} µs in memory (get+encode, decode+set)", "met": total <= 1000})
        out.append({"goal": "state file ≤ 16 KiB", "value": f"{sc['file_bytes']} B", "met": sc["file_bytes"] <= 16384})
        rows = {r["tokens"]: r for r in seq_table(mres)}
        if 2048 in rows and rows[2048]["ratio"]:
            r = rows[2048]
            out.append({"goal": "≥ 1000× smaller than llama.cpp's sequence state at 2048 tokens",
                        "value": f"{r['ratio']:.0f}× ({r['seq_state_bytes']} B vs {r['ours_bytes']} B, {r['how']})",
                        "met": r["ratio"] >= 1000})
    return out
