"""`mixer-label train`: reproducible, saves a loadable checkpoint, evaluates every test image."""

from __future__ import annotations

import json

import pytest
import torch

from console.main import main as cli_main
from models.checkpoints import load_checkpoint
from pipeline.demo_data import DigitsSpec, write_demo_data
from pipeline.train import (
    EVAL_FILE,
    MODEL_FILE,
    TRAIN_FILE,
    TrainConfig,
    evaluate,
    is_current,
    read_split,
    shift,
    train,
    training_fingerprint,
)

QUICK = TrainConfig(epochs=2, name="mixer-demo-test")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    manifest = write_demo_data(str(root), DigitsSpec(limit=150, images_per_shard=64))
    return str(root), manifest


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    return train(data[0], out, QUICK, log=lambda line: None), out


def test_training_twice_gives_the_same_weights(data, trained, tmp_path):
    first, out = trained
    second = train(data[0], tmp_path, QUICK, log=lambda line: None)
    # Compare the weights, not the file: safetensors writes its metadata in hash-map order.
    weights = load_checkpoint(out / MODEL_FILE).weights_sha256()
    assert load_checkpoint(second.model_path).weights_sha256() == weights
    assert second.eval["predictions"] == first.eval["predictions"]


def test_checkpoint_carries_labels_preprocessing_and_name(trained):
    result, out = trained
    model = load_checkpoint(out / MODEL_FILE)
    assert model.sha256 == result.sha256
    assert model.name == "mixer-demo-test"
    assert model.label_names == [str(d) for d in range(10)]
    assert model.preprocessing.input_size == 32 and model.preprocessing.crop_fraction == 1.0
    assert model.config.patch_size == 4 and model.config.num_blocks == 4


def test_eval_json_has_one_row_per_test_image_and_matches_the_saved_model(data, trained):
    _, manifest = data
    result, out = trained
    report = json.loads((out / EVAL_FILE).read_text())
    rows = {r["key"]: r for r in report["predictions"]}
    assert len(rows) == report["images"] == manifest["splits"]["test"]["images"]
    assert {k for k, r in rows.items() if r["error"]} == set(manifest["broken"])
    labeled = [r for r in rows.values() if r["true_label"] is not None]
    correct = sum(r["label"] == r["true_label"] for r in labeled)
    assert report["correct"] == correct and report["accuracy"] == pytest.approx(
        correct / len(labeled)
    )

    # The saved file, read back, predicts exactly what the in-memory model did.
    model = load_checkpoint(out / MODEL_FILE)
    split = read_split(f"{data[0]}/test", model.preprocessing)
    assert evaluate(model, split)["predictions"] == report["predictions"]
    assert report["backend"] == "torch" and report["precision"] == "fp32"


def test_train_json_records_a_fingerprint_that_tracks_data_and_settings(data, trained, tmp_path):
    _, out = trained
    recorded = json.loads((out / TRAIN_FILE).read_text())
    fingerprint = training_fingerprint(data[0], QUICK)
    assert recorded["fingerprint"] == fingerprint
    assert recorded["train_images"] == data[1]["splits"]["train"]["images"]
    assert len(recorded["history"]) == 2
    assert is_current(out, fingerprint)
    assert not is_current(out, training_fingerprint(data[0], QUICK.__class__(epochs=3)))
    other = tmp_path / "other"
    write_demo_data(str(other), DigitsSpec(limit=150, images_per_shard=64, seed=1))
    assert training_fingerprint(str(other), QUICK) != fingerprint


def test_shift_moves_content_and_keeps_the_border():
    image = torch.full((1, 3, 8, 8), 1.0)
    image[:, :, 3:5, 3:5] = -1.0  # a dark 2x2 blot on white paper
    generator = torch.Generator().manual_seed(0)
    moved = shift(image.repeat(16, 1, 1, 1), 2, generator)
    assert moved.shape == (16, 3, 8, 8)
    assert (moved == -1.0).sum(dim=(1, 2, 3)).eq(12).all()  # the blot is intact...
    assert len({tuple(m[0].flatten().tolist()) for m in moved}) > 1  # ...and moves around
    assert torch.equal(shift(image, 0, generator), image)


def test_cli_names_a_missing_split(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    code = cli_main(["train", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "no shards found" in err and str(tmp_path / "train") in err


def test_training_leaves_held_out_calibration_images_that_auto_checks_against(trained):
    from models.backends.auto_measure import check_images, decided_images
    from pipeline.train import CALIBRATION_FILE

    result, out = trained
    model = load_checkpoint(out / MODEL_FILE)
    images, source = check_images(model, out / MODEL_FILE)
    assert source == CALIBRATION_FILE
    test_images = result.eval["labeled_images"]
    assert images.shape == (min(100, test_images), 3, 32, 32) and images.dtype == torch.float32
    # They are real test digits (not noise): the trained model decides most of them.
    with torch.inference_mode():
        logits = model.eval()(images)
    assert decided_images(logits) >= 0.8 * len(images)
