"""PNG figures of variant comparisons (tools/compare_runs.py, tools/ablate.py) and of the variant arithmetic
(tools/analyze.py --plot). matplotlib is optional (`pip install 'megaqkv[plot]'`): without it every function
raises Unavailable, whose message says what to install, and the tables are unaffected."""
from __future__ import annotations

import math
from pathlib import Path

DPI = 110
UNFINISHED = " (unfinished)"


class Unavailable(RuntimeError):
    """matplotlib cannot be imported."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise Unavailable("matplotlib is not installed; pip install 'megaqkv[plot]' (or pip install matplotlib) to "
                          "draw figures (the tables need nothing extra)") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")  # a killed run leaves no half-written figure under the name
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    tmp.replace(path)
    return path


def _kib(n: float) -> str:
    return f"{n / 1024:g} KiB" if n >= 1024 else f"{n:g} B"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x and lower y), ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _series(result: dict) -> list[dict]:
    """What the comparison figures draw: one series per variant trained with several seeds (the mean, and the
    lowest and highest seed as a band or error bar, so that differences are read against the seed noise), and
    one per remaining run, in the table's order."""
    rows = {r["run"]: r for r in result["rows"]}
    grouped = {name: g for g in result["variants"] if len(g["runs"]) > 1 for name in g["runs"]}
    out, seen = [], set()
    for row in result["rows"]:
        group = grouped.get(row["run"])
        if group is None:
            ppl, speed = None if row["diverged"] else row["final_ppl"], row["tokens_per_s"]
            out.append({"label": row["label"] + ("" if row["finished"] else UNFINISHED), "name": row["label"],
                        "finished": row["finished"],
                        "curve": row["valid_curve"], "band": None, "kv": row["kv_bytes_per_token"],
                        "ppl": ppl, "ppl_range": None, "speed": speed, "speed_range": None,
                        "baseline": row["run"] == result["baseline"]})
            continue
        if id(group) in seen:
            continue
        seen.add(id(group))
        members = [rows[name] for name in group["runs"]]
        curves = [dict(m["valid_curve"]) for m in members]
        tokens = sorted(set.intersection(*(set(c) for c in curves)))
        losses = [[c[t] for c in curves] for t in tokens]
        ppls = [m["final_ppl"] for m in members]
        speeds = [m["tokens_per_s"] for m in members if m["tokens_per_s"] is not None]
        twin = sum(g["variant"] == group["variant"] for g in result["variants"] if len(g["runs"]) > 1) > 1
        what = f"{len(members)} {'seeds' if len(set(group['seeds'])) == len(members) else 'runs'}"
        label = f"{group['variant']}, {what}" + (f" ({group['runs'][0]}, …)" if twin else "")
        out.append({"label": label, "name": f"{group['variant']} (mean of {what})", "finished": True,
                    "curve": [(t, sum(v) / len(v)) for t, v in zip(tokens, losses)],
                    "band": (tokens, [min(v) for v in losses], [max(v) for v in losses]),
                    "kv": group["kv_bytes_per_token"], "ppl": group["mean_ppl"], "ppl_range": (min(ppls), max(ppls)),
                    "speed": sorted(speeds)[len(speeds) // 2] if speeds else None,
                    "speed_range": (min(speeds), max(speeds)) if speeds else None,
                    "baseline": result["baseline"] in group["runs"]})
    return out


def comparison_figures(result: dict) -> dict:
    """{file name: matplotlib Figure} for compare.compare()'s result: validation loss against training tokens,
    final perplexity against KV-cache bytes per token with the Pareto front, and training throughput. A variant
    with several seeds is drawn as their mean with the lowest-to-highest seed range; an unfinished run dashed /
    hollow / hatched and labelled as such."""
    plt = _pyplot()
    series = _series(result)
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    for i, s in enumerate(series):
        s["color"] = cmap(i % cmap.N)
    seeds = any(s["band"] for s in series)
    curves = [s for s in series if s["curve"]]
    scored = [s for s in series if s["ppl"] is not None]
    speed = [s for s in series if s["speed"] is not None]
    figs = {"valid_loss.png": _loss_figure(plt, curves, seeds) if curves else None,
            "ppl_vs_kv.png": _ppl_figure(plt, scored, seeds) if scored else None,
            "throughput.png": _speed_figure(plt, speed, result["rows"]) if speed else None}
    return {name: fig for name, fig in figs.items() if fig is not None}  # nothing to draw: no empty figure


def _loss_figure(plt, curves: list[dict], seeds: bool):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in curves:
        x, y = zip(*s["curve"])
        ax.plot([t / 1e6 for t in x], y, marker="o", markersize=3, color=s["color"],
                linestyle="-" if s["finished"] else "--", label=s["label"])
        if s["band"]:
            tokens, lo, hi = s["band"]
            ax.fill_between([t / 1e6 for t in tokens], lo, hi, color=s["color"], alpha=0.15, linewidth=0)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("Validation loss during training" + (" (line: mean over seeds; band: lowest to highest seed)"
                                                     if seeds else ""), fontsize=10 if seeds else 12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def _ppl_figure(plt, scored: list[dict], seeds: bool):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [(s["kv"], s["ppl"]) for s in scored]
    front = pareto(points)
    at = {}  # equal caches side by side, so that their bars stay apart; each label above its bar
    for x in {p[0] for p in points}:
        same = sorted((i for i, p in enumerate(points) if p[0] == x), key=lambda i: points[i][1])
        for j, i in enumerate(same):
            at[i] = x * 2 ** (0.12 * (j - (len(same) - 1) / 2))
    if front:
        ax.plot([at[i] for i in front], [points[i][1] for i in front], color="0.5", linestyle=":", zorder=1,
                label="Pareto front: nothing has both a smaller cache and a lower perplexity")
    for i, s in enumerate(scored):
        if s["ppl_range"]:
            lo, hi = s["ppl_range"]
            ax.errorbar(at[i], s["ppl"], yerr=[[s["ppl"] - lo], [hi - s["ppl"]]], color=s["color"], capsize=3,
                        linewidth=1, zorder=2)
        ax.scatter(at[i], s["ppl"], s=60 if i in front else 35, zorder=3,
                   facecolors=s["color"] if s["finished"] else "none", edgecolors=s["color"])
    tops = [s["ppl_range"][1] if s["ppl_range"] else s["ppl"] for s in scored]
    gap = 0.045 * ((max(tops) - min(p[1] for p in points)) or 1.0) if tops else 0.0
    placed: list[tuple[float, float]] = []
    for i in sorted(range(len(scored)), key=tops.__getitem__):  # a label near another one's goes above it
        y = tops[i]
        for x, other in placed:
            if abs(math.log2(at[i] / x)) < 1.0 and y < other + gap:
                y = other + gap
        placed.append((at[i], y))
        ax.annotate(scored[i]["label"], (at[i], y), textcoords="offset points", xytext=(0, 4), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xscale("log")
    ticks = sorted({p[0] for p in points})
    ax.set_xticks(ticks, [_kib(t) for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.margins(x=0.12, y=0.12)  # room for the point labels
    ax.set_xlabel("KV cache per token of context, all layers, bf16 (log scale)")
    ax.set_ylabel("final validation perplexity" + (" (mean over seeds)" if seeds else ""))
    notes = (["bars: lowest to highest seed"] * seeds
             + ["hollow: unfinished run"] * (not all(s["finished"] for s in scored)))
    ax.set_title("Perplexity against KV-cache size" + (f" ({'; '.join(notes)})" if notes else ""),
                 fontsize=10 if notes else 12)
    ax.grid(alpha=0.3)
    base = next((s for s in scored if s["baseline"]), None)
    if base:
        ref = base["ppl"]
        right = ax.secondary_yaxis("right", functions=(lambda p: 100 * (p / ref - 1), lambda d: ref * (1 + d / 100)))
        right.set_ylabel(f"perplexity change vs {base['name']}, %")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    return fig


def _speed_figure(plt, speed: list[dict], rows: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.4 * max(len(speed), 1)))
    ax.barh([s["label"] for s in speed], [s["speed"] for s in speed], color=[s["color"] for s in speed],
            hatch=[None if s["finished"] else "//" for s in speed])
    seeded = any(s["speed_range"] for s in speed)
    for y, s in enumerate(speed):
        lo, hi = s["speed_range"] or (s["speed"], s["speed"])
        if s["speed_range"]:  # several seeds: a bar from the slowest run to the fastest
            ax.errorbar(s["speed"], y, xerr=[[s["speed"] - lo], [hi - s["speed"]]], color="black", capsize=3)
        ax.annotate(f"{s['speed']:,.0f}", (hi, y), textcoords="offset points", xytext=(5, 0), va="center",
                    fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15)  # room for the value labels
    ax.set_xlabel("training throughput (tokens per second, median over steps"
                  + ("; several seeds: median run, bar: slowest to fastest)" if seeded else ")"))
    devices = sorted({f"{r['device']} × {r['world_size']} process(es)" for r in rows
                      if r["tokens_per_s"] is not None and r["device"]})
    ax.set_title("Training throughput" + (f" on {'; '.join(devices)}" if devices else ""), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def comparison(result: dict, out_dir: Path) -> list[Path]:
    """Write comparison_figures(result) into out_dir; returns the paths."""
    plt = _pyplot()
    paths = []
    for name, fig in comparison_figures(result).items():
        paths.append(_save(fig, Path(out_dir) / name))
        plt.close(fig)
    return paths


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def analysis(rows: list[dict], contexts: list[int], path: Path) -> Path:
    """KV cache against context length (log-log; variants with equal caches share one line, labelled with all
    of them) and parameters per variant, for analysis rows."""
    plt = _pyplot()
    fig, (kv, params) = plt.subplots(1, 2, figsize=(12, 4.8))
    lines: dict[int, list[str]] = {}
    for r in rows:
        lines.setdefault(r["kv_cache_bytes_per_token"], []).append(r["variant"])
    for per_token, variants in sorted(lines.items(), reverse=True):
        sizes = [per_token * c / 2 ** 30 for c in contexts]
        kv.plot(contexts, sizes, marker="o", markersize=3, label=", ".join(variants))
        kv.annotate(f"{sizes[-1]:.3g} GiB", (contexts[-1], sizes[-1]), textcoords="offset points", xytext=(4, -3),
                    fontsize=7)
    kv.set_xscale("log", base=2)
    kv.set_yscale("log")
    kv.set_xticks(contexts, [_tokens(c) for c in contexts], fontsize=8)
    kv.minorticks_off()
    kv.set_xlim(right=contexts[-1] * 2.2)  # room for the value labels
    kv.set_xlabel("context length (tokens, log scale)")
    kv.set_ylabel("KV cache of one sequence, bf16 (GiB, log scale)")
    kv.set_title("KV cache against context length")
    kv.grid(alpha=0.3)
    kv.legend(fontsize=7, title="variants (equal caches share a line)", title_fontsize=7)
    names = [f"{r['variant']}\n{r['config']}" for r in rows]
    bars = params.bar(names, [r["parameters"] / 1e6 for r in rows], color="tab:blue")
    params.bar_label(bars, [f"{r['parameters'] / 1e6:.1f}" for r in rows], fontsize=7)
    params.set_ylabel("parameters (millions)")
    params.set_title("Parameters per variant")
    params.tick_params(axis="x", labelsize=7, rotation=45)
    params.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
