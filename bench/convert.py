#!/usr/bin/env python3
"""Checkpoint conversion: time and peak memory for a 300M model on CPU, and the round-trip table (by hand).

    python bench/convert.py [--skip-300m] [--skip-table]

1. Trains one step of 300M Q–K=V at TP=2 (bf16) to get a real DeepSpeed checkpoint with optimizer
   state, then times each conversion of tools/convert_ckpt.py (wall time, peak summed RSS of the
   process tree, including the processes it spawns).
2. For every tiny preset, random weights and Adam moments go through each path and come back:
   the table gives the max logit difference against the original and whether the tensors are
   bit-identical.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaqkv.checkpoint import consolidated, deepspeed_format, hf, paper  # noqa: E402
from megaqkv.training import materialize  # noqa: E402
from megaqkv.checkpoint.consolidated import Consolidated  # noqa: E402
from megaqkv.checkpoint.loading import build_model  # noqa: E402
from megaqkv.config import load_model_config  # noqa: E402
from megaqkv.data.preprocess import Options, preprocess  # noqa: E402
from megaqkv.parallel.sharding import canonical_shapes  # noqa: E402
from megaqkv.variants import PRESETS  # noqa: E402

from common import run_measured  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


def bench_300m(work: Path) -> None:
    prefix = work / "data" / "slim"
    preprocess(Options(inputs=[str(REPO / "tests" / "fixtures" / "SlimPajama-627B")], output_prefix=str(prefix),
                       progress=False))
    ds = work / "ds_tp2"
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "pretrain.py"),
             "--model-config", str(REPO / "model_configs" / "300M_kv.yaml"), "--tp", "2", "--save", str(ds),
             "--data-path", f"{prefix}_train_text_document", "--valid-data-path", f"{prefix}_validation_text_document",
             "--set", "training.train_steps=1", "--set", "training.train_tokens=null", "--set", "training.micro_batch_size=1",
             "--set", "training.global_batch_size=1", "--set", "training.seq_length=128", "--set", "eval.tokens=128",
             "--set", "eval.interval=0"]
    wall, peak, *_ = run_measured(train, ENV)
    print(f"300M Q–K=V, one bf16 step at TP=2 to make the checkpoint: {wall:.0f} s, peak {peak / 2**30:.1f} GiB")
    tool = [sys.executable, str(REPO / "tools" / "convert_ckpt.py")]
    steps = [("DeepSpeed TP=2 → consolidated, with optimizer state", ["--to", "consolidated", "--input", str(ds),
                                                                     "--output", str(work / "c")]),
             ("DeepSpeed TP=2 → consolidated, weights only", ["--to", "consolidated", "--weights-only", "--input",
                                                            str(ds), "--output", str(work / "cw")]),
             ("consolidated → DeepSpeed PP=2 (with optimizer)", ["--to", "deepspeed", "--pp", "2", "--input",
                                                                str(work / "c"), "--output", str(work / "ds_pp2")]),
             ("consolidated → Hugging Face native", ["--to", "hf", "--input", str(work / "c"), "--output",
                                                    str(work / "hf")]),
             ("consolidated → Hugging Face GPT-2", ["--to", "hf-gpt2", "--input", str(work / "c"), "--output",
                                                   str(work / "hf_gpt2")]),
             ("consolidated → paper format", ["--to", "paper", "--input", str(work / "c"), "--output",
                                             str(work / "paper" / "final_model.pt")]),
             ("verify: DeepSpeed PP=2 vs weights-only consolidated (both bf16)",
              ["verify", str(work / "ds_pp2"), str(work / "cw")]),
             ("verify: HF native export vs consolidated (both fp32)", ["verify", str(work / "hf"), str(work / "c")]),
             ("verify: HF GPT-2 export vs consolidated (both fp32)", ["verify", str(work / "hf_gpt2"),
                                                                      str(work / "c")])]
    print("\n| conversion (300M, CPU) | wall s | peak memory |\n|---|---|---|")
    for name, args in steps:
        wall, peak, out, _ = run_measured(tool + args, ENV)
        print(f"| {name} | {wall:.1f} | {peak / 2**30:.2f} GiB |")
        if args[0] == "verify":
            print(f"|  ↳ {out.strip().splitlines()[-1].split(': ', 1)[1]} | | |")


def random_state(preset: str) -> Consolidated:
    cfg = load_model_config(REPO / "model_configs" / f"tiny_{preset}.yaml")
    g = torch.Generator().manual_seed(0)
    shapes = canonical_shapes(cfg)
    rand = lambda: {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    ck = Consolidated(cfg, rand(), {"exp_avg": rand(), "exp_avg_sq": {k: v.abs() for k, v in rand().items()}})
    ck.trainer = {"step": 3, "consumed_samples": 24, "optimizer_step": 3.0}
    return ck


def round_trip_table(work: Path) -> None:
    print("\n| preset | DeepSpeed TP=2×PP=2 → consolidated | consolidated → TP=4 → consolidated | paper | HF native | "
          "HF GPT-2 |")
    print("|---|---|---|---|---|---|")
    for preset in PRESETS:
        ck = random_state(preset)
        tokens = torch.randint(0, ck.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = build_model(ck)(tokens).logits
        src = consolidated.save(ck, work / f"{preset}_c", force=True)
        cells = []
        for tp, pp in ((2, 2), (4, 1)):
            out = materialize.write(src, work / f"{preset}_tp{tp}pp{pp}", tp, pp, 1, "fp32", force=True)
            back = deepspeed_format.read(out, with_optimizer=(tp, pp) == (2, 2), log=lambda *a: None)
            same = all(torch.equal(back.weights[k], ck.weights[k]) for k in ck.weights) and all(
                torch.equal(back.optimizer[s][k], ck.optimizer[s][k]) for s in back.optimizer for k in ck.weights)
            with torch.no_grad():
                diff = (build_model(back)(tokens).logits - ref).abs().max().item()
            cells.append(f"{diff:.1e}{', bit-identical' if same else ''}")
        back = paper.read(paper.write(ck, work / f"{preset}.pt"))
        with torch.no_grad():
            cells.append(f"{(build_model(back)(tokens).logits - ref).abs().max().item():.1e}")
        from transformers import AutoModelForCausalLM

        for kind in hf.KINDS:
            path = hf.export(ck, work / f"{preset}_hf_{kind}", force=True, kind=kind)
            with torch.no_grad():
                theirs = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()(tokens).logits
            cells.append(f"{(theirs - ref).abs().max().item():.1e}")
        print(f"| {preset} | " + " | ".join(cells) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-300m", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    args = parser.parse_args()
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory(prefix="megaqkv-bench-") as tmp:
        if not args.skip_300m:
            bench_300m(Path(tmp) / "300m")
        if not args.skip_table:
            round_trip_table(Path(tmp) / "table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
