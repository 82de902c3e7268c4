"""The benchmark's figures over its repeats: medians and spread, the sanity checks, the ratios
of grok to each peer, and the tables.

Engines are compared in groups of the same precision: ``float32``, ``bfloat16`` and
``8-bit`` (grok's FP8 weights, ``quantize="fp8"``, against llama.cpp's Q8_0). ``FORMATS`` says
which weight format each engine runs in each group. Everything here reads the ``runs`` of a
saved JSON file, so ``--report`` re-checks an old run the same way.
"""

from __future__ import annotations

import json

import numpy as np

GROUPS = ("float32", "bfloat16", "8-bit")
# The weight format each engine runs in each group (an engine absent from a group has none).
FORMATS: dict[str, dict[str, str]] = {
    "grok": {"float32": "float32", "bfloat16": "bfloat16", "8-bit": "fp8"},
    "mixtral": {"float32": "float32", "bfloat16": "bfloat16"},
    "llama": {"float32": "float32", "bfloat16": "bfloat16", "8-bit": "q8_0"},
}
# The children themselves keep --threads threads busy back to back, so the 1-minute load sits
# near the thread count on an otherwise idle machine (2.0-2.2 measured for 2 threads on 2
# cores); a load above the cores plus half a thread means someone else was running.
LOAD_SLACK = 0.5
# (figure, key in a child's figures, scale, unit, key in the ratios)
FIGURES = (
    ("decode", "decode_tok_s", 1.0, "tok/s", "decode"),
    ("prefill", "prefill_s", 1e3, "ms", "prefill"),
    ("first token", "ttft_s", 1e3, "ms", "ttft"),
)


