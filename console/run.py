"""`mixer-label run INPUT OUTPUT --model M`: label every image under INPUT into OUTPUT."""

from __future__ import annotations

import argparse
import json
import os

from console.errors import PARTLY_FAILED

# The run's settings that are not --flags here (console.errors names settings by flag).
SETTING_FLAGS = {"input_uri": "INPUT", "output_uri": "OUTPUT"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="s3://bucket/prefix or folder holding shards")
    parser.add_argument("output", help="s3://bucket/prefix or folder; files go to date=YYYY-MM-DD/")
    parser.add_argument(
        "--model", required=True, help="checkpoint (path or s3:// URI) or preset name (B/16)"
    )
    parser.add_argument("--backend", default="auto", help="auto, torch, onnxruntime, tensorrt")
    parser.add_argument(
        "--precision", default="auto", help="auto, fp32, bf16, fp16, int8, fp8 (CUDA 8.9+)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    parser.add_argument(
        "--actors",
        type=int,
        help="a fixed pool of N actors (default: an elastic pool, one actor per GPU, else per"
        " CPU node, growing onto nodes that join)",
    )
    parser.add_argument(
        "--min-actors",
        type=int,
        metavar="N",
        help="elastic pool: idle actors beyond N stop as the queue drains, and the request to"
        " the autoscaler never goes below N actors' worth while shards are left (default: 1)",
    )
    parser.add_argument(
        "--max-actors",
        type=int,
        metavar="N",
        help="elastic pool: at most N actors, and ask the autoscaler for up to N actors' worth"
        " of GPUs (or CPUs) while shards are queued (default: no bound, no request)",
    )
    parser.add_argument(
        "--actor-device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="elastic pool: gpu = one actor per GPU, and the autoscaler is asked for GPUs even"
        " before a GPU node joined (a cluster scaling GPU workers from zero); cpu = one actor"
        " per node, GPUs unused; auto = GPUs once the cluster has any (default)",
    )
    parser.add_argument("--date", help="output partition date YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--force", action="store_true", help="relabel shards already done")
    parser.add_argument(
        "--s3-endpoint-url",
        help="S3-compatible endpoint (MinIO, Ceph, R2) (default: the AWS chain:"
        " $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS itself)",
    )
    parser.add_argument(
        "--images-per-shard", type=int, default=1000, help="plain image prefixes: images/shard"
    )
    parser.add_argument(
        "--image-column",
        help="Parquet shards: the image-bytes column (default: the first of the usual names)",
    )
    parser.add_argument("--topk", type=int, default=5, help="top-k labels and scores per image")
    parser.add_argument("--embeddings", action="store_true", help="write pre-head features")
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per shard")
    parser.add_argument(
        "--decode-threads", type=int, help="decode threads per actor (default: from its CPUs)"
    )
    parser.add_argument(
        "--decode",
        choices=("auto", "cpu", "device"),
        default="auto",
        help="where JPEGs are decoded and resized: device = in batches on the model's GPU"
        " (needs the gpu extra), cpu = Pillow in threads, auto = device on CUDA (default)",
    )
    parser.add_argument(
        "--compile-cache",
        default=os.environ.get("MIXER_LABEL_COMPILE_CACHE") or None,
        metavar="URI",
        help="s3:// prefix or shared folder where the cluster keeps compiled models (CPU AOT"
        " packages, TensorRT engines), built once for all nodes (default:"
        " $MIXER_LABEL_COMPILE_CACHE, else each node's local cache)",
    )
    parser.add_argument(
        "--storage-retry-s",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long one storage call retries throttling, 5xx, resets and stalls before its"
        " shard fails and is retried elsewhere (default 60)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """The RunConfig the flags describe; a bad value is a SettingError naming its field."""
    from pipeline.runspec import RunConfig

    return RunConfig(
        input_uri=args.input,
        output_uri=args.output,
        model=args.model,
        backend=args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        ray_address=args.ray_address,
        actors=args.actors,
        min_actors=args.min_actors,
        max_actors=args.max_actors,
        actor_device=args.actor_device,
        date=args.date,
        force=args.force,
        s3_endpoint_url=args.s3_endpoint_url,
        images_per_shard=args.images_per_shard,
        image_column=args.image_column,
        topk=args.topk,
        embeddings=args.embeddings,
        max_attempts=args.max_attempts,
        decode_threads=args.decode_threads,
        decode=args.decode,
        compile_cache=args.compile_cache,
        storage_retry_s=args.storage_retry_s,
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.preflight import check_before_start

    config = config_from_args(args)
    # Before the heavier imports: a wrong setting, model, URI or endpoint fails in a moment.
    # (run_labeling checks again, for its other callers; the second look is cheap.)
    check_before_start(config)

    from console.progress import ProgressBar
    from pipeline.run import run_labeling

    progress = ProgressBar(enabled=not args.no_progress)
    # A RunError, PoolError or StorageError (the listing or the summary write broke mid-run)
    # becomes one line in console.errors. Finished shards are complete files; running the
    # same command again resumes after them.
    try:
        summary = run_labeling(config, on_progress=progress, verbose=args.verbose)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_summary(summary.to_dict()))
    return 0 if summary.ok else PARTLY_FAILED


def format_summary(summary: dict) -> str:
    """The end-of-run summary a person reads."""
    lines = [
        f"run {summary['run_id']}: {summary['images']:,} images, {summary['errors']:,} errors, "
        f"{summary['images_per_s']:,.1f} images/s in {summary['seconds']:,.1f} s",
        f"shards: {summary['shards_done']} labeled, {summary['shards_skipped']} skipped "
        f"(already done), {summary['shards_failed']} failed, {summary['shards_total']} total",
        model_line(summary),
        pool_line(summary),
        f"output: {summary['partition_uri']}",
    ]
    lines += class_lines(summary.get("class_counts") or {})
    lines += failed_file_lines(summary)
    for failed in summary.get("failed_shards") or []:
        lines.append(f"FAILED {failed['shard']}: {failed['error']}")
    return "\n".join(lines)


def pool_line(summary: dict) -> str:
    """How many actors ran at most, and on how many nodes they labeled."""
    actors, nodes = int(summary.get("actors") or 0), len(summary.get("nodes") or {})
    return (
        f"actors: {actors} at most, {nodes} node{'' if nodes == 1 else 's'} labeled"
        " (nodes and pool history in _SUCCESS.json)"
    )


def model_line(summary: dict) -> str:
    """Model, sha256 and backend: of this run, or of the outputs found when all were done."""
    backend = summary.get("backend") or "unknown"
    if summary.get("precision"):
        backend += f" ({summary['precision']})"
    line = f"model: {summary['model']}, sha256 {summary['model_sha256']}, backend {backend}"
    if not summary["shards_done"] and summary["shards_skipped"]:
        line += " (of the outputs found: every shard was already done)"
    return line


def class_lines(counts: dict[str, int], top: int = 5) -> list[str]:
    """The most frequent predicted classes as a small table: name, images, share."""
    if not counts:
        return []
    total = sum(counts.values())
    shown = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    title = f"top {len(shown)} of {len(counts)} classes" if len(counts) > top else "classes"
    name_width = max(len(str(name)) for name, _ in shown)
    count_width = max(len(f"{n:,}") for _, n in shown)
    return [f"{title} (images, share of the labeled ones):"] + [
        f"  {name:<{name_width}}  {n:>{count_width},}  {n / total:6.1%}" for name, n in shown
    ]


def failed_file_lines(summary: dict, top: int = 5) -> list[str]:
    """The first images that could not be labeled, with their reasons."""
    failed = (summary.get("failed_files") or [])[:top]
    if not failed:
        return []
    lines = [f"first {len(failed)} of {summary['errors']:,} error rows (the images not labeled):"]
    lines += [f"  {f['file']} in {f['shard']}: {f['error']}" for f in failed]
    return lines
