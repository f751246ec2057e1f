"""The native Hugging Face model (`convert_ckpt.py --to hf`): the same logits and greedy tokens as megaqkv,
a cache holding what the variant needs and no more, and the ecosystem's own tools (Auto classes, generate,
beam search, pipeline, lm-eval, remote code in a venv without megaqkv) working on the export."""
import json
import os
import subprocess
import sys
import venv

import pytest
import torch

from megaqkv.checkpoint import consolidated, hf
from megaqkv.checkpoint.loading import build_model
from megaqkv.convert import main as convert_main
from megaqkv.model.generation import Sampling, generate
from megaqkv.variants import PRESETS, AttentionLayout, kv_cache_bytes_per_token, total_parameters

from conftest import REPO
from dist_worker import random_consolidated
from test_evaluate import byte_tokenizer

transformers = pytest.importorskip("transformers")
EXACT = 1e-5
PROMPTS = [[5, 17, 300, 42, 7, 99, 512], [8, 1], [640, 3, 3, 71]]  # of three lengths: a left-padded batch


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every tiny preset through the command line: consolidated -> native HF directory."""
    root = tmp_path_factory.mktemp("native")
    out = {}
    for preset in PRESETS:
        consolidated.save(random_consolidated(preset), root / f"{preset}_c")
        assert convert_main(["--to", "hf", "--input", str(root / f"{preset}_c"), "--output", str(root / preset),
                             "--tokenizer", "none"]) == 0
        out[preset] = root / preset
    return out


def load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


def left_padded(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def cache_bytes(cache) -> int:
    """Bytes of the distinct tensors the cache holds (a tensor serving as key and value counts once)."""
    storages = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_native_model_is_megaqkv_without_duplication(exports, preset):
    truth = random_consolidated(preset)
    model = load(exports[preset])
    assert type(model).__name__ == "MegaQKVForCausalLM"  # registered by importing megaqkv: no remote code
    assert sum(p.numel() for p in model.parameters()) == total_parameters(truth.config)
    tokens = torch.randint(0, truth.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = build_model(truth)(tokens).logits, model(tokens).logits
    assert (ours - theirs).abs().max().item() <= EXACT
    back = hf.read(exports[preset])  # and back, bit for bit
    assert back.config == truth.config and all(torch.equal(back.weights[k], truth.weights[k]) for k in truth.weights)


def test_untied_head_without_biases(tmp_path):
    truth = random_consolidated("qgqa4", tie_embeddings=False, bias=False)
    hf.export(truth, tmp_path / "hf", tokenizer="none")
    model = load(tmp_path / "hf")
    assert sum(p.numel() for p in model.parameters()) == total_parameters(truth.config)
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert (build_model(truth)(tokens).logits - model(tokens).logits).abs().max().item() <= EXACT
    back = hf.read(tmp_path / "hf")
    assert all(torch.equal(back.weights[k], truth.weights[k]) for k in truth.weights)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_greedy_generate_equals_megaqkv_and_the_cache_holds_the_formula(exports, preset):
    truth = random_consolidated(preset)
    new = 12
    ours = generate(build_model(truth), PROMPTS, Sampling(max_new_tokens=new)).tokens
    ids, mask = left_padded(PROMPTS)
    out = load(exports[preset]).generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                         pad_token_id=0, return_dict_in_generate=True)
    assert [row[ids.shape[1]:].tolist() for row in out.sequences] == ours
    cache = out.cache
    held = cache.get_seq_length()
    assert held == ids.shape[1] + new - 1  # the last token is sampled, not yet fed
    assert cache_bytes(cache) == len(PROMPTS) * held * kv_cache_bytes_per_token(truth.config, 4)


def test_cache_savings_at_the_300m_shape():
    """Per layer and token at 300M (16 heads of 64): K=V caches exactly half of QKV, Q-MQA 1/32, measured from
    the tensors transformers' generate leaves in the cache — and the GPT-2 export caches as QKV whatever the
    variant."""
    from megaqkv.hf.configuration_megaqkv import MegaQKVConfig
    from megaqkv.hf.modeling_megaqkv import MegaQKVForCausalLM

    shape = dict(num_hidden_layers=1, hidden_size=1024, num_attention_heads=16, intermediate_size=64, vocab_size=64,
                 max_position_embeddings=64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    held = {}
    for name, sharing, g in (("qkv", "none", 16), ("kv", "kv", 16), ("qmqa", "kv", 1)):
        torch.manual_seed(0)
        model = MegaQKVForCausalLM(MegaQKVConfig(sharing=sharing, num_key_value_heads=g, **shape)).eval()
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        held[name] = cache_bytes(out.cache)
        layout = AttentionLayout(sharing, 16, g, 64)
        assert held[name] == 2 * out.cache.get_seq_length() * layout.kv_cache_bytes_per_token(4)
    assert held["kv"] * 2 == held["qkv"] and held["qmqa"] * 32 == held["qkv"]


@pytest.mark.parametrize("preset", ["kv", "qmqa", "qk", "gqa4"])
def test_beam_search_and_static_cache_agree_with_the_gpt2_export(exports, tmp_path, preset):
    """Beam search reorders the cache every step: the one-tensor K=V layers must follow, so the native model's
    beams equal the duplicated GPT-2's, and a static (preallocated) cache gives the dynamic one's tokens."""
    assert convert_main(["--to", "hf-gpt2", "--input", str(exports[preset]), "--output", str(tmp_path / "gpt2"),
                         "--tokenizer", "none"]) == 0
    native, gpt2 = load(exports[preset]), load(tmp_path / "gpt2")
    ids, mask = left_padded(PROMPTS)
    beams = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
    assert torch.equal(native.generate(ids, **beams), gpt2.generate(ids, **beams))
    greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(native.generate(ids, cache_implementation="static", **greedy), native.generate(ids, **greedy))


def test_a_preallocated_static_cache_keeps_one_tensor(exports):
    """Chunked prefill allocates the static cache before the first forward: the K=V layers still end up holding
    one buffer, and the tokens are the dynamic cache's."""
    model = load(exports["kv"])
    ids, mask = left_padded(PROMPTS)
    greedy = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(ids, cache_implementation="static", prefill_chunk_size=3, return_dict_in_generate=True,
                         **greedy)
    assert torch.equal(out.sequences, model.generate(ids, **greedy))
    layer = out.cache.layers[0]
    assert type(layer).__name__ == "SharedKVStaticLayer" and layer.values is layer.keys
    assert cache_bytes(out.cache) == len(PROMPTS) * layer.max_cache_len * kv_cache_bytes_per_token(
        random_consolidated("kv").config, 4)


