#!/usr/bin/env python3
"""Our training samples against megatron-core's BlendedMegatronDatasetBuilder + GPTDataset on the benchmark corpus,
at seq 2048 (run by hand; tests/test_megatron_samples.py does the same on tiny data in CI).

    python bench/megatron_samples.py [--corpus ../shared/data/corpus/real.jsonl.zst] [--work DIR]

Preprocesses the corpus with tools/preprocess_data.py --split-by-set (GPT-2 BPE + EOD; kept in --work and reused),
merges the sets into one prefix, and compares every split, index arrays and every sample's tokens, for: the whole
corpus as one prefix (several epochs), a weighted blend of its four sets, the same blend unweighted (by size, one
epoch each), and the blend as separate train/valid paths. Prints the table of cases, samples compared and the first
difference; exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from megaqkv.data.indexed import merge, paths  # noqa: E402

SETS = ("RedPajamaBook", "RedPajamaStackExchange", "RedPajamaGithub", "RedPajamaWikipedia")
SEQ, SEED = 2048, 1234


def prepare(corpus: Path, work: Path) -> tuple[str, list[str]]:
    """(whole-corpus prefix, one prefix per set), preprocessed once into `work`."""
    sets = [str(work / f"real_{name}_text_document") for name in SETS]
    if not all(p.is_file() for s in sets for p in paths(s)):
        subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus),
                        "--output-prefix", str(work / "real"), "--split-by-set", "--workers", "1", "--no-progress",
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    whole = str(work / "real_all_text_document")
    if not all(p.is_file() for p in paths(whole)):
        merge(sets, whole)
    return whole, sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "data" / "corpus" / "real.jsonl.zst")
    parser.add_argument("--work", type=Path, help="where the preprocessed corpus and the indices go (default: temp)")
    args = parser.parse_args()
    if not args.corpus.is_file():
        print(f"skipped: {args.corpus} not found (the benchmark corpus, see ../shared/data/README.md)")
        return 0
    try:
        from megatron_reference import compare
    except ImportError:
        print("skipped: megatron-core is not installed (pip install -e .[test])")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        whole, sets = prepare(args.corpus, work)
        weights = [0.5, 0.2, 0.2, 0.1]
        rows = compare("whole corpus, one prefix, split 969/30/1", [whole], None, [22_101, 400, 60], SEQ, SEED,
                       work / "indices", ratios=(969, 30, 1))
        rows += compare("4 sets blended 0.5/0.2/0.2/0.1, split 90/7/3", sets, weights, [20_000, 500, 100], SEQ, SEED,
                        work / "indices", ratios=(90, 7, 3))
        rows += compare("4 sets unweighted (by size), split 90/7/3", sets, None, [3_000, 200, 50], SEQ, SEED,
                        work / "indices", ratios=(90, 7, 3))
        rows += compare("4 sets blended, separate train/valid paths", sets, weights, [10_000, 1_000, 0], SEQ, SEED,
                        work / "indices", ratios=None)
    print(f"seq {SEQ}, seed {SEED}; {args.corpus.name}: GPT-2 BPE + EOD, sets {', '.join(SETS)}\n")
    print("| case | split | samples compared | first difference |\n|---|---|---|---|")
    for case, split, n, first in rows:
        print(f"| {case} | {split} | {n:,} | {first} |")
    return 0 if all(first.startswith("none") for *_, first in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
