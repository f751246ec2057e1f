"""KV-cached decoding: equal to the full forward for every preset, cache bytes equal to DESIGN's formula,
sampling controls, batched prompts of different lengths."""
import dataclasses

import pytest
import torch

from megaqkv.config import load_model_config
from megaqkv.model import GPT
from megaqkv.model.generation import Sampling, generate, sample_next
from megaqkv.model.kv_cache import KVCache
from megaqkv.variants import PRESETS

from conftest import MODEL_CONFIGS

TOL = 1e-5


def tiny(preset, **changes):
    cfg = dataclasses.replace(load_model_config(MODEL_CONFIGS / f"tiny_{preset}.yaml"), vocab_size=1000,
                              hidden_dropout=0.0, **changes)
    model = GPT(cfg, seed=3).eval()
    with torch.no_grad():  # away from the init, so that every term matters
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("preset", list(PRESETS))
def test_cached_decoding_equals_full_forward(preset):
    model = tiny(preset)
    seq = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq).logits
        cache = KVCache(model.cfg, 2, 48, torch.float32)
        parts = [model(seq[:, :13], cache=cache).logits]  # prefill, then one token at a time
        parts += [model(seq[:, t:t + 1], cache=cache).logits for t in range(13, 48)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("preset", ["qkv", "kv", "qmqa", "gqa4"])
def test_left_padded_batch_equals_each_prompt_alone(preset):
    model = tiny(preset)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 17, 11)]
    batched = generate(model, prompts, Sampling(max_new_tokens=12))
    for prompt, tokens in zip(prompts, batched.tokens):
        alone = generate(model, [prompt], Sampling(max_new_tokens=12)).tokens[0]
        assert tokens == alone
        with torch.no_grad():  # greedy by hand from full forwards
            seq = list(prompt)
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert tokens == seq[len(prompt):]


DESIGN_BYTES_300M = {"qkv": 80 * 1024, "qk": 80 * 1024, "kv": 40 * 1024, "k": 40 * 1024, "gqa4": 20 * 1024,
                     "gqa8": 40 * 1024, "mqa": 5 * 1024, "qgqa4": 10 * 1024, "qgqa8": 20 * 1024, "qmqa": 2560}


@pytest.mark.parametrize("scale", ["300M", "1.2B"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_cache_bytes_equal_the_formula(scale, preset):
    cfg = load_model_config(MODEL_CONFIGS / f"{scale}_{preset}.yaml")
    cache = KVCache(cfg, batch=2, max_len=4, dtype=torch.bfloat16)  # really allocated
    measured = cache.bytes_per_token()
    shared = cfg.sharing in ("kv", "qkv")
    formula = cfg.num_layers * (1 if shared else 2) * cfg.kv_heads * cfg.head_dim * 2  # DESIGN §2, bf16
    assert measured == formula
    assert (cache.keys is cache.values) == shared and cache.keys[0].shape[1] == cfg.kv_heads
    if scale == "300M":
        assert measured == DESIGN_BYTES_300M[preset]


def test_kv_halves_and_qmqa_is_one_32nd():
    per_token = {p: KVCache(load_model_config(MODEL_CONFIGS / f"300M_{p}.yaml"), 1, 2, torch.bfloat16).bytes_per_token()
                 for p in ("qkv", "kv", "qmqa")}
    assert per_token["kv"] * 2 == per_token["qkv"] and per_token["qmqa"] * 32 == per_token["qkv"]


def test_cache_is_preallocated_not_concatenated():
    model = tiny("qmqa")
    cache = KVCache(model.cfg, 1, 30, torch.float32)
    pointers = [t.data_ptr() for t in cache.keys]
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        for t in range(20):
            model(torch.tensor([[t]]), cache=cache)
    assert [t.data_ptr() for t in cache.keys] == pointers and cache.length == 23
    with pytest.raises(ValueError, match="KV cache full"):
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long), cache=cache)


def test_sampling_controls():
    logits = torch.tensor([[0.1, 2.0, 0.3, 1.9], [3.0, 0.0, 2.9, 0.1]])
    g = lambda seed=0: torch.Generator().manual_seed(seed)
    assert sample_next(logits, Sampling(temperature=0), g()).tolist() == [1, 0]
    assert sample_next(logits, Sampling(temperature=1.0, top_k=1), g()).tolist() == [1, 0]
    assert sample_next(logits, Sampling(temperature=1.0, top_p=1e-6), g()).tolist() == [1, 0]
    draws = {tuple(sample_next(logits, Sampling(temperature=1.0, top_k=2), g(s)).tolist()) for s in range(40)}
    assert draws <= {(1, 0), (3, 0), (1, 2), (3, 2)} and len(draws) > 1  # only the two best ever come up
    same = [sample_next(logits, Sampling(temperature=1.0), g(7)).tolist() for _ in range(2)]
    assert same[0] == same[1]


def test_stop_tokens_and_limits():
    model = tiny("kv")
    prompt = [5, 6, 7]
    free = generate(model, [prompt], Sampling(max_new_tokens=10)).tokens[0]
    stop = free[4]
    cut = generate(model, [prompt, prompt], Sampling(max_new_tokens=10, stop_tokens=(stop,)))
    first = free.index(stop)
    assert cut.tokens == [free[:first]] * 2 and cut.stopped == [True, True]
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        generate(model, [[1] * 250], Sampling(max_new_tokens=10))


def test_vocabulary_padding_is_never_sampled():
    """Embedding rows past the tokenizer's vocabulary are padding: even when they score highest, generation
    (greedy and sampled) picks real ids only."""
    model = tiny("qmqa")
    with torch.no_grad():
        model.wte.weight[990:] = model.wte.weight[:10].abs().sum(0) * 50  # tied head: padding rows win
    prompt = [5, 6, 7]
    assert max(generate(model, [prompt], Sampling(max_new_tokens=4)).tokens[0]) >= 990  # the trap is real
    for s in (Sampling(max_new_tokens=8), Sampling(max_new_tokens=8, temperature=1.0, seed=3)):
        tokens = generate(model, [prompt, prompt[:1]], s, vocab_size=990).tokens
        assert all(0 <= t < 990 for row in tokens for t in row) and all(len(row) == 8 for row in tokens)
    with pytest.raises(ValueError, match="outside the vocabulary of 990"):
        generate(model, [[995]], Sampling(max_new_tokens=1), vocab_size=990)
    with pytest.raises(ValueError, match="does not fit the model's 1000"):
        generate(model, [prompt], Sampling(max_new_tokens=1), vocab_size=1001)


def test_prompt_padding_must_be_on_the_left():
    model = tiny("kv")
    cache = KVCache(model.cfg, 2, 16, torch.float32)
    right_padded = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match="padding must be on the left"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache, valid=right_padded)
