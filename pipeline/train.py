"""Training (`mixer-label train DATA --out DIR`): a small Mixer on labeled shards, evaluated, saved.

DATA holds `train/` and `test/` shard folders (WebDataset tars with `.cls` labels, or any shard
format pipeline.shards reads), local or s3://. Images go through `pipeline.preprocess.load_image`
with the model's own stored Preprocessing, the very function the labeling workers call, so a
prediction made while serving equals the one made here. Seeded and deterministic: the same data,
code and settings give the same weights on the same machine.

Writes DIR/model.safetensors (models.checkpoints format: config, label names, preprocessing),
DIR/eval.json (test accuracy and one prediction or error per test image), DIR/train.json
(settings, fingerprint of data and code, per-epoch history) and DIR/calibration.npy (up to 100
preprocessed test images, float16, for `auto`'s agreement check).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.backends.cache import atomic_file
from models.mixer import MlpMixer, preset_config
from models.preprocessing import Preprocessing
from pipeline.train_config import TrainConfig, TrainError

MODEL_FILE = "model.safetensors"
EVAL_FILE = "eval.json"
# Held-out test images beside the model: `auto` checks reduced precisions against fp32 on
# these (models.backends.auto_measure.check_images) instead of synthetic noise.
CALIBRATION_FILE = "calibration.npy"
CALIBRATION_IMAGES = 100
TRAIN_FILE = "train.json"
# The offline evaluation predicts like a labeling worker at its defaults: same predictor,
# same batches (pipeline.run.RunConfig.batch_size), fp32.
EVAL_BACKEND = "torch"
EVAL_BATCH = 64
# Sources whose change can change the trained weights or the offline evaluation: all of
# models/ (network, checkpoints, the predictor the evaluation runs) and these.
_CODE_FILES = (
    "pipeline/preprocess.py",
    "pipeline/shards.py",
    "pipeline/train.py",
    "pipeline/train_config.py",
)


@dataclass
class LabeledSplit:
    """One split decoded into memory, in read order (shard by shard, record by record)."""

    images: torch.Tensor  # (n, 3, H, W) float32, already normalized
    labels: torch.Tensor  # (n,) int64, -1 where the record has no label
    keys: list[str]
    shards: list[str]  # the shard name of each image
    errors: list[dict[str, str]] = field(default_factory=list)  # {"shard", "key", "error"}

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class TrainResult:
    """Where the model went and how good it is."""

    model_path: Path
    sha256: str
    accuracy: float
    seconds: float
    eval: dict[str, object]


# --------------------------------------------------------------------------- data


def split_uri(data_uri: str, split: str, options=None) -> str:
    """DATA/train or DATA/test, in DATA's own scheme."""
    from pipeline.storage import open_storage

    return open_storage(data_uri, options).join(data_uri, split)


def iter_records(uri: str, options=None) -> Iterator[tuple[str, object]]:
    """(shard name, Record) for every record of every shard under `uri`, in listing order."""
    from pipeline.shards import list_shards, read_records
    from pipeline.storage import open_storage

    storage = open_storage(uri, options)
    found = False
    for shard in list_shards(storage, uri):
        found = True
        for record in read_records(storage, shard):
            yield shard.name, record
    if not found:
        raise TrainError(f"{uri}: no shards found (expected WebDataset .tar files)")


def read_split(uri: str, preprocessing: Preprocessing, options=None) -> LabeledSplit:
    """Decode every image under `uri` with load_image; records that fail become errors."""
    from pipeline.preprocess import ImageError, load_image

    arrays, labels, keys, shards, errors = [], [], [], [], []
    for shard, record in iter_records(uri, options):
        error = record.error
        if error is None:
            try:
                arrays.append(load_image(record.data, preprocessing))
            except ImageError as err:
                error = str(err)
        if error is not None:
            errors.append({"shard": shard, "key": record.key, "error": error})
            continue
        labels.append(-1 if record.label is None else record.label)
        keys.append(record.key)
        shards.append(shard)
    size = preprocessing.input_size
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, 3, size, size)
    return LabeledSplit(images, torch.tensor(labels, dtype=torch.int64), keys, shards, errors)


def data_fingerprint(data_uri: str, options=None) -> str:
    """sha256 over every record (shard, key, bytes, label) of DATA/train and DATA/test.

    Content, not ETags: the same shards uploaded to S3 or written again locally give the same
    fingerprint, so a trained model is reused exactly when its data is unchanged.
    """
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for shard, record in iter_records(split_uri(data_uri, split, options), options):
            digest.update(
                f"{split}/{shard}/{record.key}\0{record.label}\0{record.error}\0".encode()
            )
            digest.update(hashlib.sha256(record.data or b"").digest())
    return digest.hexdigest()


