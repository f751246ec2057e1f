"""tools/preprocess_data.py end to end: fixture vs direct tokenisation, inputs, bad lines, resume, atomicity."""
import gzip
import json
import signal
import subprocess
import sys
import time

import numpy as np
import zstandard

from megaqkv.data.indexed import IndexedDataset
from megaqkv.data.preprocess import main as preprocess_main
from megaqkv.data.tokenizers import build_tokenizer

from conftest import FIXTURES, REPO

SLIM = FIXTURES / "SlimPajama-627B"


def run(*args):
    return preprocess_main([*map(str, args), "--no-progress"])


def docs_of(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_slimpajama_fixture_matches_direct_tokenisation(tmp_path, capsys):
    assert run("--input", SLIM, "--output-prefix", tmp_path / "slim", "--workers", "1") == 0
    out = capsys.readouterr().out
    assert "documents 126   tokens 382,169" in out and "RedPajamaBook 382,169 (126 docs)" in out
    tok = build_tokenizer("gpt2")
    summary = json.loads((tmp_path / "slim_summary.json").read_text())
    for split in ("train", "validation", "test"):
        texts = []
        for path in sorted((SLIM / split).rglob("*.jsonl.zst")):
            raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 26)
            texts += [json.loads(line)["text"] for line in raw.splitlines()]
        expected = [ids + [50256] for ids in tok.encoding.encode_ordinary_batch(texts)]
        assert docs_of(tmp_path / f"slim_{split}_text_document") == expected, split
        assert summary["outputs"][f"{tmp_path}/slim_{split}_text_document"]["max_token_id"] == \
            max(max(d) for d in expected)
    assert summary["tokens"] == 382_169
    # two workers give byte-identical files
    assert run("--input", SLIM, "--output-prefix", tmp_path / "two", "--workers", "2") == 0
    for split in ("train", "validation", "test"):
        for ext in (".bin", ".idx"):
            assert ((tmp_path / f"slim_{split}_text_document{ext}").read_bytes()
                    == (tmp_path / f"two_{split}_text_document{ext}").read_bytes())


BAD_LINES = [
    b'{"text": "first good document", "meta": {"redpajama_set_name": "RedPajamaBook"}}',
    b'{"text": "broken json", ',
    b'{"text": "second good", "meta": "{\\"redpajama_set_name\\": \\"RedPajamaWikipedia\\"}"}',
    b'{"body": "no text key"}',
    b'{"text": "bad byte \xff here"}',
    b'{"text": "   "}',
    b'{"text": 42}',
    b'',
    b'{"text": "third good"}',
]


