"""pipeline.storage on a real S3 API server (moto) and on a local folder: same tests for both."""

from __future__ import annotations

import pickle

import pytest

from pipeline.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    StorageError,
    StorageOptions,
    open_storage,
)


def test_put_get_head_round_trip(store):
    storage, root = store
    uri = storage.join(root, "dir/obj.bin")
    storage.put_atomic(uri, b"0123456789")
    assert storage.get(uri) == b"0123456789"
    info = storage.head(uri)
    assert info is not None and info.uri == uri and info.size == 10 and info.etag
    assert storage.exists(uri)
    assert storage.head(storage.join(root, "dir/missing")) is None
    assert not storage.exists(storage.join(root, "dir"))  # a folder is not an object


def test_ranged_get_is_a_half_open_slice(store):
    storage, root = store
    uri = storage.join(root, "r.bin")
    data = bytes(range(100))
    storage.put_atomic(uri, data)
    assert storage.get(uri, 10, 20) == data[10:20]
    assert storage.get(uri, 90) == data[90:]
    assert storage.get(uri, None, 5) == data[:5]
    assert storage.get(uri, 95, 500) == data[95:]
    assert storage.get(uri, 100) == b""
    assert storage.get(uri, 500) == b""
    assert storage.get(uri, 7, 7) == b""


def test_list_is_sorted_recursive_and_treats_the_prefix_as_a_folder(store):
    storage, root = store
    keys = ["a/x", "a-b", "a/y/z", "ab", "data/1", "database/2", "z"]
    for key in reversed(keys):
        storage.put_atomic(storage.join(root, key), key.encode())
    listed = list(storage.list(root))
    assert [o.uri for o in listed] == [storage.join(root, k) for k in sorted(keys)]
    assert [o.size for o in listed] == [len(k) for k in sorted(keys)]
    assert [o.uri for o in storage.list(storage.join(root, "data"))] == [
        storage.join(root, "data/1")
    ]
    assert [o.uri for o in storage.list(root + "/a/")] == [
        storage.join(root, "a/x"),
        storage.join(root, "a/y/z"),
    ]
    assert list(storage.list(storage.join(root, "nothing-here"))) == []


def test_open_streams_the_whole_object(store):
    storage, root = store
    uri = storage.join(root, "big.bin")
    data = bytes(range(256)) * 12_000  # 3 MB: several buffer refills
    storage.put_atomic(uri, data)
    chunks = []
    with storage.open(uri) as f:
        while chunk := f.read(100_003):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    with pytest.raises(ObjectNotFound, match="missing.bin"):
        storage.open(storage.join(root, "missing.bin"))


def test_put_atomic_overwrites_changes_etag_and_leaves_no_temp_files(store):
    storage, root = store
    uri = storage.join(root, "out/part.parquet")
    storage.put_atomic(uri, b"first version")
    first = storage.head(uri)
    storage.put_atomic(uri, b"second, longer version")
    second = storage.head(uri)
    assert storage.get(uri) == b"second, longer version"
    assert first.etag != second.etag
    assert [o.uri for o in storage.list(root)] == [uri]
    if isinstance(storage, LocalStorage):
        assert [p.name for p in (storage._path(root) / "out").iterdir()] == ["part.parquet"]


def test_missing_object_errors_name_the_uri(store):
    storage, root = store
    uri = storage.join(root, "nope.tar")
    with pytest.raises(ObjectNotFound) as err:
        storage.get(uri)
    assert uri in str(err.value)
    storage.delete(uri)  # deleting a missing object is fine


def test_check_writable_leaves_nothing_behind(store):
    storage, root = store
    storage.check_writable(storage.join(root, "output"))
    assert list(storage.list(root)) == []


def test_local_unwritable_prefix_fails_fast(tmp_path):
    # CI runs as root, so permission bits stop nothing; a file where a folder should be does.
    (tmp_path / "blocker").write_bytes(b"a file, not a folder")
    storage = open_storage(str(tmp_path))
    with pytest.raises(StorageError, match="output not writable") as err:
        storage.check_writable(str(tmp_path / "blocker" / "out"))
    message = str(err.value)
    assert str(tmp_path / "blocker" / "out") in message and "\n" not in message
    print(message)


def test_s3_list_streams_page_by_page(s3_server, s3_bucket):
    storage = S3Storage(page_size=10)
    root = f"s3://{s3_bucket}/many"
    for i in range(25):
        storage.put_atomic(storage.join(root, f"{i:03d}"), b"x")
    calls = []
    storage.client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kw: calls.append(1)
    )
    listing = storage.list(root)
    first = next(listing)
    assert first.uri.endswith("/000") and len(calls) == 1  # yielded before the listing ends
    assert len(list(listing)) == 24 and len(calls) == 3


