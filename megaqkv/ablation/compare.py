"""tools/compare_runs.py: runs of several variants side by side, as a table (text, markdown, JSON) and figures.

    python tools/compare_runs.py RUN_DIR... [--format text|markdown|json] [--plot DIR]

A RUN_DIR is a pretrain.py --save directory (or its tensorboard directory), or an ablation directory whose
subdirectories are runs. Per run: the paper's variant name, parameters, KV-cache bytes per token (bf16, all
layers), final and best validation loss and perplexity, the final perplexity's change against the QKV run,
training tokens/s (median), MFU (median), peak memory, steps done and wall time. Runs that are not the same
experiment (other data, sequence length, budget, schedule, model shape) are compared anyway, with a warning
naming every key that differs; unfinished runs are listed, plotted and marked as such; runs of one variant that
differ only in training.seed give the seed noise the differences between variants should be read against.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from ..variants import kv_cache_bytes_per_token, paper_name, total_parameters
from . import runs

SEED = "training.seed"


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return statistics.median(values) if values else None


def summarize(run: runs.Run) -> dict:
    m = run.config.model
    final = run.valid[-1] if run.valid else None
    finite = [r for r in run.valid if math.isfinite(r["loss"])]
    best = min(finite, key=lambda r: r["loss"]) if finite else None
    memory = [r["memory_gib"] for r in run.train if "memory_gib" in r]
    return {
        "run": run.name, "path": str(run.path), "variant": paper_name(m.sharing, m.num_heads, m.kv_heads),
        "sharing": m.sharing, "num_kv_heads": m.kv_heads, "seed": run.config.training.seed,
        "parameters": total_parameters(m), "kv_bytes_per_token": kv_cache_bytes_per_token(m),
        "diverged": bool(final) and not math.isfinite(final["loss"]),
        "final_step": final["step"] if final else None, "final_loss": final["loss"] if final else None,
        "final_ppl": _ppl(final["loss"]) if final else None,
        "best_loss": best["loss"] if best else None, "best_ppl": _ppl(best["loss"]) if best else None,
        "tokens_per_s": _median(run.train, "tokens_per_s"), "mfu": _median(run.train, "mfu"),
        "peak_memory_gib": max(memory) if memory else None, "steps_done": run.steps_done,
        "total_steps": run.total_steps, "finished": run.finished, "wall_s": run.wall_seconds,
        "tokens_per_step": run.tokens_per_step, "world_size": run.world_size, "device": run.device,
        "layout": {"tp": run.config.parallel.tp, "pp": run.config.parallel.pp, "sp": run.config.parallel.sp},
        "valid_curve": [(r["step"] * run.tokens_per_step, r["loss"]) for r in run.valid],
    }


def _groups(values: dict[str, object]) -> str:
    """{run: value} -> 'value1 (a, b); value2 (c)'."""
    by_value: dict[str, list[str]] = {}
    for name, value in values.items():
        by_value.setdefault(json.dumps(value), []).append(name)
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in by_value.items())


def differences(all_runs: list[runs.Run]) -> list[str]:
    """Warnings for every experiment key (data, sequence length, budget, schedule, model shape) on which the
    runs disagree; the variant's own keys and the seed are what a comparison is meant to vary."""
    exps = {r.name: r.experiment() for r in all_runs}
    keys = sorted(set().union(*exps.values()) - set(runs.VARIANT_KEYS) - {SEED})
    out = []
    for key in keys:
        values = {name: exp.get(key) for name, exp in exps.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            out.append(f"the runs differ in {key}: {_groups(values)}")
    places = {r.name: f"{r.device or '?'} × {r.world_size or '?'}" for r in all_runs}
    if len(set(places.values())) > 1:
        out.append(f"throughput and MFU were measured on different hardware: {_groups(places)}")
    return out


def by_variant(rows: list[dict], all_runs: list[runs.Run]) -> list[dict]:
    """Finished runs grouped by everything but training.seed (in an ablation: one group per variant). Across a
    group's seeds, the spread of the final validation loss is the yardstick for differences between variants,
    and its mean is compared with the QKV group's mean, which is steadier than one seed against one seed."""
    groups: dict[str, list[dict]] = {}
    for row, run in zip(rows, all_runs):
        if row["final_loss"] is not None and row["finished"] and not row["diverged"]:
            key = json.dumps({k: v for k, v in run.experiment().items() if k != SEED}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(row)
    base = next((g for g in groups.values() if g[0]["variant"] == "QKV"), None)
    qkv = [m["final_loss"] for m in base] if base else []
    qkv_mean = statistics.mean(qkv) if qkv else None
    out = []
    for members in groups.values():
        losses = [m["final_loss"] for m in members]
        mean = statistics.mean(losses)
        # Welch's t of the mean loss against QKV's: the difference in standard errors (2-3 seeds: a rough guide)
        err = math.sqrt(statistics.variance(losses) / len(losses) + statistics.variance(qkv) / len(qkv)) \
            if members is not base and len(qkv) > 1 and len(losses) > 1 else 0.0
        out.append({"variant": members[0]["variant"], "runs": [m["run"] for m in members],
                    "seeds": [m["seed"] for m in members], "final_loss": losses, "mean_loss": mean,
                    "std_loss": statistics.stdev(losses) if len(losses) > 1 else None, "mean_ppl": math.exp(mean),
                    "ppl_spread_pct": 100 * (math.exp(max(losses) - min(losses)) - 1),
                    "mean_ppl_vs_qkv_pct": None if qkv_mean is None else 100 * (math.exp(mean - qkv_mean) - 1),
                    "t_vs_qkv": (mean - qkv_mean) / err if err > 0 else None,
                    "kv_bytes_per_token": members[0]["kv_bytes_per_token"]})
    return out


def _label(row: dict, same_variant: list[dict]) -> str:
    """The variant's paper name; with its seed, or else its run's name, when several runs have that variant."""
    if len(same_variant) == 1:
        return row["variant"]
    if len({o["seed"] for o in same_variant}) == len(same_variant):
        return f"{row['variant']} seed {row['seed']}"
    return f"{row['variant']} ({row['run']})"


def _vs_baseline(row: dict, baseline: dict | None) -> float | None:
    """The row's final validation perplexity against the baseline's after the same number of training tokens
    (an unfinished run is compared where it stands); None where the baseline has no finite validation there."""
    if baseline is None or row["final_loss"] is None or row["diverged"]:
        return None
    ref = dict(baseline["valid_curve"]).get(row["valid_curve"][-1][0])
    return None if ref is None or not math.isfinite(ref) else 100 * (math.exp(row["final_loss"] - ref) - 1)


def compare(paths: list[str | Path]) -> dict:
    """Load and summarize the runs; raises runs.RunError for a directory that is not a run."""
    all_runs = [runs.load(p) for p in runs.expand(paths)]
    names = [r.name for r in all_runs]
    if len(set(names)) < len(names):  # e.g. two ablation directories with the same variant names
        for r in all_runs:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    rows = [summarize(r) for r in all_runs]
    qkv = [r for r in rows if r["variant"] == "QKV" and r["final_loss"] is not None and not r["diverged"]]
    baseline = next((r for r in qkv if r["finished"]), qkv[0] if qkv else None)
    for r in rows:
        r["ppl_vs_qkv_pct"] = _vs_baseline(r, baseline)
        r["label"] = _label(r, [o for o in rows if o["variant"] == r["variant"]])
    warnings = differences(all_runs)
    warnings += [f"{r['run']} diverged: its validation loss at step {r['final_step']} is {r['final_loss']}"
                 for r in rows if r["diverged"]]
    warnings += [f"{r['run']}: no ppl vs QKV, since {baseline['run']} has no validation result after the same "
                 f"{r['valid_curve'][-1][0]:,} training tokens" for r in rows
                 if baseline and r["ppl_vs_qkv_pct"] is None and r["final_loss"] is not None and not r["diverged"]]
    warnings += [f"{r['run']} is unfinished (step {r['steps_done']} of {r['total_steps']}): " + (
        f"its final loss is the newest validation (step {r['final_step']}), not the end of its budget"
        if r["final_loss"] is not None else "no validation result yet") for r in rows if not r["finished"]]
    return {"rows": rows, "baseline": baseline["run"] if baseline else None, "variants": by_variant(rows, all_runs),
            "warnings": warnings}


def _num(value, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


HEADER = ["variant", "run", "params", "KV B/token", "final loss", "final ppl", "best loss", "best ppl",
          "ppl vs QKV", "tokens/s", "MFU", "peak mem GiB", "steps", "wall"]


def table_rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        delta = r["ppl_vs_qkv_pct"]
        out.append([r["label"], r["run"], f"{r['parameters']:,}", f"{r['kv_bytes_per_token']:,}",
                    _num(r["final_loss"], ".4f"), _num(r["final_ppl"], ".2f"), _num(r["best_loss"], ".4f"),
                    _num(r["best_ppl"], ".2f"), "–" if delta is None else f"{delta:+.2f}%",
                    _num(r["tokens_per_s"], ",.0f"), _num(r["mfu"], ".1f", 100) + ("" if r["mfu"] is None else "%"),
                    _num(r["peak_memory_gib"], ".2f"),
                    f"{r['steps_done']}/{r['total_steps']}" + ("" if r["finished"] else " unfinished"),
                    _hms(r["wall_s"])])
    return out


def notes(result: dict) -> list[str]:
    lines = [f"baseline: {result['baseline']}" if result["baseline"] else
             "baseline: no QKV run with a validation result among these, so no 'ppl vs QKV'"]
    lines += [f"warning: {w}" for w in result["warnings"]]
    lines.append("KV B/token: KV cache of all layers per token of context in bf16; ppl vs QKV: final validation "
                 "perplexity against the baseline's after as many training tokens (an unfinished run: where it "
                 "stands); tokens/s and MFU: medians over the run's steps; wall: the training loop's time")
    return lines


SEED_HEADER = ["variant", "seeds", "final loss per seed", "mean loss", "sample std", "ppl spread", "ppl of mean",
               "vs QKV mean", "t vs QKV", "KV B/token"]


def seed_rows(result: dict) -> list[list[str]]:
    return [[g["variant"], " ".join(map(str, g["seeds"])), " ".join(f"{x:.4f}" for x in g["final_loss"]),
             f"{g['mean_loss']:.4f}", _num(g["std_loss"], ".4f"),
             "–" if len(g["seeds"]) == 1 else f"{g['ppl_spread_pct']:.2f}%", f"{g['mean_ppl']:.2f}",
             "–" if g["mean_ppl_vs_qkv_pct"] is None else f"{g['mean_ppl_vs_qkv_pct']:+.2f}%",
             _num(g["t_vs_qkv"], "+.1f"),
             f"{g['kv_bytes_per_token']:,}"] for g in result["variants"]]


def _table(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
            "| " + " | ".join(row) + " |" for row in body]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]


def render(result: dict, fmt: str) -> str:
    """The table (and, when some variant has several seeds, the means over seeds) with the notes."""
    if fmt == "json":
        return json.dumps(result, indent=1)
    markdown = fmt == "markdown"
    lines = _table(HEADER, table_rows(result), markdown)
    if any(len(g["seeds"]) > 1 for g in result["variants"]):
        title = ("Mean over seeds (finished runs; ppl spread: largest over smallest final perplexity among the seeds, "
                 "the seed noise; t vs QKV: the mean loss's difference from QKV's in standard errors (Welch), "
                 "beyond about 2-3 a difference the seeds do not explain)")
        lines += ["", f"**{title}**" if markdown else title,
                  *([""] if markdown else []), *_table(SEED_HEADER, seed_rows(result), markdown)]
    return "\n".join(lines + [""] + [f"- {n}" if markdown else n for n in notes(result)])


def report(paths: list[Path], fmt: str, out_dir: Path) -> None:
    """The end of an ablation: print the table, write out_dir/comparison.md and .json and the figures (a note
    instead of figures when matplotlib is missing)."""
    from .. import figures

    try:
        result = compare(paths)
    except runs.RunError as exc:
        print(f"no comparison: {exc}", flush=True)
        return
    print(render(result, fmt), flush=True)
    for name, fmt in (("comparison.md", "markdown"), ("comparison.json", "json")):
        tmp = out_dir / f".{name}.tmp"  # a killed process leaves no cut-short table under the name
        tmp.write_text(render(result, fmt) + "\n")
        tmp.replace(out_dir / name)
    try:
        drawn = figures.comparison(result, out_dir)
        print(f"tables in {out_dir}/comparison.md and .json; figures: {', '.join(map(str, drawn))}", flush=True)
    except figures.Unavailable as exc:
        print(f"tables in {out_dir}/comparison.md and .json; no figures: {exc}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (pretrain.py --save), or ablation directories")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    parser.add_argument("--plot", type=Path, metavar="DIR",
                        help="write valid_loss.png, ppl_vs_kv.png and throughput.png into DIR (needs matplotlib: "
                             "pip install 'megaqkv[plot]')")
    args = parser.parse_args(argv)
    from .. import figures

    try:
        result = compare(args.runs)
    except runs.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(result, args.format))
    if args.plot:
        try:
            for path in figures.comparison(result, args.plot):
                print(f"wrote {path}", file=sys.stderr)
        except figures.Unavailable as exc:
            print(f"error: --plot: {exc}", file=sys.stderr)
            return 2
    return 0
