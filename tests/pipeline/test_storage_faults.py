"""The storage retry policy against a real S3 API (moto) behind a fault-injecting proxy.

Every test is bounded: small objects, a retry budget of a few seconds, a short read window.
"""

from __future__ import annotations

import time

import pytest

from pipeline.storage import (
    RetryPolicy,
    S3Storage,
    StorageError,
    StorageOptions,
    StorageUnavailable,
)
from tests.fault_proxy import FaultProxy

FAST = RetryPolicy(budget_s=4.0, window_s=1.0, min_bytes_per_s=2000, first_delay_s=0.02)


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url, seed=7, trickle_interval_s=0.3) as p:
        yield p


def storage_via(proxy: FaultProxy, policy: RetryPolicy = FAST, **kwargs) -> S3Storage:
    return S3Storage(StorageOptions(endpoint_url=proxy.endpoint_url, retry=policy), **kwargs)


def data_of(n: int, salt: int = 0) -> bytes:
    return bytes((i * 7 + salt) % 251 for i in range(n))


@pytest.mark.parametrize(
    "fault", ["slowdown", "internal", "reset_headers", "reset_body", "delay", "trickle"]
)
def test_every_fault_on_a_get_is_retried_or_resumed(proxy, s3_bucket, fault):
    storage = storage_via(proxy)
    uri = f"s3://{s3_bucket}/obj.bin"
    data = data_of(200_000)
    storage.put_atomic(uri, data)
    proxy.script = [fault]
    start = time.monotonic()
    assert storage.get(uri) == data
    assert storage.get(uri, 1000, 150_000) == data[1000:150_000]  # ranged GET, no fault
    proxy.script = [fault]
    assert storage.get(uri, 5, 180_000) == data[5:180_000]  # ranged GET with the fault
    print(f"{fault}: {time.monotonic() - start:.2f} s, {dict(proxy.counts)}")
    assert proxy.counts[fault] == 2


def test_a_trickle_is_abandoned_after_one_window_and_resumed(proxy, s3_bucket):
    # 1 byte per 0.3 s against a minimum of 2000 B/s over 1 s: abandoned after ~1 s, resumed
    # from the bytes already received (a ranged GET), pinned to the ETag.
    storage = storage_via(proxy)
    uri = f"s3://{s3_bucket}/slow.bin"
    data = data_of(50_000, 3)
    storage.put_atomic(uri, data)
    proxy.script = ["trickle"]
    start = time.monotonic()
    assert storage.get(uri) == data
    assert time.monotonic() - start < 15  # abandoned early, not dribbled for the proxy's 20 s


def test_the_stream_survives_resets_and_throttling(proxy, s3_bucket):
    storage = storage_via(proxy)
    uri = f"s3://{s3_bucket}/stream.bin"
    data = data_of(3_000_000, 1)
    storage.put_atomic(uri, data)
    proxy.script = ["reset_body", "slowdown", "reset_headers", "internal", "reset_body"]
    with storage.open(uri) as f:
        assert f.read() == data


def test_list_head_put_multipart_delete_retry(proxy, s3_bucket):
    mib = 1024 * 1024  # S3 (and moto) want parts of at least 5 MiB, but the last
    storage = storage_via(proxy, multipart_threshold=5 * mib, part_size=5 * mib, page_size=3)
    root = f"s3://{s3_bucket}/many"
    proxy.rate = 0.3
    proxy.faults = ("slowdown", "internal", "reset_headers", "reset_body")
    for i in range(8):
        storage.put_atomic(f"{root}/{i:02d}", data_of(100 + i, i))
    big = data_of(6 * mib, 9)
    storage.put_atomic(f"{root}/big", big)  # multipart: create, 2 parts, complete
    listed = [info.uri.rpartition("/")[2] for info in storage.list(root)]
    assert listed == sorted([f"{i:02d}" for i in range(8)] + ["big"])
    for i in range(8):
        info = storage.head(f"{root}/{i:02d}")
        assert info is not None and info.size == 100 + i
        assert storage.get(f"{root}/{i:02d}") == data_of(100 + i, i)
    assert storage.get(f"{root}/big") == big
    storage.delete(f"{root}/00")
    assert storage.head(f"{root}/00") is None
    print(dict(proxy.counts))
    assert sum(proxy.counts[f] for f in proxy.faults) >= 5  # the faults did happen


