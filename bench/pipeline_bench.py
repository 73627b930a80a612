"""End-to-end benchmark: JPEGs in an S3 API server → `mixer-label run` → Parquet, versus the rest.

In one process, on the same images, model, backend and cores, it measures
1. model-only throughput of the predictor (the ceiling; the target is ≥ 0.8× of it),
2. the pipeline end to end (`run_labeling`), once per `--decode` mode asked for (the first is
   the headline "pipeline"; every mode is also under "pipeline_by_decode"),
3. the plain Ray Data script in bench/raydata_baseline.py (the target is ≥ 1.0× of it),
4. how soon the first shard is labeled on a prefix of many shards while it is still listed.

    python -m bench.pipeline_bench --model B/16 --images 256 --json out.json

Without --s3-endpoint-url it starts a moto S3 server on loopback (pip install moto[server]).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


def photo_like_jpeg(seed: int, width: int = 500, height: int = 375) -> bytes:
    """A JPEG about the size and entropy of an ImageNet photo: smooth shapes plus grain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
        channels.append(127 + 100 * np.sin(fx * x + phase) * np.cos(fy * y))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def upload(storage, items: list[tuple[str, bytes]], threads: int = 16) -> None:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda item: storage.put_atomic(*item), items))


def model_only(model: str, backend: str, precision: str, batch_size: int, seconds: float) -> dict:
    """Images/s of predictor.predict alone on one normalized batch, after a warm-up."""
    import torch

    from models.backends import create
    from models.checkpoints import resolve_model

    mixer = resolve_model(model)
    predictor = create(mixer, backend, precision, "auto", batch_size=batch_size)
    size = mixer.config.image_size
    batch = torch.randn(batch_size, 3, size, size)
    predictor.predict(batch)  # warm-up: allocations, compilation, autotuning
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2 * batch_size:
        predictor.predict(batch)
        done += batch_size
    elapsed = time.perf_counter() - start
    return {
        "images_per_s": done / elapsed,
        "backend": predictor.name,
        "precision": predictor.precision,
    }


class _Stop(Exception):
    pass


def checkpoint_file(spec: str) -> str:
    """A preset saved once as a checkpoint file, so every contender loads the same file (as in
    production) instead of each building random weights; a path passes through."""
    import tempfile

    from models.checkpoints import save_checkpoint
    from models.mixer import build_preset, preset_config

    if Path(spec).exists():
        return spec
    preset_config(spec)  # KeyError for an unknown name
    path = (
        Path(tempfile.gettempdir()) / "mixer-label-bench" / f"{spec.replace('/', '')}.safetensors"
    )
    if not path.exists():
        save_checkpoint(build_preset(spec), path)
    return str(path)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.local_servers import moto_server

    args.model = checkpoint_file(args.model)
    with contextlib.ExitStack() as stack:
        endpoint = args.s3_endpoint_url
        if endpoint is None:
            endpoint = stack.enter_context(moto_server())
            os.environ.update(
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT_URL_S3=endpoint,
            )
        results = _bench_against(endpoint, args)
    _ratios(results)
    return results


