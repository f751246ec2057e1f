"""PNG figures of variant comparisons (tools/compare_runs.py, tools/ablate.py) and of the variant arithmetic
(tools/analyze.py --plot). matplotlib is optional (`pip install 'megaqkv[plot]'`): without it every function
raises Unavailable, whose message says what to install, and the tables are unaffected."""
from __future__ import annotations

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


def comparison_figures(result: dict) -> dict:
    """{file name: matplotlib Figure} for compare.compare()'s result: validation loss against training tokens,
    final perplexity against KV-cache bytes per token with the Pareto front, and training throughput. An
    unfinished run is drawn dashed / hollow / hatched and labelled as such."""
    plt = _pyplot()
    rows = result["rows"]
    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    colors = {r["run"]: cmap(i % cmap.N) for i, r in enumerate(rows)}
    label = {r["run"]: r["label"] + ("" if r["finished"] else UNFINISHED) for r in rows}
    figs = {}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["valid_curve"]:
            x, y = zip(*r["valid_curve"])
            ax.plot([t / 1e6 for t in x], y, marker="o", markersize=3, color=colors[r["run"]],
                    linestyle="-" if r["finished"] else "--", label=label[r["run"]])
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("Validation loss during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    figs["valid_loss.png"] = fig

    scored = [r for r in rows if r["final_ppl"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [(r["kv_bytes_per_token"], r["final_ppl"]) for r in scored]
    front = pareto(points)
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="0.5", linestyle=":",
                zorder=1, label="Pareto front: no run has both a smaller cache and a lower perplexity")
    for i, r in enumerate(scored):
        color = colors[r["run"]]
        ax.scatter(*points[i], s=60 if i in front else 35, zorder=2, facecolors=color if r["finished"] else "none",
                   edgecolors=color)
        ax.annotate(label[r["run"]], points[i], textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ticks = sorted({p[0] for p in points})
    ax.set_xticks(ticks, [_kib(t) for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.margins(x=0.22, y=0.08)  # room for the point labels
    ax.set_xlabel("KV cache per token of context, all layers, bf16 (log scale)")
    ax.set_ylabel("final validation perplexity")
    ax.set_title("Perplexity against KV-cache size (hollow: unfinished run)")
    ax.grid(alpha=0.3)
    base = next((r["final_ppl"] for r in rows if r["run"] == result["baseline"]), None)
    if base:
        right = ax.secondary_yaxis("right", functions=(lambda p: 100 * (p / base - 1), lambda d: base * (1 + d / 100)))
        right.set_ylabel(f"perplexity change vs {result['baseline']} (QKV), %")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    figs["ppl_vs_kv.png"] = fig

    speed = [r for r in rows if r["tokens_per_s"] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.4 * max(len(speed), 1)))
    bars = ax.barh([label[r["run"]] for r in speed], [r["tokens_per_s"] for r in speed],
                   color=[colors[r["run"]] for r in speed], hatch=[None if r["finished"] else "//" for r in speed])
    ax.bar_label(bars, [f"{r['tokens_per_s']:,.0f}" for r in speed], fontsize=8, padding=2)
    ax.invert_yaxis()
    ax.margins(x=0.12)  # room for the value labels
    ax.set_xlabel("training throughput (tokens per second, median over steps)")
    devices = sorted({f"{r['device']} × {r['world_size']} process(es)" for r in speed if r["device"]})
    ax.set_title("Training throughput" + (f" on {'; '.join(devices)}" if devices else ""), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    figs["throughput.png"] = fig
    return figs


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