def test_throttling_past_the_budget_is_named_with_the_time_spent(proxy, s3_bucket):
    storage = storage_via(proxy, RetryPolicy(budget_s=1.5, window_s=1.0, first_delay_s=0.05))
    assert storage.client  # made before the clock starts (making a boto3 client is slow)
    proxy.burst(30)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as err:
        storage.get(f"s3://{s3_bucket}/any")
    spent = time.monotonic() - start
    message = str(err.value)
    print(message)
    # botocore's adaptive rate limiter also paces the retries (a pause of up to ~2 s).
    assert "S3 is throttling: SlowDown; retried for " in message
    assert f"s3://{s3_bucket}/any" in message and "\n" not in message
    assert 1.4 < spent < 20  # ended by the budget (plus paced attempts), not by the 30 s burst


def test_the_write_probe_rides_out_a_burst_and_names_throttling_after_the_budget(proxy, s3_bucket):
    storage = storage_via(proxy, RetryPolicy(budget_s=3.0, window_s=1.0, first_delay_s=0.05))
    assert storage.client  # made before the burst starts
    proxy.burst(1.0)  # shorter than the budget: the probe succeeds
    storage.check_writable(f"s3://{s3_bucket}/out")
    assert proxy.counts["slowdown"] >= 1  # it met the burst, and still succeeded
    proxy.burst(30, ("slowdown", "internal"))  # longer than the budget
    with pytest.raises(StorageUnavailable) as err:
        storage.check_writable(f"s3://{s3_bucket}/out")
    message = str(err.value)
    print(message)
    assert "not writable" not in message and "access denied" not in message
    assert "cannot check that the output is writable" in message
    assert "retried for " in message


def test_a_missing_bucket_is_still_a_missing_bucket_behind_faults(proxy):
    storage = storage_via(proxy)
    proxy.script = ["slowdown", "internal"]
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist") as err:
        storage.check_writable("s3://no-such-bucket-x/out")
    assert not isinstance(err.value, StorageUnavailable)


def test_a_changed_object_is_never_spliced_on_resume(proxy, s3_bucket):
    storage = storage_via(proxy)
    uri = f"s3://{s3_bucket}/changing.bin"
    storage.put_atomic(uri, b"a" * 500_000)
    reader = storage._reader(uri)
    reader.start()
    first = reader.read(1000)
    storage.put_atomic(uri, b"b" * 500_000)
    reader._body.close()  # the connection drops; the resume must not read the new version
    with pytest.raises(StorageError, match="changed while it was being read"):
        reader.readall()
    assert first == b"a" * 1000


def test_random_faults_lose_no_object(proxy, s3_bucket):
    storage = storage_via(proxy)
    proxy.rate = 0.2
    root = f"s3://{s3_bucket}/rand"
    blobs = {f"{root}/{i:03d}": data_of(5_000 + 97 * i, i) for i in range(40)}
    for uri, blob in blobs.items():
        storage.put_atomic(uri, blob)
    for uri, blob in blobs.items():
        assert storage.get(uri) == blob
        assert storage.get(uri, 100, 4000) == blob[100:4000]
    print(dict(proxy.counts))
    assert sum(proxy.counts[f] for f in proxy.faults) >= 10


def test_a_shard_deadline_stops_the_retrying(proxy, s3_bucket):
    storage = storage_via(proxy, RetryPolicy(budget_s=60, window_s=1.0, first_delay_s=0.05))
    proxy.burst(30)
    bounded = storage.with_deadline(time.monotonic() + 1.0)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match="deadline passed"):
        bounded.get(f"s3://{s3_bucket}/any")
    assert time.monotonic() - start < 20  # the deadline, not the 60 s budget
