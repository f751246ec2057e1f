"""Hostile but realistic data: damaged compressed inputs, lone surrogates, unwritable or full output disks,
token ids beyond the model's vocabulary, and datasets too small for a sample or for eval.tokens."""
import errno
import gzip
import json
import os
import types

import numpy as np
import pytest
import zstandard

from megaqkv.config import load_config
from megaqkv.data import indexed
from megaqkv.data.indexed import DataError, IndexedDataset, IndexedDatasetWriter
from megaqkv.data.preprocess import main as preprocess_main
from megaqkv.data.tokenizers import build_tokenizer
from megaqkv.evaluation.perplexity import packed_perplexity, paper_perplexity
from megaqkv.training.data import build_datasets, check_data

from conftest import MODEL_CONFIGS, REPO

LINES = [json.dumps({"text": f"line {i} of the corpus, with a few words"}).encode() + b"\n" for i in range(200)]
FRAMES = 4  # the file is 4 zstd frames / gzip members of 50 lines, as `cat a.zst b.zst` makes


def run(*args):
    return preprocess_main([*map(str, args), "--no-progress", "--workers", "1"])


def docs_of(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def encoded(lines):
    tok = build_tokenizer("gpt2")
    return [ids + [tok.eod] for ids in tok.encode_batch([json.loads(line)["text"] for line in lines])]


def compressed(codec):
    """(file bytes, offset where the third frame starts)."""
    compress = zstandard.ZstdCompressor(write_checksum=True).compress if codec == "zst" else gzip.compress
    per = len(LINES) // FRAMES
    frames = [compress(b"".join(LINES[k * per:(k + 1) * per])) for k in range(FRAMES)]
    return b"".join(frames), len(frames[0]) + len(frames[1])


def damaged(codec, how):
    data, third = compressed(codec)
    if how == "truncated":  # cut in the middle of the third frame
        return data[:third + (len(data) - third) // 4]
    return data[:third] + b"\xde\xad\xbe\xef" + data[third + 4:]  # the third frame's header overwritten


@pytest.mark.parametrize("codec", ["zst", "gz"])
@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_compressed_input_keeps_the_lines_before_it(tmp_path, capsys, codec, how):
    folder = tmp_path / "in"
    folder.mkdir()
    src = folder / f"a.jsonl.{codec}"
    src.write_bytes(damaged(codec, how))
    (folder / "b.jsonl").write_bytes(b'{"text": "the next file"}\n')
    assert run("--input", folder, "--output-prefix", tmp_path / "o") == 3
    out = capsys.readouterr().out
    name = "zstd" if codec == "zst" else "gzip"
    assert f"damaged input: {src}: truncated or corrupt {name} stream after " in out
    assert "skipped 0 lines" in out  # the partial last line is not "malformed JSON"
    [(file, line, reason)] = [r.split("\t") for r in (tmp_path / "o_skipped.tsv").read_text().splitlines()]
    assert file == str(src) and reason.startswith(f"truncated or corrupt {name} stream after ")
    kept = int(line) - 1
    assert 100 <= kept < 150  # the two whole frames before the damage, and what was decoded of the third
    assert docs_of(tmp_path / "o_text_document") == encoded(LINES[:kept]) + encoded([b'{"text": "the next file"}'])
    summary = json.loads((tmp_path / "o_summary.json").read_text())
    assert summary["damaged_inputs"] == [{"file": str(src), "line": kept + 1, "reason": reason}]


def test_intact_multi_frame_files_are_read_to_the_end(tmp_path):
    for codec in ("zst", "gz"):
        (tmp_path / f"x.jsonl.{codec}").write_bytes(compressed(codec)[0])
        assert run("--input", tmp_path / f"x.jsonl.{codec}", "--output-prefix", tmp_path / codec) == 0
        assert docs_of(tmp_path / f"{codec}_text_document") == encoded(LINES)


def test_strict_stops_at_damage_and_continues_once_the_file_is_replaced(tmp_path, capsys):
    src = tmp_path / "a.jsonl.zst"
    src.write_bytes(damaged("zst", "truncated"))
    prefix = tmp_path / "s"
    assert run("--input", src, "--output-prefix", prefix, "--strict") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {src}:") and "truncated or corrupt zstd stream after" in err and "\n" not in err
    line = int(err.split(":")[2])
    state = json.loads((tmp_path / "s.preprocess_state.json").read_text())
    assert state["line"] == line - 1 and state["stats"]["documents"] == line - 1 >= 100
    src.write_bytes(compressed("zst")[0])  # an intact copy: the same command continues where it stopped
    assert run("--input", src, "--output-prefix", prefix, "--strict") == 0
    assert docs_of(tmp_path / "s_text_document") == encoded(LINES)


def test_lone_surrogate_is_a_bad_line(tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_bytes(b'{"text": "good one"}\n{"text": "a\\ud800b"}\n{"text": "good two"}\n')
    assert run("--input", src, "--output-prefix", tmp_path / "o") == 0
    assert "'text' is not valid Unicode 1" in capsys.readouterr().out
    assert (tmp_path / "o_skipped.tsv").read_text() == \
        f"{src}\t2\t'text' is not valid Unicode (lone surrogate U+D800 at character 1)\n"
    assert docs_of(tmp_path / "o_text_document") == encoded([b'{"text": "good one"}', b'{"text": "good two"}'])
    assert run("--input", src, "--output-prefix", tmp_path / "strict", "--strict") == 1
    assert f"error: {src}:2: 'text' is not valid Unicode (lone surrogate" in capsys.readouterr().err


# --------------------------------------------------------------------------- output problems


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("below", ["file.txt/out", "file.txt/sub/out"])
def test_output_prefix_under_a_regular_file(tmp_path, capsys, below):
    src = tmp_path / "a.jsonl"
    src.write_bytes(LINES[0])
    (tmp_path / "file.txt").write_text("not a folder")
    assert run("--input", src, "--output-prefix", tmp_path / below) == 1
    err = one_line_error(capsys)
    assert f"{tmp_path}/file.txt" in err and "not a directory" in err and "choose another --output-prefix" in err


def test_read_only_output_folder(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_bytes(LINES[0])
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        pytest.skip("running as root: chmod 0o555 does not stop writes (the /proc case below still runs)")
    assert run("--input", src, "--output-prefix", folder / "out") == 1
    err = one_line_error(capsys)
    assert str(folder) in err and "Permission denied" in err and "a folder you can write to" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, where nothing can be created")
def test_output_folder_that_cannot_be_created(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_bytes(LINES[0])
    assert run("--input", src, "--output-prefix", "/proc/megaqkv-test/out") == 1
    err = one_line_error(capsys)
    assert "/proc/megaqkv-test" in err and "--output-prefix /proc/megaqkv-test/out must be in a folder" in err


def disk_full(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_is_resumable(tmp_path, capsys, monkeypatch):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"".join(LINES))
    args = ["--input", src, "--chunk-kb", "1", "--checkpoint-seconds", "0"]
    add = IndexedDatasetWriter.add_documents
    calls = []

    def fill_up(self, *a):
        calls.append(1)
        return disk_full() if len(calls) == 5 else add(self, *a)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", fill_up)
    assert run(*args, "--output-prefix", tmp_path / "o") == 1
    err = one_line_error(capsys)
    kept = json.loads((tmp_path / "o.preprocess_state.json").read_text())["stats"]["documents"]
    assert kept > 0 and f"{tmp_path}: the disk is full (No space left on device) while writing the outputs of " \
                         f"{tmp_path / 'o'}; the {kept:,} documents up to the last checkpoint are kept. Free some " \
                         "space and re-run the same command: it continues from the last checkpoint" in err
    monkeypatch.undo()
    assert run(*args, "--output-prefix", tmp_path / "o") == 0
    assert run("--input", src, "--output-prefix", tmp_path / "fresh") == 0
    assert docs_of(tmp_path / "o_text_document") == docs_of(tmp_path / "fresh_text_document") == encoded(LINES)


def test_disk_full_while_finishing_leaves_no_final_name_and_is_resumable(tmp_path, capsys, monkeypatch):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b'{"text": "one", "meta": {"redpajama_set_name": "A"}}\n'
                    b'{"text": "two", "meta": {"redpajama_set_name": "B"}}\n')
    write_index, calls = indexed.write_index, []

    def second_fails(*a):
        calls.append(1)
        return disk_full() if len(calls) == 2 else write_index(*a)

    monkeypatch.setattr(indexed, "write_index", second_fails)
    assert run("--input", src, "--output-prefix", tmp_path / "o", "--split-by-set") == 1
    assert "the disk is full" in one_line_error(capsys)
    assert not list(tmp_path.glob("o_*.bin")) and not list(tmp_path.glob("o_*.idx"))  # neither output finished
    monkeypatch.undo()
    assert run("--input", src, "--output-prefix", tmp_path / "o", "--split-by-set") == 0
    assert docs_of(tmp_path / "o_A_text_document") == encoded([b'{"text": "one"}'])
    assert docs_of(tmp_path / "o_B_text_document") == encoded([b'{"text": "two"}'])


# --------------------------------------------------------------------------- vocabulary and dataset sizes


def write(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(prefix, dtype)
    for d in docs:
        w.add_document(np.asarray(d, dtype=dtype))
    w.finalize()
    return str(prefix)


def config(*overrides):
    return load_config(MODEL_CONFIGS / "tiny_kv.yaml", REPO / "train_configs" / "tiny.yaml", list(overrides))


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(tmp_path):
    good = write(tmp_path / "good", [np.arange(100) * 500])  # ids up to 49,500 < 50,304
    bad = write(tmp_path / "bad", [[1, 2, 3], [60_000, 4]])
    check_data(config(f"data.path={json.dumps([good])}", f"data.valid_path={json.dumps([good])}"))
    for key in ("path", "valid_path"):
        paths = {"path": [good], "valid_path": [good], key: [bad]}
        with pytest.raises(DataError) as err:
            check_data(config(*(f"data.{k}={json.dumps(v)}" for k, v in paths.items())))
        assert f"{bad}.bin: token ids go up to 60,000, but the model (model.vocab_size) has a vocabulary of " \
               "50,304" in str(err.value) and "preprocess the data with the model's tokenizer, or raise " \
                                                "model.vocab_size to at least 60,001" in str(err.value)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=1000))  # checked before the model runs
    with pytest.raises(DataError, match="token ids go up to 60,000, but the model has a vocabulary of 1,000"):
        packed_perplexity(model, IndexedDataset(bad), (0, 2), 16, 4)
    with pytest.raises(DataError, match="token ids go up to 60,000"):
        paper_perplexity(model, IndexedDataset(bad), (0, 2), 16, 4, pad_id=0)


def test_train_split_smaller_than_one_sample(tmp_path):
    small = write(tmp_path / "small", [np.arange(50)] * 2)  # 100 tokens, a sample is 128 + 1
    valid = write(tmp_path / "valid", [np.arange(1000)])
    with pytest.raises(DataError) as err:
        build_datasets(config(f"data.path={json.dumps([small])}", f"data.valid_path={json.dumps([valid])}"), 16, 8,
                       say=print)
    assert f"{small}: the training data has 100 tokens in 2 documents, fewer than one sample of " \
           "training.seq_length + 1 = 129 tokens, so packing cannot make even one sample" in str(err.value)


@pytest.mark.parametrize("separate", [True, False])
def test_validation_smaller_than_eval_tokens_warns(tmp_path, separate):
    train = write(tmp_path / "train", [np.arange(300)] * 40)
    valid = write(tmp_path / "valid", [np.arange(100)] * 3)
    paths = [f"data.path={json.dumps([train])}"]
    paths += [f"data.valid_path={json.dumps([valid] if separate else [])}", "data.split=[37, 3, 0]"]
    said = []
    _, v = build_datasets(config(*paths), 32, 128, say=said.append)  # eval.tokens 16,384: 128 samples of 129
    tokens, where = ("300 tokens in 3 documents", valid) if separate else ("900 tokens in 3 documents (after the "
                                                                           "split)", train)
    assert said == [f"warning: validation data {where} has {tokens}, less than the 128 samples of 129 tokens that "
                    f"eval.tokens=16,384 takes from it: the validation samples pass over its tokens {v.epochs:,} "
                    "times, so the same text is scored repeatedly; give more validation data or lower eval.tokens"]
    assert v.epochs == -(-(128 * 128 + 1) // int(tokens.split()[0]))
    said.clear()
    build_datasets(config(*paths, "eval.tokens=128"), 32, 1, say=said.append)  # enough data: no warning
    assert said == []