def summarise(runs: list[dict], batch: list[int]) -> dict:
    """Median and (min, max) of each figure over the repeats (or the first run's error)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error", "no run") if runs else "no run"}
    out: dict = {}
    for b in batch:
        key = f"b{b}"
        out[key] = {}
        for name in ok[0][key]:
            values = [r[key][name] for r in ok]
            out[key][name] = {
                "median": float(np.median(values)),
                "min": float(min(values)),
                "max": float(max(values)),
            }
    return out


def sanity(summary: dict, runs: list[dict], batch: list[int], cores: int) -> list[str]:
    """Reasons the figures of one engine cannot be trusted (empty when they can): a failed
    run, batch ``max`` decoding fewer tokens/s in total than batch ``min``, a first token
    not before the end of the generation, the machine busier than its cores."""
    if "error" in summary:
        return [f"a run failed: {summary['error'][-300:]}"]
    problems = []
    med = {b: {k: v["median"] for k, v in summary[f"b{b}"].items()} for b in batch}
    lo, hi = min(batch), max(batch)
    if hi > lo and med[hi]["decode_tok_s"] < med[lo]["decode_tok_s"]:
        problems.append(
            f"batch {hi} decodes fewer tokens/s in total ({med[hi]['decode_tok_s']:.1f}) than "
            f"batch {lo} ({med[lo]['decode_tok_s']:.1f})"
        )
    for b in batch:
        if med[b]["ttft_s"] >= med[b]["generate_s"]:
            problems.append(
                f"batch {b}: time to first token {med[b]['ttft_s']:.3f} s is not shorter than "
                f"the whole generation {med[b]['generate_s']:.3f} s"
            )
    loads = [max(r["load_before"], r["load_after"]) for r in runs]
    if max(loads) > cores + LOAD_SLACK:
        problems.append(
            f"machine load reached {max(loads):.1f} on {cores} cores (more than "
            f"{cores} + {LOAD_SLACK})"
        )
    return problems


def engines_in(res: dict, group: str) -> list[str]:
    """The engines with runs in ``group``, grok first."""
    runs = res["runs"]
    return [e for e in FORMATS if e in runs and FORMATS[e].get(group) in runs[e]]


def evaluate(res: dict) -> None:
    """Fills res's ``summary`` and ``problems`` per "engine format", and ``ratios`` per group
    and peer, from its ``runs``, ``batch`` and ``cores``."""
    res["summary"], res["problems"], res["ratios"] = {}, {}, {}
    for engine, formats in res["runs"].items():
        for fmt, runs in formats.items():
            key = f"{engine} {fmt}"
            res["summary"][key] = s = summarise(runs, res["batch"])
            res["problems"][key] = sanity(s, runs, res["batch"], res["cores"])
    for group in GROUPS:
        engines = engines_in(res, group)
        if "grok" in engines and len(engines) > 1:
            res["ratios"][group] = {
                peer: ratios(res, group, peer, res["batch"]) for peer in engines if peer != "grok"
            }


def ratios(res: dict, group: str, peer: str, batch: list[int]) -> dict:
    """grok over ``peer`` (> 1: grok is better) per figure, or the reasons there is none."""
    g_key, p_key = f"grok {FORMATS['grok'][group]}", f"{peer} {FORMATS[peer][group]}"
    problems = res["problems"][g_key] + res["problems"][p_key]
    if problems:
        return {"refused": problems}
    g, p = res["summary"][g_key], res["summary"][p_key]
    out = {}
    for b in batch:
        gb, pb = g[f"b{b}"], p[f"b{b}"]
        out[f"decode b{b}"] = gb["decode_tok_s"]["median"] / pb["decode_tok_s"]["median"]
        out[f"prefill b{b}"] = pb["prefill_s"]["median"] / gb["prefill_s"]["median"]
        out[f"ttft b{b}"] = pb["ttft_s"]["median"] / gb["ttft_s"]["median"]
    return out


def _fig(stat: dict, scale: float = 1.0, fmt: str = ".1f") -> str:
    lo, hi = stat["min"] * scale, stat["max"] * scale
    return f"{stat['median'] * scale:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"


def _table(rows: list[tuple]) -> None:
    width = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(f"{str(c):<{w}}" for c, w in zip(r, width, strict=True)))


def print_group(res: dict, group: str) -> None:
    """One group's table: each engine's medians (min-max), then grok over each peer."""
    engines = engines_in(res, group)
    keys = [f"{e} {FORMATS[e][group]}" for e in engines]
    peers = [e for e in engines if e != "grok"] if "grok" in engines else []
    found = res["ratios"].get(group, {})
    rows: list[tuple] = [("figure", *keys, *[f"grok/{p}" for p in peers])]
    for b in res["batch"]:
        for what, key, scale, unit, ratio_key in FIGURES:
            cells = []
            for k in keys:
                s = res["summary"][k]
                cells.append("failed" if "error" in s else _fig(s[f"b{b}"][key], scale))
            shown = []
            for p in peers:
                r = found.get(p, {})
                shown.append("" if "refused" in r or not r else f"{r[f'{ratio_key} b{b}']:.2f}x")
            rows.append((f"{what} B={b} ({unit})", *cells, *shown))
        g = res["summary"][keys[0]] if engines[0] == "grok" else {}
        if g and "error" not in g and "compile_s" in g[f"b{b}"]:
            blank = [""] * (len(keys) - 1 + len(peers))
            rows.append((f"grok compile B={b} (s)", _fig(g[f"b{b}"]["compile_s"]), *blank))
    print(f"\n{group}")
    _table(rows)
    for k in keys:
        for problem in res["problems"].get(k, []):
            print(f"  no ratio: {k}: {problem}")


def print_report(res: dict) -> None:
    """Every group's table, the skipped peers, and the single-run figures."""
    load = res["load_start"]
    print(
        f"\n{res['shape']}, T={res['prompt_len']}, N={res['new_tokens']}, {res['threads']} "
        f"threads, medians (min-max) of {res['repeats']} fresh processes per engine; load "
        f"{load[0]:.1f} at start, {res['load_end'][0]:.1f} at end, {res['cores']} cores; "
        f"{res['wall_s'] / 60:.1f} min"
    )
    for engine, reason in res.get("skipped", {}).items():
        print(f"  {engine} skipped: {reason}")
    for group in GROUPS:
        if engines_in(res, group):
            print_group(res, group)
    fw = res.get("full_width_layer")
    if fw and "error" not in fw:
        print(
            f"\nfull-width Grok-2 layer, bf16, B=1 ({fw['experts_in_memory']} experts in memory): "
            f"{fw['decode_tok_s']:.2f} tok/s; {fw['bytes_per_token'] / 1e9:.2f} GB per token at "
            f"{fw['read_bandwidth_B_s'] / 1e9:.1f} GB/s read bandwidth = roofline "
            f"{fw['roofline_tok_s']:.2f} tok/s; {fw['fraction_of_roofline']:.0%} of it"
            + (  # each decode against the probe taken just before it (older files lack it)
                f" (each run: {', '.join(f'{f:.0%}' for f in fw['fraction_of_roofline_all'])})"
                if "fraction_of_roofline_all" in fw
                else ""
            )
        )
    elif fw:
        print(f"\nfull-width layer failed: {fw['error'][-500:]}")
    for key in ("compile", "long_prompt"):
        if key in res:
            print(f"\n{key}: " + json.dumps(dict(res[key].items())))
