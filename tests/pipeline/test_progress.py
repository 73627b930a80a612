"""Progress in images: totals from the listing (exact for plain images, estimated for tars),
rate and ETA, the per-shard line, and what a real run and `mixer-label run` show."""

from __future__ import annotations

import re

import pytest

from pipeline.progress import ProgressTracker, format_images
from pipeline.runspec import ShardResult
from pipeline.shards import Shard


def _images_shard(name: str, images: int) -> Shard:
    members = tuple(f"{name}/{i}.jpg" for i in range(images))
    return Shard(f"in#{name}", name, "etag", 1000 * images, "images", members)


def _tar(name: str, size: int) -> Shard:
    return Shard(f"in/{name}.tar", name, "etag", size, "tar")


def _done(shard: Shard, images: int, errors: int = 0, started_at: float = 100.0) -> ShardResult:
    return ShardResult(shard, f"out/{shard.name}.parquet", images, errors, started_at=started_at)


def test_plain_image_shards_give_an_exact_total_rate_and_eta():
    tracker = ProgressTracker()
    a, b = _images_shard("a", 1000), _images_shard("b", 500)
    tracker.listed(a, skipped=False)
    tracker.listed(b, skipped=False)
    tracker.listing_done()
    tracker.finished(_done(a, 1000, errors=3, started_at=100.0))
    event = tracker.snapshot(now=110.0)
    assert (event.images_done, event.images_total, event.images_total_exact) == (1000, 1500, True)
    assert event.images_per_s == pytest.approx(100.0)
    assert event.eta_s == pytest.approx(5.0)
    assert event.fraction == pytest.approx(2 / 3)
    assert format_images(event) == "1,000/1,500"
    assert event.describe() == "1,000/1,500 images, 1/2 shards, 3 errors, 100 img/s, ETA 5 s"


def test_tar_totals_are_estimated_from_bytes_until_every_tar_is_done():
    tracker = ProgressTracker()
    first, second = _tar("t0", 1_000_000), _tar("t1", 3_000_000)
    tracker.listed(first, skipped=False)
    tracker.listed(second, skipped=False)
    assert tracker.snapshot().images_total is None  # no tar labeled yet: nothing to go by
    tracker.finished(_done(first, 100))
    event = tracker.snapshot()
    assert (event.images_total, event.images_total_exact) == (400, False)
    assert format_images(event) == "100/~400"
    tracker.listing_done()
    tracker.finished(_done(second, 250))
    event = tracker.snapshot()
    assert (event.images_done, event.images_total, event.images_total_exact) == (350, 350, True)
    assert event.fraction == 1.0


def test_skipped_shards_count_as_shards_and_failed_ones_leave_the_image_total():
    tracker = ProgressTracker()
    done, skipped, failed = _images_shard("a", 10), _images_shard("b", 10), _images_shard("c", 5)
    for shard, skip in ((done, False), (skipped, True), (failed, False)):
        tracker.listed(shard, skipped=skip)
    tracker.listing_done()
    tracker.finished(ShardResult(skipped, "out/b.parquet", skipped=True))
    tracker.finished(ShardResult(failed, "out/c.parquet", failed=True, error="gone"))
    tracker.finished(_done(done, 10))
    event = tracker.snapshot()
    assert (event.shards_done, event.shards_total, event.shards_skipped) == (3, 3, 1)
    assert (event.shards_failed, event.labeled, event.to_label) == (1, 2, 2)
    assert (event.images_done, event.images_total) == (10, 10)
    assert "3/3 shards (1 already done), 1 failed" in event.describe()


def test_each_event_carries_its_shard_line():
    events = []
    tracker = ProgressTracker([events.append])
    shards = [_images_shard(f"s{i}", 1000) for i in range(2)]
    for shard in shards:
        tracker.listed(shard, skipped=False)
    tracker.finished(_done(shards[0], 1000, errors=3, started_at=0.0))
    line = events[-1].shard_line()
    # Still listing: the total so far, with a "+".
    assert re.fullmatch(r"shard 1/2\+: 1,000 images, 3 errors, [\d,]+ img/s \(s0\)", line), line
    tracker.listing_done()
    failed = ShardResult(shards[1], "out/s1.parquet", failed=True, error="worker died")
    tracker.finished(failed)
    assert events[-1].shard_line() == "shard 2/2: FAILED s1: worker died"
    tracker.end()
    assert events[-1].result is None and events[-1].eta_s == 0.0


def test_a_real_run_reports_every_shard_and_ends_at_its_total(ray_local, s3_bucket, tmp_path):
    from models.checkpoints import save_checkpoint
    from models.mixer import build_preset
    from pipeline.run import RunConfig, run_labeling
    from pipeline.storage import open_storage
    from tests.pipeline import imagegen

    storage = open_storage(f"s3://{s3_bucket}")
    imagegen.write_tar_shards(storage, f"s3://{s3_bucket}/in", shards=2, images_per_shard=3)
    for i in range(5):  # a folder of plain images: two virtual shards of 3 and 2
        storage.put_atomic(f"s3://{s3_bucket}/in/loose/{i}.png", imagegen.png_bytes(seed=i))
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(build_preset("tiny"), model)
    config = RunConfig(
        f"s3://{s3_bucket}/in",
        f"s3://{s3_bucket}/out",
        str(model),
        date="2024-05-03",
        batch_size=2,
        images_per_shard=3,
    )
    events = []
    summary = run_labeling(config, on_progress=events.append)
    lines = [e.shard_line() for e in events if e.result is not None]
    assert len(lines) == 4
    numbers = []
    for line in lines:
        match = re.fullmatch(r"shard (\d)/4: ([23]) images, 0 errors, [\d,]+ img/s \(.+\)", line)
        assert match, line
        numbers.append(int(match.group(1)))
    assert numbers == [1, 2, 3, 4]
    last = events[-1]
    assert last.result is None and last.listing_done
    assert (last.images_done, last.images_total, last.images_total_exact) == (11, 11, True)
    assert (last.shards_done, last.shards_total, last.errors) == (4, 4, 0)
    assert summary.images == 11 and last.images_per_s > 0


def test_the_run_command_shows_images_of_the_total(ray_local, s3_bucket, tmp_path, capsys):
    from console.main import main as cli_main
    from models.checkpoints import save_checkpoint
    from models.mixer import build_preset
    from pipeline.storage import open_storage
    from tests.pipeline import imagegen

    storage = open_storage(f"s3://{s3_bucket}")
    for i in range(6):
        storage.put_atomic(f"s3://{s3_bucket}/in/{i}.png", imagegen.png_bytes(seed=i))
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(build_preset("tiny"), model)
    code = cli_main(
        ["run", f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", "--model", str(model)]
        + ["--date", "2024-05-03", "--images-per-shard", "4"]
    )
    captured = capsys.readouterr()
    err = captured.err
    assert code == 0
    assert "actors: 1 at most, 1 node labeled" in captured.out
    # tqdm redraws with carriage returns; the last state is what stays on the terminal.
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "labeling: 100%" in final, err[-2000:]
    assert "6/6 images, 2/2 shards, 0 errors" in final and "ETA 0 s" in final