def test_s3_multipart_put_for_big_objects(s3_server, s3_bucket):
    storage = S3Storage(multipart_threshold=5 * 2**20, part_size=5 * 2**20)
    uri = f"s3://{s3_bucket}/big/object.bin"
    data = bytes(range(256)) * (11 * 2**20 // 256)  # 11 MiB -> 3 parts
    storage.put_atomic(uri, data)
    assert storage.head(uri).etag.endswith("-3")  # S3's multipart ETag: md5-of-md5s "-" parts
    assert storage.get(uri, 5 * 2**20 - 3, 5 * 2**20 + 3) == data[5 * 2**20 - 3 : 5 * 2**20 + 3]
    uploads = storage.client.list_multipart_uploads(Bucket=s3_bucket)
    assert not uploads.get("Uploads")


def test_s3_stream_resumes_after_a_dropped_connection(s3_server, s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}")
    uri = f"s3://{s3_bucket}/stream.bin"
    data = bytes(range(256)) * 16_000  # 4 MB
    storage.put_atomic(uri, data)
    f = storage.open(uri)
    head = f.read(1_500_000)
    f.raw._body.close()  # the connection drops mid-object
    rest = f.read()
    assert head + rest == data


def test_s3_stream_refuses_to_splice_a_changed_object(s3_server, s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}")
    uri = f"s3://{s3_bucket}/changing.bin"
    storage.put_atomic(uri, b"a" * 3_000_000)
    f = storage.open(uri)
    f.read(1_200_000)
    storage.put_atomic(uri, b"b" * 3_000_000)
    f.raw._body.close()
    with pytest.raises(StorageError, match="changed while it was being read"):
        f.read()


def test_missing_bucket_is_named(s3_server):
    storage = open_storage("s3://no-such-bucket-here/in")
    checks = {
        "list": lambda: list(storage.list("s3://no-such-bucket-here/in")),
        "head": lambda: storage.head("s3://no-such-bucket-here/in/a.tar"),
        "get": lambda: storage.get("s3://no-such-bucket-here/in/a.tar"),
        "write": lambda: storage.check_writable("s3://no-such-bucket-here/out"),
    }
    for name, check in checks.items():
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist") as e:
            check()
        print(f"{name}: {e.value}")
        assert "\n" not in str(e.value)


def test_explicit_endpoint_url_overrides_the_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    storage = open_storage(f"s3://{s3_bucket}", StorageOptions(endpoint_url=s3_server.endpoint_url))
    storage.put_atomic(f"s3://{s3_bucket}/via-option", b"ok")
    assert storage.get(f"s3://{s3_bucket}/via-option") == b"ok"


@pytest.mark.parametrize(
    ("user", "secret", "expected"),
    [
        ("AKIANOTAREALKEY00000", None, "wrong AWS credentials: the access key id is not known"),
        ("writer", "definitely-the-wrong-secret", "wrong AWS credentials: the secret key does not"),
    ],
)
def test_wrong_credentials_fail_with_one_clear_line(
    s3_auth_server, monkeypatch, user, secret, expected
):
    env = s3_auth_server.env(user, secret)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3_auth_server.bucket}/input"
    storage = open_storage(uri)
    for check in (
        lambda: list(storage.list(uri)),
        lambda: storage.head(uri + "/a.tar"),
        lambda: storage.check_writable(uri),
    ):
        with pytest.raises(StorageError, match=expected) as err:
            check()
        message = str(err.value)
        assert uri in message and "\n" not in message
        assert env["AWS_SECRET_ACCESS_KEY"] not in message
        print(message)


def test_read_only_credentials_make_the_output_unwritable(s3_auth_server, monkeypatch):
    for key, value in s3_auth_server.env("reader").items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3_auth_server.bucket}/output/date=2024-01-01"
    storage = open_storage(uri)
    assert list(storage.list(uri)) == []  # reading works
    with pytest.raises(StorageError, match="output not writable: .*access denied") as err:
        storage.check_writable(uri)
    print(err.value)
    assert uri in str(err.value)


def test_writer_credentials_work_on_the_authenticated_server(s3_auth_server, monkeypatch):
    for key, value in s3_auth_server.env("writer").items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3_auth_server.bucket}/ok/object"
    storage = open_storage(uri)
    storage.check_writable(f"s3://{s3_auth_server.bucket}/ok")
    storage.put_atomic(uri, b"fine")
    assert storage.get(uri) == b"fine"


def test_storage_pickles_without_client_or_credentials(s3_server, s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}", StorageOptions(max_pool_connections=8))
    storage.put_atomic(f"s3://{s3_bucket}/p", b"1")  # makes the client
    payload = pickle.dumps(storage)
    assert b"testing-secret-key" not in payload and b"testing-key-id" not in payload
    clone = pickle.loads(payload)
    assert clone.options == StorageOptions(max_pool_connections=8)
    assert clone.get(f"s3://{s3_bucket}/p") == b"1"
    assert pickle.loads(pickle.dumps(StorageOptions("http://x"))) == StorageOptions("http://x")


def test_bad_uris_are_refused():
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        open_storage("gs://bucket/prefix")
    with pytest.raises(StorageError, match="no bucket name"):
        open_storage("s3://").list("s3://")


def test_join_handles_slashes():
    s3 = S3Storage()
    assert s3.join("s3://b/p/", "/x/", "y") == "s3://b/p/x/y"
    assert s3.join("s3://b", "k") == "s3://b/k"
    local = LocalStorage()
    assert local.join("/data/", "a", "b/") == "/data/a/b"
    assert local.join("/", "a") == "/a"
    assert local.join("rel", "a") == "rel/a"


def test_unreachable_endpoint_fails_the_preflight_fast(s3_server):
    import socket
    import time

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = open_storage(
        "s3://any-bucket", StorageOptions(endpoint_url=f"http://127.0.0.1:{port}")
    )
    start = time.perf_counter()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        storage.check_writable("s3://any-bucket/out")
    assert time.perf_counter() - start < 10


def test_custom_endpoints_use_path_style_addressing(monkeypatch):
    # MinIO, Ceph and most S3-compatible servers need bucket-in-path URLs; no request is sent.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio.example:9000")
    for options in (StorageOptions(), StorageOptions(endpoint_url="http://minio.example:9000")):
        client = S3Storage(options).client
        url = client.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "k"})
        assert url.startswith("http://minio.example:9000/bkt/k?")
