"""`mixer-label train DATA --out DIR`: train a small Mixer on labeled shards, evaluate, save."""

from __future__ import annotations

import argparse

# Training settings whose flag is not --name-with-dashes (console.errors names them by flag).
SETTING_FLAGS = {"learning_rate": "--lr"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.train_config import TrainConfig  # no torch: --help stays quick

    defaults = TrainConfig()
    parser.add_argument("data", help="folder or s3:// prefix holding train/ and test/ shards")
    parser.add_argument(
        "--out", required=True, help="folder for model.safetensors, eval.json and train.json"
    )
    parser.add_argument("--preset", default=defaults.preset, help="model geometry (a preset name)")
    parser.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="passes over the training split"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per training step"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=defaults.learning_rate,
        help="peak learning rate (AdamW, linear warm-up, cosine decay)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the initial weights, the shuffling and the augmentation",
    )
    parser.add_argument(
        "--name",
        default="",
        help="model name stored in the checkpoint (default: mixer-<preset>-trained)",
    )
    parser.add_argument(
        "--s3-endpoint-url",
        default=None,
        help="S3-compatible endpoint (MinIO, Ceph, R2) for an s3:// DATA (default: the AWS"
        " chain: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS itself)",
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.preflight import check_source
    from pipeline.storage import StorageOptions
    from pipeline.train_config import TrainConfig

    # A wrong setting is a SettingError, named by its flag in console.errors; checked before
    # torch is imported.
    config = TrainConfig(
        preset=args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        name=args.name,
    )
    options = StorageOptions(endpoint_url=args.s3_endpoint_url)
    check_source(args.data, options)  # no such folder, or an S3 endpoint that does not answer

    from pipeline.train import EVAL_FILE, train

    result = train(args.data, args.out, config, options)
    print(f"model: {result.model_path} (sha256 {result.sha256[:12]})")
    print(f"eval:  {result.model_path.parent / EVAL_FILE}")
    return 0
