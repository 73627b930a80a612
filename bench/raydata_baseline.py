"""The comparison point: a plain Ray Data batch-inference script over the same images.

    read_images → map_batches(resize, crop, normalize) → map_batches(actor pool) → write_parquet

written the way Ray's batch-inference examples write it, with the same model, backend and cores
as `mixer-label run`. bench/pipeline_bench.py runs both in one process and compares them;
it also runs on its own:

    python bench/raydata_baseline.py s3://bucket/images/ s3://bucket/out/ --model B/16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import numpy as np


def _filesystem(uri: str, endpoint_url: str | None):
    """A pyarrow filesystem for `uri` and the path inside it (Ray Data's way to reach S3)."""
    if not uri.startswith("s3://"):
        return None, os.path.abspath(uri)
    from pyarrow import fs

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    # Credentials come from the AWS chain of each process, as in the pipeline.
    return fs.S3FileSystem(**kwargs), uri[len("s3://") :]


def preprocess(batch: dict[str, np.ndarray], preprocessing) -> dict[str, np.ndarray]:
    """Resize the short side, center crop, scale to the model's mean/std (as the model says).

    A plain function, so Ray Data runs it as tasks fused with the read; a callable class would
    take an actor (and its CPU) of its own.
    """
    from PIL import Image

    p = preprocessing
    size, crop = p.resize_size, p.input_size
    resample = getattr(Image.Resampling, p.interpolation.upper())
    mean = np.asarray(p.mean, np.float32)[:, None, None]
    std = np.asarray(p.std, np.float32)[:, None, None]
    out = []
    for array in batch["image"]:
        image = Image.fromarray(np.asarray(array, dtype=np.uint8))
        w, h = image.size
        scale = size / min(w, h)
        resized = (max(size, round(w * scale)), max(size, round(h * scale)))
        image = image.resize(resized, resample)
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        chw = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
        out.append((chw - mean) / std)
    return {"path": batch["path"], "pixels": np.stack(out)}


class Labeler:
    """Ray Data's callable-class actor: load the predictor once, label a batch."""

    def __init__(self, model: str, backend: str, precision: str, threads: int, topk: int) -> None:
        import torch

        from models.backends import create
        from models.checkpoints import resolve_model

        torch.set_num_threads(threads)
        self.model = resolve_model(model)
        self.predictor = create(self.model, backend, precision, "cpu")
        self.topk = topk

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        logits = self.predictor.predict(torch.from_numpy(np.ascontiguousarray(batch["pixels"])))
        scores, labels = torch.softmax(logits.float(), dim=1).topk(self.topk, dim=1)
        names = np.asarray(self.model.label_names, dtype=object)
        top = labels[:, 0].numpy()
        return {
            "key": batch["path"],
            "label": top.astype(np.int32),
            "label_name": names[top],
            "score": scores[:, 0].numpy(),
            "topk_labels": labels.to(torch.int32).numpy(),
            "topk_scores": scores.numpy(),
        }


def run_baseline(
    input_uri: str,
    output_uri: str,
    model: str,
    backend: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    actors: int = 1,
    actor_cpus: float = 1.0,
    threads: int | None = None,
    topk: int = 5,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Label every image under input_uri with Ray Data; returns images, seconds, images/s.

    Ray must already be initialized. Each actor reserves `actor_cpus` so the read and
    preprocessing tasks keep the rest of the cores, and runs `threads` torch threads
    (default: all cores) since the GEMMs are where the time goes.
    """
    import ray

    from models.checkpoints import resolve_model

    preprocessing = resolve_model(model).preprocessing
    in_fs, in_path = _filesystem(input_uri, endpoint_url)
    out_fs, out_path = _filesystem(output_uri, endpoint_url)
    threads = threads or int(ray.cluster_resources().get("CPU", 1))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the comparison prints its own table
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    start = time.perf_counter()
    images = ray.data.read_images(in_path, filesystem=in_fs, mode="RGB", include_paths=True)
    labeled = images.map_batches(
        preprocess, fn_kwargs={"preprocessing": preprocessing}, batch_size=16
    )
    labeled = labeled.map_batches(
        Labeler,
        fn_constructor_args=(model, backend, precision, threads, topk),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
    )
    labeled.write_parquet(out_path, filesystem=out_fs)
    seconds = time.perf_counter() - start
    count = ray.data.read_parquet(out_path, filesystem=out_fs).count()
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--s3-endpoint-url")
    args = parser.parse_args(argv)
    import ray

    from pipeline.ray_quiet import quiet_ray

    with quiet_ray():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        result = run_baseline(
            args.input,
            args.output,
            args.model,
            args.backend,
            args.precision,
            args.batch_size,
            args.actors,
            endpoint_url=args.s3_endpoint_url,
        )
    finally:
        ray.shutdown()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
