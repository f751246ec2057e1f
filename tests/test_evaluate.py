"""tools/evaluate.py: exact token-weighted perplexity, the paper-compatible mode, every checkpoint format,
and the lm-eval adapter on local task definitions."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megaqkv.checkpoint import consolidated, hf, paper
from megaqkv.training import materialize
from megaqkv.data.indexed import IndexedDataset, IndexedDatasetWriter
from megaqkv.evaluation.cli import evaluate_main, generate_main
from megaqkv.evaluation.perplexity import packed_perplexity, packed_windows, paper_perplexity
from megaqkv.checkpoint.loading import build_model

from conftest import REPO
from dist_worker import random_consolidated


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents of 1-60 tokens below the tiny models' vocabulary of 1000."""
    path = tmp_path_factory.mktemp("eval") / "docs"
    g = np.random.default_rng(4)
    w = IndexedDatasetWriter(path, np.uint16)
    docs = [g.integers(0, 1000, size=g.integers(1, 61)) for _ in range(40)]
    for d in docs:
        w.add_document(d.astype(np.uint16))
    w.finalize()
    return path, docs


@pytest.fixture(scope="module")
def model():
    return build_model(random_consolidated("qmqa"))


def test_windows_predict_every_token_once(corpus):
    path, docs = corpus
    ds = IndexedDataset(path)
    stream = np.concatenate(docs)
    windows = list(packed_windows(ds, (0, len(ds)), 16, None))
    assert all(len(w) == 17 for w in windows[:-1]) and 2 <= len(windows[-1]) <= 17
    predicted = np.concatenate([w[1:] for w in windows])
    assert np.array_equal(predicted, stream[1:])  # each token after the first exactly once, in order
    limited = list(packed_windows(ds, (0, len(ds)), 16, 100))
    assert sum(len(w) - 1 for w in limited) == 100


def test_packed_perplexity_is_the_exact_token_mean(corpus, model):
    path, docs = corpus
    stream = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    losses = []
    with torch.no_grad():  # directly: windows of 17 tokens overlapping by one, summed per token
        for start in range(0, len(stream) - 1, 16):
            w = stream[start:start + 17][None]
            losses.append(F.cross_entropy(model(w[:, :-1]).logits[0], w[0, 1:], reduction="none"))
    expected = torch.cat(losses)
    result = packed_perplexity(model, IndexedDataset(path), (0, len(docs)), 16, batch_size=5)
    assert result.tokens == len(stream) - 1 == expected.numel()
    assert abs(result.loss - expected.mean().item()) < 1e-5
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_paper_compatible_masks_or_scores_the_padding(corpus, model):
    path, docs = corpus
    real, scored, pad = paper_perplexity(model, IndexedDataset(path), (0, len(docs)), 32, 7, pad_id=999)
    assert real.tokens == sum(min(len(d), 33) - 1 for d in docs) and scored.tokens == 32 * len(docs)
    assert pad == pytest.approx(1 - real.tokens / scored.tokens)
    own = []
    with torch.no_grad():
        for d in docs:
            t = torch.from_numpy(d[:33].astype(np.int64))[None]
            if t.shape[1] > 1:
                own.append(F.cross_entropy(model(t[:, :-1]).logits[0], t[0, 1:], reduction="none"))
    assert abs(real.loss - torch.cat(own).mean().item()) < 1e-5  # padding neither attends back nor counts
    assert scored.loss != real.loss


def test_perplexity_identical_through_every_checkpoint_format(corpus, tmp_path, capsys):
    path, _ = corpus
    ck = random_consolidated("kv")
    formats = {"consolidated": consolidated.save(ck, tmp_path / "c"), "paper": paper.write(ck, tmp_path / "p.pt"),
               "hf": hf.export(ck, tmp_path / "hf", tokenizer="none"),
               "hf-gpt2": hf.export(ck, tmp_path / "hf-gpt2", kind="gpt2", tokenizer="none"),
               "deepspeed": materialize.write(tmp_path / "c", tmp_path / "ds", tp=1, pp=1, dp=1, precision="fp32")}
    seen = {}
    for fmt, where in formats.items():
        out = tmp_path / f"{fmt}.json"
        assert evaluate_main(["--checkpoint", str(where), "--data", str(path), "--seq-length", "32",
                              "--json", str(out)]) == 0
        row = json.loads(out.read_text())["perplexity"][0]
        seen[fmt] = (row["tokens"], row["loss"])
    tokens = {t for t, _ in seen.values()}
    losses = [loss for _, loss in seen.values()]
    assert len(tokens) == 1 and max(losses) - min(losses) < 1e-6, seen
    header, row = capsys.readouterr().out.splitlines()[-2:]
    assert header.split() == ["data", "tokens", "loss", "ppl"] and row.split()[0] == str(path)


