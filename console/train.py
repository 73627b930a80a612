"""`mixer-label train DATA --out DIR`: train a small Mixer on labeled shards, evaluate, save."""

from __future__ import annotations

import argparse

from console.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.train import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("data", help="folder or s3:// prefix holding train/ and test/ shards")
    parser.add_argument("--out", required=True, help="folder for model.safetensors, eval.json")
    parser.add_argument("--preset", default=defaults.preset, help="model geometry (default demo)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak rate")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--name", default="", help="model name stored in the checkpoint")
    parser.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint")


def main(args: argparse.Namespace) -> int:
    from pipeline.storage import StorageOptions
    from pipeline.train import EVAL_FILE, TrainConfig, train

    try:
        config = TrainConfig(
            preset=args.preset,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            name=args.name,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    options = StorageOptions(endpoint_url=args.s3_endpoint_url)
    result = train(args.data, args.out, config, options)
    print(f"model: {result.model_path} (sha256 {result.sha256[:12]})")
    print(f"eval:  {result.model_path.parent / EVAL_FILE}")
    return 0
