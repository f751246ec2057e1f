"""Variant ablations: tools/ablate.py end to end (2 variants × 4 steps: interrupted under torchrun with TP=2, resumed,
skipped when finished), and tools/compare_runs.py on run directories written here: the table's numbers against
the metrics, its warnings (not a run, other data or sequence length, unfinished), seed noise, the figures and
what happens without matplotlib."""
import json
import math
import subprocess
import sys

import pytest

from megaqkv import figures
from megaqkv.ablation import ablate, compare, runs
from megaqkv.analysis import main as analyze_main
from megaqkv.config import load_config
from megaqkv.training.monitor import write_run_record
from megaqkv.variants import kv_cache_bytes_per_token, total_parameters

from conftest import MODEL_CONFIGS, REPO, cpu_env, torchrun

TINY = ["--model-config", str(MODEL_CONFIGS / "tiny_qkv.yaml"),
        "--train-config", str(REPO / "train_configs" / "tiny.yaml")]
SMALL = ["--set", "training.micro_batch_size=4", "--set", "training.global_batch_size=8", "--set",
         "training.seq_length=64", "--set", "training.warmup_steps=1", "--set", "training.train_steps=4", "--set",
         "eval.interval=2", "--set", "eval.tokens=1024", "--set", "eval.at_start=false", "--set", "logging.interval=1",
         "--set", "checkpoint.interval=0"]
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(directory, preset="qkv", overrides=(), done=4, total=4, valid=(7.0, 6.0), tokens_per_s=1000.0):
    """A run directory as pretrain.py leaves it: run.json (the real writer) and metrics.jsonl rows; `done` of
    `total` steps trained, validation at the middle and (when finished) the last step."""
    cfg = load_config(MODEL_CONFIGS / f"tiny_{preset}.yaml", REPO / "train_configs" / "tiny.yaml",
                      [f"training.train_steps={total}", *overrides])
    write_run_record(directory / "tensorboard", cfg, world_size=1)
    tokens = cfg.training.global_batch_size * cfg.training.seq_length
    rows = [{"kind": "train", "step": s, "loss": 8.0 - s / 10, "tokens_per_s": tokens_per_s + s, "mfu": 0.01 * s,
             "memory_gib": 1.0 + s / 100, "consumed_tokens": s * tokens, "elapsed_s": 2.0 * s}
            for s in range(1, done + 1)]
    steps = [total // 2, total][:len(valid)]
    rows += [{"kind": "valid", "step": s, "loss": loss, "tokens": 1024} for s, loss in zip(steps, valid) if s <= done]
    rows.sort(key=lambda r: (r["step"], r["kind"] == "valid"))
    (directory / "tensorboard" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def table(capsys, *args) -> tuple[int, str, str]:
    code = compare.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_table_holds_the_runs_numbers(tmp_path, capsys):
    write_run(tmp_path / "ab" / "qkv", valid=(7.0, 6.0))
    write_run(tmp_path / "ab" / "kv", "kv", valid=(7.1, 6.1), tokens_per_s=1200.0)
    code, out, err = table(capsys, tmp_path / "ab", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    qkv, kv = result["rows"]  # an ablation directory: its runs, qkv first
    cfg = load_config(MODEL_CONFIGS / "tiny_kv.yaml").model
    assert (kv["variant"], kv["parameters"], kv["kv_bytes_per_token"]) == ("Q–K=V", total_parameters(cfg),
                                                                          kv_cache_bytes_per_token(cfg))
    assert kv["kv_bytes_per_token"] * 2 == qkv["kv_bytes_per_token"]
    assert kv["final_loss"] == 6.1 and kv["best_loss"] == 6.1 and kv["final_ppl"] == pytest.approx(math.exp(6.1))
    assert kv["ppl_vs_qkv_pct"] == pytest.approx(100 * (math.exp(0.1) - 1)) and qkv["ppl_vs_qkv_pct"] == 0
    assert kv["tokens_per_s"] == 1202.5 and kv["mfu"] == pytest.approx(0.025)  # medians of steps 1-4
    assert kv["peak_memory_gib"] == 1.04 and kv["wall_s"] == 8.0 and kv["finished"]
    assert result["baseline"] == "qkv" and result["warnings"] == [] and len(result["variants"]) == 2
    code, out, _ = table(capsys, tmp_path / "ab" / "qkv", tmp_path / "ab" / "kv", "--format", "markdown")
    assert "| Q–K=V | kv | " in out
    assert "| 6.1000 | 445.86 | 6.1000 | 445.86 | +10.52% | 1,202 | 2.5% | 1.04 | 4/4 |" in out


def test_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = table(capsys, tmp_path / "empty")
    assert code == 2 and f"{tmp_path / 'empty'}: not a training run: no metrics.jsonl in it or in" in err
    code, _, err = table(capsys, tmp_path / "nowhere")
    assert code == 2 and "nowhere: not a directory" in err
    run = write_run(tmp_path / "r")
    (run / "tensorboard" / "run.json").unlink()  # and no checkpoint holds the config
    code, _, err = table(capsys, run)
    assert code == 2 and "has no run.json beside it" in err and "no complete checkpoint holds the config" in err
    run = write_run(tmp_path / "g")
    with open(run / "tensorboard" / "metrics.jsonl", "r+") as f:
        lines = f.readlines()
        f.seek(0)
        f.writelines(lines[:2] + ["garbage\n"] + lines[2:])
    code, _, err = table(capsys, run)
    assert code == 2 and "metrics.jsonl:3: not a metrics row ('garbage')" in err
    with open(run / "tensorboard" / "metrics.jsonl", "w") as f:  # a killed run's last line, cut short
        f.writelines(lines + ['{"kind": "train", "st'])
    assert table(capsys, run)[0] == 0


def test_runs_of_other_data_or_sequence_length_are_named(tmp_path, capsys):
    write_run(tmp_path / "qkv")
    write_run(tmp_path / "kv", "kv", ["data.path=[other/data_text_document]", "training.seq_length=64"])
    code, out, _ = table(capsys, tmp_path / "qkv", tmp_path / "kv")
    assert code == 0
    assert ('warning: the runs differ in data.path: ["demo_run/data/slim_train_text_document"] (qkv); '
            '["other/data_text_document"] (kv)') in out
    assert "warning: the runs differ in training.seq_length: 128 (qkv); 64 (kv)" in out
    assert "model.sharing" not in out  # what the comparison is meant to vary is no warning


def test_an_unfinished_run_is_plotted_and_marked(tmp_path, capsys):
    write_run(tmp_path / "qkv")
    write_run(tmp_path / "kv", "kv", done=3, valid=(6.5,))
    code, out, _ = table(capsys, tmp_path / "qkv", tmp_path / "kv", "--plot", tmp_path / "figs")
    assert code == 0 and "3/4 unfinished" in out
    assert "warning: kv is unfinished (step 3 of 4): its final loss is the newest validation (step 2)" in out
    result = compare.compare([tmp_path / "qkv", tmp_path / "kv"])
    assert result["rows"][1]["ppl_vs_qkv_pct"] == pytest.approx(100 * (math.exp(-0.5) - 1))  # both at step 2
    figs = figures.comparison_figures(result)
    curves = {l.get_label(): l.get_linestyle() for l in figs["valid_loss.png"].axes[0].get_lines()}
    assert curves == {"QKV": "-", "Q–K=V (unfinished)": "--"}
    kv_ax = figs["ppl_vs_kv.png"].axes[0]
    assert {t.get_text() for t in kv_ax.texts} == {"QKV", "Q–K=V (unfinished)"}
    assert [len(c.get_facecolors()) for c in kv_ax.collections] == [1, 0]  # no face: a hollow marker
    bars = figs["throughput.png"].axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["QKV", "Q–K=V (unfinished)"]
    assert [p.get_hatch() for p in bars.patches] == [None, "//"]
    for name in ("valid_loss.png", "ppl_vs_kv.png", "throughput.png"):
        assert (tmp_path / "figs" / name).read_bytes()[:8] == PNG


def test_seeds_of_one_variant_give_the_seed_noise(tmp_path):
    write_run(tmp_path / "qkv", valid=(7.0, 6.0))
    write_run(tmp_path / "qkv_seed7", overrides=["training.seed=7"], valid=(7.0, 6.02))
    write_run(tmp_path / "qkv_seed8", overrides=["training.seed=8"], valid=(7.0, 6.04))
    write_run(tmp_path / "kv", "kv", valid=(7.0, 6.1))
    write_run(tmp_path / "kv_seed7", "kv", ["training.seed=7"], valid=(7.0, 6.0))
    result = compare.compare([tmp_path / n for n in ("qkv", "qkv_seed7", "qkv_seed8", "kv", "kv_seed7")])
    assert [r["label"] for r in result["rows"]] == ["QKV seed 1234", "QKV seed 7", "QKV seed 8", "Q–K=V seed 1234",
                                                    "Q–K=V seed 7"]
    qkv, kv = result["variants"]
    assert qkv["runs"] == ["qkv", "qkv_seed7", "qkv_seed8"] and qkv["seeds"] == [1234, 7, 8]
    assert qkv["mean_loss"] == pytest.approx(6.02) and qkv["std_loss"] == pytest.approx(0.02)
    assert qkv["ppl_spread_pct"] == pytest.approx(100 * (math.exp(0.04) - 1))
    assert kv["mean_ppl_vs_qkv_pct"] == pytest.approx(100 * (math.exp(6.05 - 6.02) - 1))
    assert result["warnings"] == []  # the seed is no difference in data or budget
    text = compare.render(result, "text").splitlines()
    means = text.index(next(l for l in text if l.startswith("Mean over seeds")))
    assert text[means + 3].split() == ["QKV", "1234", "7", "8", "6.0000", "6.0200", "6.0400", "6.0200", "0.0200",
                                       "4.08%", "411.58", "+0.00%", "–", "1,024"]
    assert text[means + 4].split() == ["Q–K=V", "1234", "7", "6.1000", "6.0000", "6.0500", "0.0707", "10.52%",
                                       "424.11", "+3.05%", "+0.6", "512"]  # t: 0.03 / √(0.005/2 + 0.0004/3)
    figs = figures.comparison_figures(result)  # one series per variant: the mean, and the seeds' range
    lines = figs["valid_loss.png"].axes[0].get_lines()
    assert [l.get_label() for l in lines] == ["QKV, 3 seeds", "Q–K=V, 2 seeds"]
    assert list(lines[0].get_ydata()) == pytest.approx([7.0, 6.02])
    assert len(figs["valid_loss.png"].axes[0].collections) == 2  # the bands
    kv_ax = figs["ppl_vs_kv.png"].axes[0]
    assert sorted(t.get_text() for t in kv_ax.texts) == ["QKV, 3 seeds", "Q–K=V, 2 seeds"]
    caps = sorted(y for l in kv_ax.get_lines() if l.get_marker() == "_" for y in l.get_ydata())
    assert caps == pytest.approx(sorted(math.exp(x) for x in (6.0, 6.04, 6.0, 6.1)))
    assert "vs QKV (mean of 3 seeds)" in kv_ax.child_axes[0].get_ylabel()
    assert [p.get_width() for p in figs["throughput.png"].axes[0].patches] == [1002.5] * 2  # the median run


def test_no_comparison_without_a_baseline_point_and_diverged_runs_are_named(tmp_path, capsys):
    write_run(tmp_path / "qkv", valid=(7.0, 6.0))
    write_run(tmp_path / "kv", "kv", done=6, total=6, valid=(6.5, 6.1))  # another budget
    write_run(tmp_path / "mqa", "mqa", valid=(6.4, math.nan))
    result = compare.compare([tmp_path / n for n in ("qkv", "kv", "mqa")])
    qkv, kv, mqa = result["rows"]
    assert kv["ppl_vs_qkv_pct"] is None  # QKV has no validation after kv's 6 steps: no quiet fallback
    assert "kv: no ppl vs QKV, since qkv has no validation result after the same" in " ".join(result["warnings"])
    assert mqa["diverged"] and mqa["ppl_vs_qkv_pct"] is None and mqa["best_loss"] == 6.4
    assert "mqa diverged: its validation loss at step 4 is nan" in result["warnings"]
    assert [g["variant"] for g in result["variants"]] == ["QKV", "Q–K=V"]  # a diverged run is in no mean
    figs = figures.comparison_figures(result)
    assert sorted(t.get_text() for t in figs["ppl_vs_kv.png"].axes[0].texts) == ["QKV", "Q–K=V"]


def test_a_run_without_validation_finishes_and_draws_no_empty_figures(tmp_path):
    write_run(tmp_path / "qkv", "qkv", ["data.split=[100, 0, 0]", "data.valid_path=[]"], valid=())
    result = compare.compare([tmp_path / "qkv"])
    assert result["rows"][0]["finished"] and result["rows"][0]["final_loss"] is None
    assert list(figures.comparison_figures(result)) == ["throughput.png"]


def test_seeded_and_single_runs_in_one_figure(tmp_path):
    """The README's ablation (qkv twice, kv and qmqa once) draws every figure: error bars where there are seeds."""
    write_run(tmp_path / "qkv", tokens_per_s=1000.0)
    write_run(tmp_path / "qkv_seed7", overrides=["training.seed=7"], tokens_per_s=1200.0)
    write_run(tmp_path / "kv", "kv", tokens_per_s=1100.0)
    figs = figures.comparison_figures(compare.compare([tmp_path / n for n in ("qkv", "qkv_seed7", "kv")]))
    bars = figs["throughput.png"].axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["QKV, 2 seeds", "Q–K=V"]
    assert [p.get_width() for p in bars.patches] == [1202.5, 1102.5]  # the faster QKV seed is the median run
    assert sorted(t.get_text() for t in figs["ppl_vs_kv.png"].axes[0].texts) == ["QKV, 2 seeds", "Q–K=V"]


def test_pareto_front():
    points = [(4096, 10.0), (2048, 10.5), (2048, 11.0), (1024, 12.0), (512, 12.5), (256, 12.2)]
    assert figures.pareto(points) == [5, 3, 1, 0]


def test_without_matplotlib_the_tables_stay_and_the_figures_say_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets where it is not installed
    write_run(tmp_path / "qkv")
    code, out, err = table(capsys, tmp_path / "qkv", "--plot", tmp_path / "figs")
    assert code == 2 and "final loss" in out and not (tmp_path / "figs").exists()
    assert "error: --plot: matplotlib is not installed; pip install 'megaqkv[plot]'" in err
    assert analyze_main(["--scale", "tiny", "--plot", str(tmp_path / "a.png")]) == 2
    out = capsys.readouterr()
    assert "Parameters and KV cache" in out.out and "matplotlib is not installed" in out.err
    compare.report([tmp_path / "qkv"], "text", tmp_path)  # an ablation's end: tables, then a note
    out = capsys.readouterr().out
    assert (tmp_path / "comparison.md").is_file() and "no figures: matplotlib is not installed" in out


def test_analyze_plot(tmp_path, capsys):
    assert analyze_main(["--scale", "tiny", "--context", "4096", "--plot", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("args, message", [
    (["qkv", "--dir", "D", "--", *TINY, "--save", "x"], "--save x: the ablation trains each variant into --dir"),
    (["qkv", "--dir", "D", "--", *TINY, "--set", "model.sharing=kv"], "--set model.sharing=kv: the ablation sets"),
    (["qkv", "wide", "--dir", "D", "--", *TINY], "variant 'wide': unknown preset 'wide'; use one of qkv, qk"),
    (["qkv@x", "--dir", "D", "--", *TINY], "variant 'qkv@x': the seed after @ must be a non-negative integer"),
    (["kv", "kv", "--dir", "D", "--", *TINY], "variant kv is listed twice"),
    (["qkv", "gqa4", "--dir", "D", "--", *TINY, "--set", "model.num_heads=2", "--set", "model.hidden_size=128"],
     f"variant gqa4: {MODEL_CONFIGS / 'tiny_qkv.yaml'} (with --set model.num_kv_heads=4): model.num_kv_heads: 4 "
     "does not divide num_heads=2"),
])
def test_ablation_mistakes_are_reported_before_training(tmp_path, monkeypatch, capsys, slim_data, args, message):
    monkeypatch.chdir(tmp_path)
    assert ablate.main(args + slim_data) == 2
    assert message in capsys.readouterr().err


def test_each_variant_gets_its_own_logs_and_every_seed_the_same_validation(tmp_path, monkeypatch, slim_data):
    """A train config naming logging.tensorboard_dir must not make two variants share one metrics.jsonl; seeds
    change training.seed only, the validation samples stay the base seed's; deepspeed's --local_rank is taken."""
    shared = tmp_path / "train.yaml"
    shared.write_text((REPO / "train_configs" / "tiny.yaml").read_text() + f"  tensorboard_dir: {tmp_path / 'tb'}\n")
    monkeypatch.chdir(tmp_path)
    args, pre = ablate.parse_args(["--local_rank=0", "qkv", "qkv@7", "kv", "--dir", "D", "--", "--model-config",
                                   str(MODEL_CONFIGS / "tiny_qkv.yaml"), "--train-config", str(shared), *slim_data])
    configs = ablate.configure([ablate.parse_variant(v) for v in args.variants], pre, args.dir)
    assert [c.logging.tensorboard_dir for c in configs] == [f"D/{n}/tensorboard" for n in ("qkv", "qkv_seed7", "kv")]
    assert [(c.training.seed, c.eval.seed) for c in configs] == [(1234, 1234), (7, 1234), (1234, 1234)]


def test_ablation_needs_the_separator(capsys):
    with pytest.raises(SystemExit):
        ablate.main(["qkv", "--dir", "D", *TINY])
    assert "give the pretrain.py arguments after --" in capsys.readouterr().err


def ablation(*args):
    proc = subprocess.run(torchrun(2, REPO / "tools" / "ablate.py", *args), env=cpu_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_ablate_two_variants_interrupted_resumed_and_skipped(tmp_path, monkeypatch, capsys, slim_data):
    out_dir = tmp_path / "ab"
    common = ["qkv", "kv", "--dir", str(out_dir), "--", *TINY, *SMALL, *slim_data]
    first = ablation(*common, "--tp", "2", "--set", "training.exit_after_steps=2")
    assert "ablation: 2 variant(s) into" in first and "each 4 steps × 8 × 64 = 2,048 tokens" in first
    assert "ablation stopped during qkv (QKV) (exit_after_steps=2); run the same command again" in first
    assert not (out_dir / "kv").exists()
    second = ablation(*common, "--tp", "2")
    assert "== 1/2 qkv (QKV) -> " in second and "(resuming)" in second and "resumed from" in second
    assert "finished at step 4/4" in second and "tables in" in second
    rows = [json.loads(l) for l in open(out_dir / "qkv" / "tensorboard" / "metrics.jsonl")]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("valid", 2), ("train", 3),
                                                      ("train", 4), ("valid", 4)]
    result = json.loads((out_dir / "comparison.json").read_text())
    assert [(r["run"], r["finished"], r["steps_done"]) for r in result["rows"]] == [("qkv", True, 4), ("kv", True, 4)]
    assert result["rows"][1]["final_loss"] == json.loads(
        (out_dir / "kv" / "tensorboard" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert result["warnings"] == []  # identical data, seed, budget and schedule
    assert "| Q–K=V | kv |" in (out_dir / "comparison.md").read_text()
    for name in ("valid_loss.png", "ppl_vs_kv.png", "throughput.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG
    # finished variants are skipped (also at another layout: here one process, in this one, which starts no process
    # group when nothing is left to train); a run without run.json is read through its checkpoint
    (out_dir / "kv" / "tensorboard" / "run.json").unlink()
    monkeypatch.chdir(tmp_path)
    assert ablate.main(common) == 0
    third = capsys.readouterr().out
    assert "qkv (QKV): finished in" in third and "kv (Q–K=V): finished in" in third and "resum" not in third
    assert compare.compare([out_dir])["rows"][1]["final_loss"] == result["rows"][1]["final_loss"]
    # other settings in the same directory: an error naming what differs, nothing trained
    assert ablate.main([*common, "--set", "training.lr=0.01"]) == 2
    assert f"{out_dir / 'qkv'} holds a run with other settings: training.lr is 0.003 there, 0.01 here" in \
        capsys.readouterr().err


def test_runs_of_two_ablations_keep_apart(tmp_path):
    for ab, loss in (("a", 6.0), ("b", 6.2)):
        write_run(tmp_path / ab / "qkv", valid=(7.0, loss))
    result = compare.compare([tmp_path / "a", tmp_path / "b"])
    assert [(r["run"], r["label"]) for r in result["rows"]] == [("a/qkv", "QKV (a/qkv)"), ("b/qkv", "QKV (b/qkv)")]
    assert result["rows"][1]["ppl_vs_qkv_pct"] == pytest.approx(100 * (math.exp(0.2) - 1))
    lines = figures.comparison_figures(result)["valid_loss.png"].axes[0].get_lines()
    assert [l.get_label() for l in lines] == ["QKV, 2 runs"]  # one seed twice: repeats, not seeds


def test_seed_groups_of_two_experiments_stay_apart_in_the_figures(tmp_path):
    for ab, lr in (("a", "1e-3"), ("b", "2e-3")):
        write_run(tmp_path / ab / "qkv", overrides=[f"training.lr={lr}"])
        write_run(tmp_path / ab / "qkv_seed7", overrides=[f"training.lr={lr}", "training.seed=7"])
    result = compare.compare([tmp_path / "a", tmp_path / "b"])
    assert [g["runs"] for g in result["variants"]] == [["a/qkv", "a/qkv_seed7"], ["b/qkv", "b/qkv_seed7"]]
    lines = figures.comparison_figures(result)["valid_loss.png"].axes[0].get_lines()
    assert [l.get_label() for l in lines] == ["QKV, 2 seeds (a/qkv, …)", "QKV, 2 seeds (b/qkv, …)"]