def _bench_against(endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from pipeline.ray_quiet import quiet_ray
    from pipeline.storage import StorageOptions, open_storage

    results: dict[str, Any] = {"machine": _machine(), "args": vars(args)}
    try:
        from pipeline.storage.s3 import s3_client

        bucket = f"mixer-bench-{int(time.time())}"
        s3_client(StorageOptions(endpoint_url=endpoint)).create_bucket(Bucket=bucket)
        storage = open_storage(f"s3://{bucket}", StorageOptions(endpoint_url=endpoint))
        t = time.perf_counter()
        with quiet_ray():  # no token-auth banner in the middle of the benchmark's output
            ray.init(
                # Its own Ray: without an address ray.init joins any local cluster already
                # running (a test's, another benchmark's), whose load and resources are not
                # this run's.
                address="local",
                num_cpus=args.cpus,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=False,
                object_store_memory=512 * 1024 * 1024,
            )
        results["ray_init_s"] = time.perf_counter() - t
        if not args.skip_throughput:
            _throughput(storage, bucket, endpoint, args, results)
        if args.listing_shards:
            results["listing"] = _listing(storage, bucket, endpoint, args)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return results


def _throughput(storage, bucket: str, endpoint: str, args, results: dict[str, Any]) -> None:
    """Model only, the pipeline and the Ray Data script on the same JPEGs, taking turns.

    On a shared machine the load moves under a benchmark; `--repeat` alternates the contenders
    and keeps each one's best run, so none is favored by a quiet minute.
    """
    images_uri = f"s3://{bucket}/images"
    t = time.perf_counter()
    images = [(f"{images_uri}/img-{i:06d}.jpg", photo_like_jpeg(i)) for i in range(args.images)]
    upload(storage, images)
    results["upload_s"] = time.perf_counter() - t
    run_baseline = None if args.skip_raydata else _raydata_baseline()
    if run_baseline is None:
        results["raydata_skipped"] = "asked" if args.skip_raydata else "no bench/ checkout"
    decodes = decode_modes(args.decode)
    runs: dict[str, list[dict[str, Any]]] = {"model_only": [], "raydata": []}
    runs.update({f"decode:{mode}": [] for mode in decodes})
    for turn in range(args.repeat):
        runs["model_only"].append(
            model_only(
                args.model, args.backend, args.precision, args.batch_size, args.model_seconds
            )
        )
        for mode in decodes:
            output = f"s3://{bucket}/ours-{mode}-{turn}"
            runs[f"decode:{mode}"].append(_pipeline_run(images_uri, output, endpoint, args, mode))
        if run_baseline is not None:
            runs["raydata"].append(
                run_baseline(
                    images_uri,
                    f"s3://{bucket}/raydata-{turn}",
                    args.model,
                    args.backend,
                    args.precision,
                    args.batch_size,
                    actors=1,
                    threads=args.cpus or os.cpu_count(),
                    endpoint_url=endpoint,
                )
            )
    best: dict[str, dict[str, Any]] = {}
    for name, tries in runs.items():
        if tries:
            best[name] = max(tries, key=lambda r: r["images_per_s"])
            best[name]["all_images_per_s"] = [round(r["images_per_s"], 2) for r in tries]
    for name in ("model_only", "raydata"):
        if name in best:
            results[name] = best[name]
    results["pipeline"] = best[f"decode:{decodes[0]}"]
    results["pipeline_by_decode"] = {mode: best[f"decode:{mode}"] for mode in decodes}


def decode_modes(text: str) -> list[str]:
    """`--decode cpu,device` -> ["cpu", "device"]; each a RunConfig.decode value."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("auto", "cpu", "device")]
    if not modes or unknown:
        raise SystemExit(f"--decode: expected auto, cpu or device (comma-separated), got {text!r}")
    return list(dict.fromkeys(modes))


def _pipeline_run(
    images_uri: str, output_uri: str, endpoint: str, args, decode: str = "auto"
) -> dict[str, Any]:
    from pipeline.run import RunConfig, run_labeling

    config = RunConfig(
        input_uri=images_uri,
        output_uri=output_uri,
        model=args.model,
        backend=args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        images_per_shard=args.images_per_shard,
        s3_endpoint_url=endpoint,
        decode_threads=args.decode_threads,
        decode=decode,
    )
    summary = run_labeling(config).to_dict()
    start = summary["first_shard_started_s"] or 0.0
    return {
        "images": summary["images"],
        "errors": summary["errors"],
        "seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
        "first_shard_started_s": start,
        "images_per_s_after_start": summary["images"] / max(1e-9, summary["seconds"] - start),
        "backend": summary["backend"],
        "precision": summary["precision"],
        "actors": summary["actors"],
        "decode": decode,
        # Of the actors' shard time: in the model, and starved waiting for decoded images.
        "model_share": summary["model_seconds"] / max(1e-9, summary["shard_seconds"]),
        "wait_share": summary["wait_seconds"] / max(1e-9, summary["shard_seconds"]),
    }


def _raydata_baseline():
    """raydata_baseline.run_baseline: the outside point of comparison (plain Ray Data)."""
    from bench.raydata_baseline import run_baseline

    return run_baseline


def _listing(storage, bucket: str, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    """A prefix of many one-image tar shards: time to the first labeled shard, and to list all."""
    import tarfile
    import tempfile

    from models.checkpoints import save_checkpoint
    from models.mixer import build_preset
    from pipeline.run import RunConfig, run_labeling
    from pipeline.shards import list_shards

    jpeg = photo_like_jpeg(0, 64, 48)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("img-0.jpg")
        info.size = len(jpeg)
        tar.addfile(info, io.BytesIO(jpeg))
    shard = buffer.getvalue()
    prefix = f"s3://{bucket}/many"
    t = time.perf_counter()
    upload(storage, [(f"{prefix}/shard-{i:06d}.tar", shard) for i in range(args.listing_shards)])
    upload_s = time.perf_counter() - t

    t = time.perf_counter()
    listed = sum(1 for _ in list_shards(storage, prefix))
    list_s = time.perf_counter() - t

    model_path = Path(tempfile.mkdtemp()) / "tiny.safetensors"
    save_checkpoint(build_preset("tiny"), model_path)
    config = RunConfig(
        input_uri=prefix,
        output_uri=f"s3://{bucket}/many-out",
        model=str(model_path),
        s3_endpoint_url=endpoint,
    )
    first: dict[str, float] = {}
    t0 = time.time()

    def stop_at_first(result) -> None:
        first["started_s"] = result.started_at - t0
        first["done_s"] = time.time() - t0
        raise _Stop

    with contextlib.suppress(_Stop):  # the first shard is all this measures
        run_labeling(config, on_shard_done=stop_at_first)
    return {
        "shards": listed,
        "upload_s": upload_s,
        "full_listing_s": list_s,
        "first_shard_started_s": first.get("started_s"),
        "first_shard_done_s": first.get("done_s"),
    }


def _ratios(results: dict[str, Any]) -> None:
    ours = results.get("pipeline", {}).get("images_per_s")
    if not ours:
        return
    model_only = results["model_only"]["images_per_s"]
    results["pipeline_vs_model_only"] = ours / model_only
    steady = results["pipeline"]["images_per_s_after_start"]
    results["pipeline_after_start_vs_model_only"] = steady / model_only
    if "raydata" in results:
        results["pipeline_vs_raydata"] = ours / results["raydata"]["images_per_s"]
    for run in results.get("pipeline_by_decode", {}).values():
        run["vs_model_only"] = run["images_per_s"] / model_only


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    with_name = Path("/proc/cpuinfo")
    if with_name.exists():
        for line in with_name.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def format_results(results: dict[str, Any]) -> str:
    """A short table a person reads."""
    lines = []
    if "pipeline" in results:
        pipeline = results["pipeline"]
        rows = [("model only", results["model_only"]["images_per_s"])]
        label = f"pipeline (decode {pipeline['decode']})" if "decode" in pipeline else "pipeline"
        rows.append((label, pipeline["images_per_s"]))
        rows.append(("  after its start-up", pipeline["images_per_s_after_start"]))
        for mode, run in list(results.get("pipeline_by_decode", {}).items())[1:]:
            rows.append((f"pipeline (decode {mode})", run["images_per_s"]))
        if "raydata" in results:
            rows.append(("Ray Data baseline", results["raydata"]["images_per_s"]))
        lines += [f"{name:<24} {rate:10.2f} images/s" for name, rate in rows]
        lines.append(
            f"pipeline / model only    {results['pipeline_vs_model_only']:.2f}x "
            f"(after start-up {results['pipeline_after_start_vs_model_only']:.2f}x; target ≥ 0.8)"
        )
        if "pipeline_vs_raydata" in results:
            ratio = results["pipeline_vs_raydata"]
            lines.append(f"pipeline / Ray Data      {ratio:.2f}x (target ≥ 1.0)")
    if "listing" in results:
        listing = results["listing"]
        lines.append(
            f"first of {listing['shards']:,} shards labeling after "
            f"{listing['first_shard_started_s']:.1f} s (target ≤ 10 s); "
            f"listing them all takes {listing['full_listing_s']:.1f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="B/16", help="preset or checkpoint")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--images-per-shard", type=int, default=64)
    parser.add_argument("--cpus", type=int, help="Ray CPUs (default: all)")
    parser.add_argument("--model-seconds", type=float, default=20.0)
    parser.add_argument("--listing-shards", type=int, default=0, help="e.g. 10000")
    parser.add_argument("--skip-raydata", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true", help="only the listing test")
    parser.add_argument("--repeat", type=int, default=1, help="alternate contenders, keep best")
    parser.add_argument("--decode-threads", type=int, help="per actor (default: its CPUs)")
    parser.add_argument(
        "--decode",
        default="auto",
        help="pipeline contenders by decode mode, comma-separated: auto, cpu, device"
        " (device on a CPU: torchvision's CPU decode + tensor preprocessing)",
    )
    parser.add_argument("--s3-endpoint-url")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    results = bench(args)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