def test_registration_survives_an_availability_probe():
    """Libraries probe for transformers (importlib.util.find_spec) before importing it; the model must still be
    registered when transformers is imported afterwards."""
    script = ("import importlib.util, megaqkv; assert importlib.util.find_spec('transformers'); import transformers; "
              "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; print('megaqkv' in CONFIG_MAPPING)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert run.stdout.strip() == "True", run.stderr[-2000:]


def test_past_key_values_continue_a_forward(exports):
    """Manual incremental decoding through `past_key_values=`/`cache=`: the logits of a full forward."""
    model = load(exports["qmqa"])
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full = model(tokens).logits
        first = model(tokens[:, :4], use_cache=True)
        rest = model(tokens[:, 4:], past_key_values=first.cache, use_cache=True)
    assert (torch.cat([first.logits, rest.logits], 1) - full).abs().max().item() <= EXACT
    assert type(rest.cache.layers[0]).__name__ == "SharedKVLayer" and rest.cache.layers[0].values is \
        rest.cache.layers[0].keys


@pytest.mark.parametrize("preset", ["kv", "gqa4"])
def test_eager_attention_equals_sdpa_on_a_padded_batch(exports, preset):
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        sdpa = load(exports[preset])(ids, attention_mask=mask).logits
        eager = load(exports[preset], attn_implementation="eager")(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (sdpa[real] - eager[real]).abs().max().item() <= EXACT


def test_loss_and_gradients_for_fine_tuning(exports):
    """`labels=` gives megaqkv's loss, and gradient checkpointing (as PEFT/Trainer enable it) the same gradients."""
    truth = random_consolidated("qmqa")
    tokens = torch.randint(0, truth.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    ours = build_model(truth)(tokens[:, :-1], labels=tokens[:, 1:]).loss
    grads = []
    for checkpointing in (False, True):
        model = load(exports["qmqa"]).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        grads.append(model.model.layers[0].attn.kv.weight.grad.clone())
        assert abs(loss.item() - ours.item()) <= EXACT
    assert torch.allclose(grads[0], grads[1], atol=1e-7) and grads[0].abs().sum() > 0


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A Q-MQA model exported with a real tokenizer (bytes as a HF tokenizer.json, so ids fit the tiny vocab)."""
    root = tmp_path_factory.mktemp("text")
    consolidated.save(random_consolidated("qmqa"), root / "c")
    tok = byte_tokenizer(root)
    assert convert_main(["--to", "hf", "--input", str(root / "c"), "--output", str(root / "hf"),
                         "--tokenizer", str(tok)]) == 0
    return root / "c", root / "hf", tok


def test_export_ships_tokenizer_generation_config_and_card(text_model):
    _, export, _ = text_model
    names = set(os.listdir(export))
    assert {"config.json", "model.safetensors", "configuration_megaqkv.py", "modeling_megaqkv.py",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"} <= names
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_megaqkv.MegaQKVForCausalLM"
    assert (config["sharing"], config["num_key_value_heads"], config["eos_token_id"]) == ("kv", 1, 256)
    card = (export / "README.md").read_text()
    params = total_parameters(random_consolidated("qmqa").config)
    for words in ("| variant | Q-MQA |", "| KV heads | 1 of 16 query heads |", f"| parameters | {params:,} |",
                  "| KV cache per token (bf16) | 32 bytes (3.1% of QKV's 1,024) |", "| training steps | 7 |"):
        assert words in card


def test_pipeline_greedy_text_equals_tools_generate(text_model, capsys):
    from megaqkv.evaluation.cli import generate_main

    ck, export, tok = text_model
    prompt = "Alice was beginning"
    assert generate_main(["--checkpoint", str(ck), "--prompt", prompt, "--max-new-tokens", "10",
                          "--tokenizer", str(tok)]) == 0
    ours = capsys.readouterr().out.split(f"=== {prompt}\n")[1].split("\n--- ")[0]
    pipe = transformers.pipeline("text-generation", model=str(export), device="cpu")
    theirs = pipe(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert theirs == ours


def test_exported_tokenizers_encode_as_megaqkv(tmp_path):
    """GPT-2 BPE, a HF tokenizer.json and a sentencepiece model, each exported with a model and loaded by
    AutoTokenizer, give megaqkv's ids — special-token strings inside a text included, as in the training data."""
    import sentencepiece as spm
    import tokenizers

    from megaqkv.data.tokenizers import build_tokenizer

    text = (REPO / "README.md").read_text()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=500, hard_vocab_limit=False, model_type="unigram", unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2)
    text = text[:3000]
    samples = [text, "  two spaces, a tab\t, ü 漢字 🙂 and <|endoftext|> or </s> inside", " leading"]
    templated = tokenizers.Tokenizer.from_file(str(byte_tokenizer(tmp_path)))
    vocab = {**templated.get_vocab(), "</s>": 257}  # an EOD that is a plain vocabulary entry, and a BOS template
    plain = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    plain.pre_tokenizer, plain.decoder = templated.pre_tokenizer, templated.decoder
    plain.post_processor = tokenizers.processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 257)])
    plain.save(str(tmp_path / "templated.json"))
    for spec, vocab in (("gpt2", 50304), (str(byte_tokenizer(tmp_path)), 1000), (str(tmp_path / "sp.model"), 1000),
                        (str(tmp_path / "templated.json"), 1000)):
        out = tmp_path / f"export_{len(os.listdir(tmp_path))}"
        hf.export(random_consolidated("kv", vocab_size=vocab), out, tokenizer=spec)
        theirs = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
        ours = build_tokenizer(spec)
        assert hf.read(out).trainer["tokenizer"] in (spec, str(out / "tokenizer.json"), str(out / "tokenizer.model"))
        for sample in samples:
            ids = theirs(sample)["input_ids"]  # with the default add_special_tokens=True: nothing is added
            assert ids == ours.encode_batch([sample])[0], (spec, sample[:40])
            assert theirs.decode(ids) == ours.decode(ids)
        assert theirs.eos_token_id == theirs.pad_token_id == ours.eod and theirs.padding_side == "left"


