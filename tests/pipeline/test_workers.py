"""pipeline.workers and pipeline.pool without Ray: batching, row order, error rows, sizing."""

from __future__ import annotations

import argparse
import queue
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from models.mixer import build_preset
from pipeline.pool import ActorPlan, Feed, plan_actors
from pipeline.workers import label_decoded, predict_topk
from pipeline.writer import ShardTable


class EagerPredictor:
    """The plain eval-mode model behind the Predictor interface (the reference, no tricks)."""

    name, precision, device, preferred_batch_size = "torch", "fp32", "cpu", 8

    def __init__(self, model) -> None:
        self.model = model.eval()
        self.batches: list[int] = []

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(batch))
        return self.model(batch)

    @torch.inference_mode()
    def predict_with_features(self, batch: torch.Tensor):
        self.batches.append(len(batch))
        features = self.model.forward_features(batch)
        return self.model.head(features), features


@dataclass
class Rec:
    key: str
    data: bytes | None = b"x"
    label: int | None = None
    error: str | None = None


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32) for _ in range(n)]


def test_rows_keep_input_order_with_errors_between_batches(tiny) -> None:
    images = _images(5)
    decoded = [
        (Rec("a", label=3), images[0], None),
        (Rec("b"), None, "truncated image"),
        (Rec("c"), images[1], None),
        (Rec("d"), images[2], None),
        (Rec("e", data=None, error="tar member cut short"), None, None),
        (Rec("f"), images[3], None),
        (Rec("g"), images[4], None),
    ]
    predictor = EagerPredictor(tiny)
    table = ShardTable("s", tiny.label_names)
    timing = label_decoded(decoded, predictor, table, batch_size=2, topk=3)
    assert timing.model_s > 0 and timing.wait_s >= 0
    assert predictor.batches == [2, 2, 1]  # full batches of images; errors do not count
    rows = table.to_table().to_pylist()
    assert [r["key"] for r in rows] == list("abcdefg")
    assert [r["error"] for r in rows] == [
        None,
        "truncated image",
        None,
        None,
        "tar member cut short",
        None,
        None,
    ]
    expected = tiny(torch.from_numpy(np.stack(images))).argmax(1).tolist()
    assert [r["label"] for r in rows if r["error"] is None] == expected
    assert rows[0]["true_label"] == 3
    for row in rows:
        if row["error"] is None:
            assert len(row["topk_labels"]) == 3
            assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
            assert row["score"] == pytest.approx(row["topk_scores"][0])


def test_topk_scores_are_softmax_probabilities_and_features_match(tiny) -> None:
    images = _images(3, seed=1)
    labels, scores, features = predict_topk(EagerPredictor(tiny), images, 10, embeddings=True)
    assert labels.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)  # all 10 classes of tiny
    batch = torch.from_numpy(np.stack(images))
    np.testing.assert_allclose(features, tiny.forward_features(batch).detach().numpy(), atol=1e-5)


def test_a_shard_of_only_errors_makes_no_model_call(tiny) -> None:
    predictor = EagerPredictor(tiny)
    table = ShardTable("s", tiny.label_names)
    label_decoded([(Rec("a"), None, "empty file")], predictor, table, batch_size=4, topk=5)
    assert predictor.batches == []
    assert table.to_table().column("error").to_pylist() == ["empty file"]


def _node(node_id: str, cpus: int, gpus: int = 0, alive: bool = True) -> dict:
    resources = {"CPU": float(cpus), "memory": 1e9}
    if gpus:
        resources["GPU"] = float(gpus)
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def test_cpu_nodes_get_one_actor_owning_all_cores() -> None:
    plans = plan_actors([_node("a", 8), _node("b", 2), _node("dead", 4, alive=False)])
    assert [(p.num_cpus, p.threads, p.node_id, p.device) for p in plans] == [
        (8, 8, "a", "cpu"),
        (2, 2, "b", "cpu"),
    ]
    assert [p.decode_threads for p in plans] == [4, 1]  # one per two cores


def test_gpu_nodes_get_one_actor_per_gpu_with_the_cpus_beside_it() -> None:
    plans = plan_actors([_node("head", 4), _node("g", 16, gpus=4)])
    assert plans == [ActorPlan(4, 1.0, threads=1, decode_threads=4, device="cuda")] * 4