def test_generate_cli_reports_the_cache(tmp_path, capsys):
    consolidated.save(random_consolidated("qmqa"), tmp_path / "c")
    assert generate_main(["--checkpoint", str(tmp_path / "c"), "--prompt", "Alice was", "--max-new-tokens", "5"]) == 2
    assert "vocabulary of 50257 does not fit the model's 1000 embedding rows" in capsys.readouterr().err  # GPT-2
    assert generate_main(["--checkpoint", str(tmp_path / "c"), "--prompt", "Alice was", "--prompt", "The Queen",
                          "--max-new-tokens", "5", "--tokenizer", str(byte_tokenizer(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "=== Alice was" in out and "=== The Queen" in out
    # 2 layers × 1 shared K=V head × 8 dims × 4 bytes = 64 bytes per token slot
    assert "Q-MQA" in out and "(64 bytes per token slot, fp32)" in out
    # without --tokenizer: the one the training run recorded
    ck = random_consolidated("qmqa")
    ck.trainer["tokenizer"] = str(byte_tokenizer(tmp_path))
    consolidated.save(ck, tmp_path / "recorded")
    assert generate_main(["--checkpoint", str(tmp_path / "recorded"), "--prompt", "Alice was",
                          "--max-new-tokens", "5"]) == 0
    assert "=== Alice was" in capsys.readouterr().out
    ck.trainer["tokenizer"] = str(tmp_path / "gone.model")
    consolidated.save(ck, tmp_path / "gone")
    assert generate_main(["--checkpoint", str(tmp_path / "gone"), "--prompt", "Alice was"]) == 2
    assert f"made with tokenizer {tmp_path / 'gone.model'}, which is not here; pass --tokenizer" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------- lm-eval


@pytest.fixture
def harness(model):
    pytest.importorskip("lm_eval")
    from megaqkv.data.tokenizers import GPT2_EOD
    from megaqkv.evaluation.harness import MegaqkvLM

    class Tok:  # the tiny models have 1000 tokens: a byte-level stand-in keeps ids in range
        eod = GPT2_EOD % 1000
        vocab_size = 1000

        def encode_batch(self, texts):
            return [[b % 999 for b in t.encode()] for t in texts]

        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode(errors="replace")

    return MegaqkvLM(model=model, tokenizer=Tok(), batch_size=3)


class Req:
    def __init__(self, *args):
        self.args = args


def direct_logprob(model, context, continuation):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).logits[0], -1)
    return sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_adapter_loglikelihood_and_rolling_equal_direct_scores(harness, model):
    reqs = [Req("The cat", " sat"), Req("A", " much longer continuation here"), Req("", "start")]
    got = harness.loglikelihood(reqs)
    tok = harness.tok
    assert got[0][0] == pytest.approx(direct_logprob(model, tok.encode_batch(["The cat"])[0],
                                                     tok.encode_batch([" sat"])[0]), abs=1e-4)
    assert got[2][0] == pytest.approx(direct_logprob(model, [harness.eot_token_id], tok.encode_batch(["start"])[0]),
                                      abs=1e-4)
    text = "rolling perplexity text"
    rolling = harness.loglikelihood_rolling([Req(text)])[0]
    assert rolling == pytest.approx(direct_logprob(model, [harness.eot_token_id], tok.encode_batch([text])[0]),
                                    abs=1e-4)


def test_adapter_generate_until_cuts_at_stop_strings(harness):
    free = harness.generate_until([Req("Once upon", {"until": [], "max_gen_toks": 12})])[0]
    stop = next(ch for ch in free[1:] if ch.strip()) if free.strip() else None
    if stop:
        cut = harness.generate_until([Req("Once upon", {"until": [stop], "max_gen_toks": 12})])[0]
        assert cut == free[:free.index(stop)]


def test_adapter_fits_long_generations_and_continuations_into_the_window(harness):
    out = harness.generate_until([Req("Once", {"until": ["\n"], "max_gen_toks": 1000})])  # > the 256 positions
    assert isinstance(out[0], str)
    score, _ = harness.loglikelihood([Req("x", "y" * 400)])[0]  # longer than the window: the part that fits
    assert score < 0


def test_local_tasks_through_evaluate_and_lm_evals_command_line(tmp_path, monkeypatch, capsys):
    """tools/evaluate.py and lm-eval's own command line (`megaqkv-lm-eval --model megaqkv`, no --device, the
    tokenizer the checkpoint records) score the local tasks alike; without CUDA the CLI's default cuda:0 falls
    back to the CPU."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ck = random_consolidated("kv")
    tok = byte_tokenizer(tmp_path)
    ck.trainer["tokenizer"] = str(tok)
    consolidated.save(ck, tmp_path / "c")
    cfg = ck.config
    assert cfg.vocab_size == 1000
    out = tmp_path / "r.json"
    tasks = "megaqkv_tiny_mc,megaqkv_tiny_gen,megaqkv_tiny_ppl"
    code = evaluate_main(["--checkpoint", str(tmp_path / "c"), "--tasks", tasks, "--num-fewshot", "1",
                          "--include-path", "tests/fixtures/lm_eval", "--tokenizer", str(tok), "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["lm_eval"]
    assert 0.0 <= results["megaqkv_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["megaqkv_tiny_gen"]["exact_match,none"] <= 1.0
    assert math.isfinite(results["megaqkv_tiny_ppl"]["word_perplexity,none"])

    run = subprocess.run([sys.executable, "tools/run_lm_eval.py", "--model", "megaqkv", "--model_args",
                          f"checkpoint={tmp_path / 'c'}", "--tasks", tasks, "--num_fewshot", "1", "--include_path",
                          "tests/fixtures/lm_eval", "--batch_size", "2", "--output_path", str(tmp_path / "cli")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "megaqkv: device cuda:0 requested but CUDA is not available; using the CPU" in run.stderr
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]
    for task, metric in (("megaqkv_tiny_mc", "acc,none"), ("megaqkv_tiny_mc", "acc_norm,none"),
                         ("megaqkv_tiny_gen", "exact_match,none"), ("megaqkv_tiny_ppl", "word_perplexity,none")):
        assert cli[task][metric] == pytest.approx(results[task][metric], rel=1e-5), (task, metric)


def test_importing_the_adapter_keeps_lm_evals_own_models(monkeypatch):
    """lm-eval fills its registry with its own names only while the registry is empty; registering megaqkv
    first used to hide them ('no model for this name found' for --model hf)."""
    pytest.importorskip("lm_eval")
    import importlib

    from lm_eval.api.registry import get_model, model_registry

    import megaqkv.evaluation.harness as harness

    monkeypatch.setattr(model_registry, "_objs", {})  # a fresh process: nothing registered yet
    monkeypatch.delitem(sys.modules, "lm_eval.models", raising=False)
    importlib.reload(harness)
    assert get_model("megaqkv") is harness.MegaqkvLM
    assert get_model("dummy").__name__ == "DummyLM"


def test_adapter_refuses_unknown_model_args():
    pytest.importorskip("lm_eval")
    from megaqkv.evaluation.harness import MegaqkvLM

    with pytest.raises(ValueError, match="unknown model_args dtpye; it takes checkpoint"):
        MegaqkvLM(checkpoint="unused", dtpye="bf16")


def byte_tokenizer(tmp_path):
    """A HF tokenizer.json whose ids fit the tiny models' 1000-token vocabulary (bytes, plus an EOD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {pre_tokenizers.ByteLevel.alphabet()[i]: i for i in range(256)}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "bytes.json"
    tok.save(str(path))
    return path