def code_fingerprint() -> str:
    """sha256 of the sources that shape training and evaluation, plus the torch version."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(torch.__version__.encode())
    models = sorted(p.relative_to(root).as_posix() for p in (root / "models").rglob("*.py"))
    for name in [*models, *_CODE_FILES]:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()


def training_fingerprint(data_uri: str, config: TrainConfig, options=None) -> str:
    """One value that changes when the data, the code or the settings do."""
    digest = hashlib.sha256()
    digest.update(data_fingerprint(data_uri, options).encode())
    digest.update(code_fingerprint().encode())
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()


def is_current(out_dir: str | Path, fingerprint: str) -> bool:
    """True when out_dir holds a model trained with exactly this fingerprint."""
    out = Path(out_dir)
    try:
        recorded = json.loads((out / TRAIN_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError):
        return False
    return recorded == fingerprint and (out / MODEL_FILE).is_file() and (out / EVAL_FILE).is_file()


# --------------------------------------------------------------------------- training


def new_model(config: TrainConfig, label_names: list[str]) -> MlpMixer:
    """A freshly initialized (seeded) Mixer of the preset, with its preprocessing and labels."""
    try:
        geometry = preset_config(config.preset)
    except KeyError as err:
        raise TrainError(str(err.args[0])) from None
    if len(label_names) != geometry.num_classes:
        geometry = geometry.replace(num_classes=len(label_names))
    preprocessing = Preprocessing(
        input_size=geometry.image_size,
        crop_fraction=config.crop_fraction,
        interpolation=config.interpolation,  # type: ignore[arg-type]
    )
    torch.manual_seed(config.seed)
    slug = config.preset.replace("/", "").lower()
    return MlpMixer(geometry, preprocessing, label_names, config.name or f"mixer-{slug}-trained")


def shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, repeating the border (paper stays paper)."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def fit(
    model: MlpMixer,
    data: LabeledSplit,
    config: TrainConfig,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """AdamW with linear warmup and cosine decay; returns one history entry per epoch."""
    labeled = data.labels >= 0
    images, labels = data.images[labeled], data.labels[labeled]
    if len(labels) == 0:
        raise TrainError("no labeled training images (expected KEY.cls beside each image)")
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = max(1, config.warmup_epochs * steps_per_epoch)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history = []
    model.train()
    for epoch in range(1, config.epochs + 1):
        started = time.monotonic()
        order = torch.randperm(len(labels), generator=generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(labels), config.batch_size):
            batch = order[start : start + config.batch_size]
            logits = model(shift(images[batch], config.max_shift, generator))
            loss = F.cross_entropy(logits, labels[batch], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(1) == labels[batch]).sum())
        entry = {
            "epoch": epoch,
            "loss": loss_sum / len(labels),
            "train_accuracy": correct / len(labels),
            "seconds": time.monotonic() - started,
        }
        history.append(entry)
        log(
            f"epoch {epoch:>3}/{config.epochs}  loss {entry['loss']:.4f}  "
            f"train accuracy {entry['train_accuracy']:.4f}  {entry['seconds']:.1f} s"
        )
    return history


def evaluate(
    model: MlpMixer, data: LabeledSplit, backend: str = EVAL_BACKEND, batch_size: int = EVAL_BATCH
) -> dict[str, object]:
    """Accuracy over the labeled images, and one prediction (or error) per image.

    Runs the way a labeling worker does, so its predictions can be compared image by image:
    the same fp32 predictor (`models.backends.create`), batches of `batch_size` decoded images
    within each shard in record order, one intra-op thread as in a one-CPU Ray actor.
    """
    from models.backends import create

    predictor = create(model.eval(), backend, "fp32", "cpu")
    predictions = []
    with _torch_threads(1):
        for start, stop in _shard_batches(data.shards, batch_size):
            logits = predictor.predict(data.images[start:stop])
            scores, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
            for i, label, score in zip(
                range(start, stop), labels.tolist(), scores.tolist(), strict=True
            ):
                truth = int(data.labels[i])
                predictions.append(
                    {
                        "shard": data.shards[i],
                        "key": data.keys[i],
                        "label": label,
                        "label_name": model.label_names[label],
                        "score": round(score, 6),
                        "true_label": None if truth < 0 else truth,
                        "error": None,
                    }
                )
    blank = {"label": None, "label_name": None, "score": None, "true_label": None}
    predictions += [{**e, **blank, "error": e["error"]} for e in data.errors]
    labeled = [p for p in predictions if p["true_label"] is not None]
    correct = sum(1 for p in labeled if p["label"] == p["true_label"])
    return {
        "backend": predictor.name,
        "precision": predictor.precision,
        "batch_size": batch_size,
        "images": len(predictions),
        "errors": len(data.errors),
        "labeled_images": len(labeled),
        "correct": correct,
        "accuracy": correct / len(labeled) if labeled else None,
        "predictions": predictions,
    }


def _shard_batches(shards: list[str], batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive images of one shard, at most batch_size of them."""
    start = 0
    while start < len(shards):
        stop = start + 1
        while stop < len(shards) and stop - start < batch_size and shards[stop] == shards[start]:
            stop += 1
        yield start, stop
        start = stop


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded RNG and deterministic kernels inside; the caller's settings restored after."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