def write_lines(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_lines_are_skipped_and_reported(tmp_path, capsys):
    src = write_lines(tmp_path / "bad.jsonl", BAD_LINES)
    assert run("--input", src, "--output-prefix", tmp_path / "o", "--split-by-set") == 0
    out = capsys.readouterr().out
    assert "skipped 5 lines: malformed JSON 1, missing key 'text' 1, not UTF-8 1, empty 'text' 1, " \
           "'text' is int, not a string 1" in out
    report = (tmp_path / "o_skipped.tsv").read_text().splitlines()
    assert [r.split("\t")[1:] for r in report] == [
        ["2", "malformed JSON (Expecting property name enclosed in double quotes: column 25)"],
        ["4", "missing key 'text'"], ["5", "not UTF-8 (bad byte at offset 19)"], ["6", "empty 'text'"],
        ["7", "'text' is int, not a string"]]
    assert all(r.startswith(str(src)) for r in report)
    tok = build_tokenizer("gpt2")
    enc = lambda t: tok.encode_batch([t])[0] + [50256]
    assert docs_of(tmp_path / "o_RedPajamaBook_text_document") == [enc("first good document")]
    assert docs_of(tmp_path / "o_RedPajamaWikipedia_text_document") == [enc("second good")]  # meta as a JSON string
    assert docs_of(tmp_path / "o_unknown_text_document") == [enc("third good")]


def test_strict_stops_at_the_line_and_loses_nothing(tmp_path, capsys):
    src = write_lines(tmp_path / "bad.jsonl", BAD_LINES)
    prefix = tmp_path / "s"
    assert run("--input", src, "--output-prefix", prefix, "--strict", "--workers", "2") == 1
    assert f"error: {src}:2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "s_text_document.bin").exists()  # nothing that looks complete
    fixed = list(BAD_LINES)
    fixed[1] = b'{"text": "fixed second line"}'
    write_lines(src, fixed)  # the user fixes line 2 and re-runs: the run continues at line 2
    assert run("--input", src, "--output-prefix", prefix, "--strict") == 1
    out, err = capsys.readouterr()
    assert "changed since the last checkpoint (fixed a bad line?); continuing after its line 1" in out
    assert f"{src}:4: missing key 'text'" in err
    assert run("--input", src, "--output-prefix", prefix) == 0  # now skip the rest of the bad lines
    assert "continued 2 interrupted run(s)" in capsys.readouterr().out
    assert run("--input", src, "--output-prefix", tmp_path / "fresh") == 0
    assert docs_of(tmp_path / "s_text_document") == docs_of(tmp_path / "fresh_text_document")
    assert len(docs_of(tmp_path / "s_text_document")) == 4


def test_strict_resume_keeps_earlier_lines(tmp_path, capsys):
    good = [b'{"text": "doc %d"}' % i for i in range(50)]
    src = write_lines(tmp_path / "in.jsonl", good[:30] + [b'{"text": 1}'] + good[30:])
    prefix = tmp_path / "k"
    assert run("--input", src, "--output-prefix", prefix, "--strict") == 1
    assert f"{src}:31: 'text' is int" in capsys.readouterr().err
    state = json.loads((tmp_path / "k.preprocess_state.json").read_text())
    assert state["line"] == 30 and state["stats"]["documents"] == 30  # lines 1-30 are kept
    assert run("--input", src, "--output-prefix", prefix) == 0  # continue, skipping the bad line
    assert "continued 1 interrupted run" in capsys.readouterr().out
    assert run("--input", src, "--output-prefix", tmp_path / "fresh") == 0  # the text counted once, as in one run
    summary = lambda p: json.loads((tmp_path / f"{p}_summary.json").read_text())
    assert summary("k")["text_bytes"] == summary("fresh")["text_bytes"]
    (tmp_path / "k.preprocess_state.json").write_text("{not json")  # a damaged state yields to --overwrite
    assert run("--input", src, "--output-prefix", prefix) == 1
    assert run("--input", src, "--output-prefix", prefix, "--overwrite") == 0
    tok = build_tokenizer("gpt2")
    assert docs_of(tmp_path / "k_text_document") == [tok.encode_batch([f"doc {i}"])[0] + [50256] for i in range(50)]


def test_other_input_kinds(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row number {i}", "meta": {"redpajama_set_name": "RedPajamaGithub"}} for i in range(7)]
    folder = tmp_path / "corpus" / "validation"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "part.parquet")
    with gzip.open(folder / "part.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[3:])
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert run("--input", tmp_path / "corpus", tmp_path / "hf", "--output-prefix", tmp_path / "x",
               "--no-append-eod") == 0
    tok = build_tokenizer("gpt2")
    enc = [tok.encode_batch([r["text"]])[0] for r in rows]
    # files in sorted order: part.jsonl.gz then part.parquet; then the HF dataset (no split folder)
    assert docs_of(tmp_path / "x_validation_text_document") == enc[3:] + enc[:3]
    assert docs_of(tmp_path / "x_text_document") == enc


def test_refuses_to_overwrite_and_reports_unusable_input(tmp_path, capsys):
    src = write_lines(tmp_path / "a.jsonl", [b'{"text": "x"}'])
    assert run("--input", src, "--output-prefix", tmp_path / "a") == 0
    assert run("--input", src, "--output-prefix", tmp_path / "a") == 1
    assert "a_text_document.bin: already exists; choose another --output-prefix or pass --overwrite" in \
        capsys.readouterr().err
    assert run("--input", src, "--output-prefix", tmp_path / "a", "--overwrite") == 0
    assert run("--input", tmp_path / "missing", "--output-prefix", tmp_path / "b") == 1
    assert "missing: no such file or directory" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello")
    assert run("--input", tmp_path / "notes.txt", "--output-prefix", tmp_path / "b") == 1
    assert "unsupported input" in capsys.readouterr().err


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(3000)]
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(3000):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=400))}) + "\n")
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "big.jsonl"),
           "--no-progress", "--workers", "1", "--checkpoint-seconds", "0", "--chunk-kb", "64"]
    subprocess.run(cmd + ["--output-prefix", str(tmp_path / "full")], check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--output-prefix", str(tmp_path / "cut")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    state = tmp_path / "cut.preprocess_state.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("line", 0) > 500:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (tmp_path / "cut_text_document.bin").exists() and not (tmp_path / "cut_text_document.idx").exists()
    result = subprocess.run(cmd + ["--output-prefix", str(tmp_path / "cut")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout + result.stderr
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"cut_text_document{ext}").read_bytes() == (tmp_path / f"full_text_document{ext}").read_bytes()
    assert not state.exists()