def test_tokenizer_errors_name_what_to_do(tmp_path, capsys):
    consolidated.save(random_consolidated("kv"), tmp_path / "c")
    (tmp_path / "junk.model").write_bytes(b"\x00not a sentencepiece model")
    (tmp_path / "junk.json").write_text('{"model": {"type": "BPE"')
    for extra, words in (([], "does not record its tokenizer and its vocabulary (1000) is smaller than GPT-2's"),
                         (["--tokenizer", "gpt2"], "50257 tokens do not fit the model's vocabulary (1000)"),
                         (["--tokenizer", str(tmp_path / "missing.model")], "no such file"),
                         (["--tokenizer", str(tmp_path / "junk.model")], f"--tokenizer, {tmp_path / 'junk.model'}: "),
                         (["--tokenizer", str(tmp_path / "junk.json")], f"--tokenizer, {tmp_path / 'junk.json'}: ")):
        assert convert_main(["--to", "hf", "--input", str(tmp_path / "c"), "--output", str(tmp_path / "x"),
                             *extra]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_remote_code_in_a_venv_without_megaqkv(exports, tmp_path):
    """A fresh venv that sees torch and transformers but not megaqkv loads the export by its shipped files."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    # the dependencies' directory as a plain path: the editable megaqkv install's .pth hook is not run there
    deps = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "transformers")))
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(deps + "\n")
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = load(exports["qgqa4"])(tokens).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import importlib.util, torch, transformers
assert importlib.util.find_spec("megaqkv") is None, "megaqkv is importable"
model = transformers.AutoModelForCausalLM.from_pretrained({str(exports["qgqa4"])!r}, trust_remote_code=True,
                                                          dtype=torch.float32).eval()
tokens = torch.tensor([{PROMPTS[0]}])
with torch.no_grad():
    got = model(tokens).logits
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
print(type(model).__module__, (got - expected).abs().max().item())
out = model.generate(tokens, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
print(type(out.cache.layers[0]).__name__, tuple(out.cache.layers[0].keys.shape))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(python), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    module, diff = run.stdout.split("\n")[0].split()
    assert module.startswith("transformers_modules.") and float(diff) <= EXACT
    assert run.stdout.split("\n")[1] == "SharedKVLayer (1, 4, 9, 8)"  # qgqa4: 4 K=V heads of 8, one tensor


def test_lm_eval_hf_scores_equal_the_megaqkv_adapter(text_model, tmp_path, monkeypatch):
    """`lm_eval --model hf` on the export (its plain command line, remote code) and megaqkv's own adapter on the
    checkpoint score the local tasks alike."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from megaqkv.evaluation.cli import evaluate_main

    ck, export, tok = text_model
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = "megaqkv_tiny_mc,megaqkv_tiny_gen,megaqkv_tiny_ppl"
    assert evaluate_main(["--checkpoint", str(ck), "--tasks", tasks, "--num-fewshot", "1", "--include-path",
                          "tests/fixtures/lm_eval", "--tokenizer", str(tok), "--json", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["lm_eval"]
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    run = subprocess.run([lm_eval, "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
                          "--tasks", tasks, "--num_fewshot", "1", "--include_path", "tests/fixtures/lm_eval",
                          "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "theirs")],
                         capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(next((tmp_path / "theirs").rglob("results_*.json")).read_text())["results"]
    for task, metric in (("megaqkv_tiny_mc", "acc,none"), ("megaqkv_tiny_mc", "acc_norm,none"),
                         ("megaqkv_tiny_gen", "exact_match,none"), ("megaqkv_tiny_ppl", "word_perplexity,none")):
        assert theirs[task][metric] == pytest.approx(ours[task][metric], rel=1e-5), (task, metric)