def train(
    data_uri: str,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    options=None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train on DATA/train, evaluate on DATA/test, write model, eval.json and train.json."""
    from models.checkpoints import save_checkpoint

    started = time.monotonic()
    out = Path(out_dir)
    label_names = _label_names(data_uri, config, options)
    with deterministic(config.seed):
        model = new_model(config, label_names)
        train_uri, test_uri = (split_uri(data_uri, s, options) for s in ("train", "test"))
        train_data = read_split(train_uri, model.preprocessing, options)
        _check_labels(train_data, len(label_names), train_uri)
        log(
            f"training {model.name} ({model.num_parameters():,} parameters) on "
            f"{int((train_data.labels >= 0).sum())} images from {train_uri}"
        )
        history = fit(model, train_data, config, log)
        sha256 = save_checkpoint(model, out / MODEL_FILE)
        train_seconds = time.monotonic() - started
        test_data = read_split(test_uri, model.preprocessing, options)
        _check_labels(test_data, len(label_names), test_uri)
        result = evaluate(model, test_data)
    write_calibration(out / CALIBRATION_FILE, test_data.images)
    report = {
        "model": {"file": MODEL_FILE, "name": model.name, "sha256": sha256},
        "data_uri": test_uri,
        **result,
    }
    _write_json(out / EVAL_FILE, report)
    _write_json(
        out / TRAIN_FILE,
        {
            "fingerprint": training_fingerprint(data_uri, config, options),
            "config": config.to_dict(),
            "model": {"name": model.name, "sha256": sha256, "geometry": model.config.to_dict()},
            "preprocessing": model.preprocessing.to_dict(),
            "data_uri": train_uri,
            "train_images": int((train_data.labels >= 0).sum()),
            "train_errors": train_data.errors,
            "train_seconds": round(train_seconds, 2),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "history": history,
        },
    )
    seconds = time.monotonic() - started
    accuracy = result["accuracy"] or 0.0
    log(
        f"test accuracy {accuracy:.4f} ({result['correct']}/{result['labeled_images']}), "
        f"{result['errors']} unreadable test file(s); trained in {train_seconds:.0f} s"
    )
    return TrainResult(out / MODEL_FILE, sha256, accuracy, seconds, report)


def _label_names(data_uri: str, config: TrainConfig, options) -> list[str]:
    """DATA/dataset.json's label_names when present, else "0".."N-1" for the preset's N classes."""
    from pipeline.storage import StorageError, open_storage

    storage = open_storage(data_uri, options)
    manifest = storage.join(data_uri, "dataset.json")
    with contextlib.suppress(StorageError, ValueError):
        if storage.exists(manifest):
            names = json.loads(storage.get(manifest)).get("label_names")
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                return names
    try:
        classes = preset_config(config.preset).num_classes
    except KeyError as err:
        raise TrainError(str(err.args[0])) from None
    return [str(i) for i in range(classes)]


def _check_labels(data: LabeledSplit, classes: int, uri: str) -> None:
    bad = (data.labels >= classes).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise TrainError(
            f"{uri}: shard {data.shards[i]} key {data.keys[i]}: label {int(data.labels[i])} "
            f"is out of range for {classes} classes"
        )


def write_calibration(path: Path, images: torch.Tensor, count: int = CALIBRATION_IMAGES) -> None:
    """Up to `count` images spread over `images` (every class of a sorted split), as float16."""
    if not len(images):
        return
    picks = torch.linspace(0, len(images) - 1, min(count, len(images))).round().long().unique()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.save(f, images[picks].numpy().astype(np.float16), allow_pickle=False)


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write((json.dumps(value, indent=2) + "\n").encode())
