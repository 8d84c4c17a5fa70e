"""pipeline/validation.py in-process: a large CSV is checked without tokenizing its prompts (only
prompts long enough in bytes to exceed the context are tokenized), and what it keeps is the rows."""

import csv
import os

import pytest

from pipeline import validation
from pipeline.errors import PipelineError


class CountingTokenizer:
    """Wraps a tokenizer and counts the texts it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, **kwargs)

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)


def write_rows(path, n, long_row=None):
    attrs = ["lazy", "smart", "kind", "rude", "calm", "loud"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_aae", "prompt_sae", "best_attr_aae", "best_attr_sae", "row_id"])
        for i in range(n):
            aae = f'The person says: " he be working {i} " The person is'
            if i == long_row:
                aae = 'The person says: " ' + "he be working " * 40 + '" The person is'
            w.writerow([aae, f'The person says: " he is usually working {i} " The person is',
                        attrs[i % 6], attrs[(i + 1) % 6], i])


def test_a_large_csv_is_checked_without_tokenizing_its_prompts(tmp_path, tiny_model):
    path = tmp_path / "big.csv"
    write_rows(path, 20_000)
    data = validation.read_dataset_csv(path)
    assert len(data.rows) == 20_000 and data.lines[:2] == [2, 3]
    counting = CountingTokenizer(tiny_model.tokenizer)
    validation.check_tokens(data, counting, tiny_model.cfg.n_ctx, True)
    assert sorted(counting.texts) == sorted(f" {a}" for a in ["lazy", "smart", "kind", "rude", "calm", "loud"])

    write_rows(path, 20_000, long_row=12_345)  # 40 x 14 bytes: may exceed 128 tokens, so it is tokenized
    counting = CountingTokenizer(tiny_model.tokenizer)
    with pytest.raises(PipelineError, match=r"line 12347, column prompt_aae: the prompt is \d+ tokens, longer than"):
        validation.check_tokens(validation.read_dataset_csv(path), counting, tiny_model.cfg.n_ctx, True)
    assert len([t for t in counting.texts if not t.startswith(" ")]) == 1


def test_unreadable_and_special_files(tmp_path, monkeypatch):
    """A file the user may not read (simulated: root reads anything) and a named pipe, which would
    block a reader forever."""
    path = tmp_path / "data.csv"
    path.write_text("prompt_aae,prompt_sae,best_attr_aae,best_attr_sae\na,b,c,d\n")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(type(path), "read_bytes", denied)
        with pytest.raises(PipelineError) as err:
            validation.read_dataset_csv(path)
    assert str(err.value) == f"{path}: the file cannot be read (Permission denied); accepted: a file this user may read"

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(PipelineError, match=r"pipe.csv: is not a regular file \(a pipe, device or socket\)"):
        validation.read_dataset_csv(fifo)