def test_requested_actors_split_the_resources() -> None:
    assert {(p.num_cpus, p.threads) for p in plan_actors([_node("a", 8)], requested=4)} == {(2, 2)}
    assert len(plan_actors([_node("a", 2)], requested=3)) == 3  # at least one CPU each
    shared = plan_actors([_node("g", 8, gpus=1)], requested=2)
    assert [p.num_gpus for p in shared] == [0.5, 0.5]


def test_a_cluster_without_resources_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no alive node"):
        plan_actors([_node("a", 0)])


def test_feed_streams_items_and_hands_over_the_producers_error() -> None:
    def items():
        yield 1
        yield 2
        raise OSError("listing broke")

    feed = Feed(items(), maxsize=1)
    assert feed.get(timeout=5) == 1
    assert feed.get(timeout=5) == 2
    with pytest.raises(OSError, match="listing broke"):
        feed.get(timeout=5)
    assert feed.done


def test_feed_says_empty_while_the_producer_is_slow_and_stops_at_the_end() -> None:
    import threading

    gate = threading.Event()

    def items():
        gate.wait(10)
        yield "x"

    feed = Feed(items())
    with pytest.raises(queue.Empty):
        feed.get(timeout=None)
    gate.set()
    assert feed.get(timeout=5) == "x"
    with pytest.raises(StopIteration):
        feed.get(timeout=5)


def test_shard_labeler_labels_two_shards_at_once_without_ray(tmp_path) -> None:
    """The plain class behind the actor; two threads at once is the GPU actor's mode."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from models.checkpoints import save_checkpoint
    from pipeline.shards import list_shards
    from pipeline.storage import open_storage
    from pipeline.workers import ShardLabeler, WorkerSpec
    from tests.pipeline import imagegen

    model_path = tmp_path / "tiny.safetensors"
    sha256 = save_checkpoint(build_preset("tiny"), model_path)
    source = str(tmp_path / "in")
    storage = open_storage(source)
    keys = imagegen.write_tar_shards(storage, source, shards=2, images_per_shard=5)
    shards = list(list_shards(storage, source))
    spec = WorkerSpec(str(model_path), device="cpu", batch_size=2, run_id="r1", code_version="v")
    labeler = ShardLabeler(spec)

    def label(shard):
        return labeler.label_shard(shard, str(tmp_path / "out" / f"{shard.name}.parquet"))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(label, shards))
    assert [r.images for r in results] == [5, 5] and all(r.errors == 0 for r in results)
    rows = []
    for result, shard in zip(results, shards, strict=True):
        file = pq.ParquetFile(result.output_uri)
        metadata = {k.decode(): v.decode() for k, v in file.metadata.metadata.items()}
        assert metadata["model_sha256"] == sha256 and metadata["input_etag"] == shard.etag
        assert metadata["run_id"] == "r1" and metadata["code_version"] == "v"
        rows += file.read().to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(keys)
    assert all(r["true_label"] == int(r["key"][-6:]) % 10 for r in rows)
    # backend/precision auto: the worker measured, and each result carries how it chose,
    # which RunSummary keeps for _SUCCESS.json and the Prefect summary.
    from pipeline.runspec import RunSummary

    auto = results[0].auto
    assert auto and auto["chose"] == f"{results[0].backend} {results[0].precision}"
    summary = RunSummary("r1", source, str(tmp_path / "out"), "2024-01-01", "tiny", sha256)
    for result in results:
        summary.add(result)
    assert summary.to_dict()["auto"] == auto


def test_compile_cache_is_the_runs_shared_store(s3_server, s3_bucket) -> None:
    """--compile-cache reaches each actor as the store its predictor caches compiled models in."""
    from console.run import add_arguments, config_from_args
    from pipeline.storage import StorageOptions
    from pipeline.workers import WorkerSpec, compile_cache_store

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    prefix = f"s3://{s3_bucket}/compiled/"
    args = parser.parse_args(["in", "out", "--model", "tiny", "--compile-cache", prefix])
    assert config_from_args(args).compile_cache == prefix
    assert compile_cache_store(WorkerSpec("tiny")) is None
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    store = compile_cache_store(WorkerSpec("tiny", compile_cache=prefix, storage_options=options))
    store.put("model.pt2", b"package bytes")
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="compiled/model.pt2")["Body"]
    assert body.read() == b"package bytes"
    assert compile_cache_store(WorkerSpec("tiny", compile_cache=prefix)).get("model.pt2")
