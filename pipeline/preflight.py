"""What a run checks before anything starts: no torch, no Ray, nothing written.

RunConfig refuses bad names and numbers when it is made; this adds what needs a look around
(a stat, one TCP connection): the model spec (an existing checkpoint file, an s3:// URI of one,
or a preset), the input and output URIs (a scheme we read, a bucket, a local input that exists,
an output that is not a file), and, where anything is on S3, that the endpoint answers. An
endpoint that refuses, does not resolve or does not answer fails here within seconds, with the
cause, instead of after an S3 client has retried for its whole budget.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.runspec import RunConfig, RunError
from pipeline.settings import SettingError, is_preset, unknown_preset

CHECKPOINT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin")
ENDPOINT_TIMEOUT_S = 3.0  # DNS and TCP connect each; a healthy endpoint answers in milliseconds


def check_before_start(config: RunConfig) -> None:
    """Everything about `config` that can be checked without starting anything."""
    from pipeline.storage import StorageOptions

    check_model_spec(config.model)
    check_uris(config)
    uris = (config.input_uri, config.output_uri, config.model, config.compile_cache or "")
    if any(uri.startswith("s3://") for uri in uris):
        check_s3_endpoint(StorageOptions(endpoint_url=config.s3_endpoint_url))


def check_model_spec(spec: str) -> None:
    """SettingError("model", ...) unless `spec` is a checkpoint file, an s3:// URI or a preset."""
    from pipeline.storage import StorageError, split_s3_uri

    if "://" in spec:
        if not spec.startswith("s3://"):
            raise SettingError(
                "model", f"{spec}: not a checkpoint file, an s3:// URI or a preset name"
            )
        try:
            _, key = split_s3_uri(spec)
        except StorageError as err:
            raise SettingError("model", str(err)) from None
        if not key or key.endswith("/"):
            raise SettingError("model", f"{spec}: names no object (s3://bucket/path/model.npz)")
        return
    path = Path(spec).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        raise SettingError("model", f"{spec}: a folder, not a checkpoint file")
    if is_preset(spec):
        return
    looks_like_a_path = (
        path.suffix.lower() in CHECKPOINT_SUFFIXES
        or spec.startswith(("/", ".", "~"))
        or (path.parent != Path(".") and path.parent.is_dir())
    )
    if looks_like_a_path:
        raise SettingError("model", f"{spec}: no such file")
    raise SettingError("model", f"{spec}: no such file, and no preset ({unknown_preset(spec)})")


def check_uris(config: RunConfig) -> None:
    """RunError unless input, output and compile cache are URIs a run can use."""
    from pipeline.storage import StorageError, open_storage, split_s3_uri

    for uri in (config.input_uri, config.output_uri, config.compile_cache):
        if not uri:
            continue
        try:
            open_storage(uri)  # an unknown scheme, or a URI carrying a secret
            if uri.startswith("s3://"):
                split_s3_uri(uri)  # a bucket
        except StorageError as err:
            raise RunError(str(err)) from None
    source = _local_path(config.input_uri)
    if source is not None and not source.exists():
        raise RunError(f"{config.input_uri}: no such file or folder")
    target = _local_path(config.output_uri)
    if target is not None and target.exists() and not target.is_dir():
        raise RunError(f"{config.output_uri}: a file, not a folder for the output")


def check_source(uri: str, options=None) -> None:
    """RunError unless `uri` can be read from: a known scheme and bucket, a local path that
    exists, an S3 endpoint that answers (for `mixer-label train DATA`)."""
    from pipeline.storage import StorageError, StorageOptions, open_storage, split_s3_uri

    try:
        open_storage(uri)
        if uri.startswith("s3://"):
            split_s3_uri(uri)
    except StorageError as err:
        raise RunError(str(err)) from None
    local = _local_path(uri)
    if local is not None and not local.exists():
        raise RunError(f"{uri}: no such file or folder")
    if uri.startswith("s3://"):
        check_s3_endpoint(options or StorageOptions())


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    return None if "://" in uri else Path(uri).expanduser()


def check_s3_endpoint(options, timeout_s: float = ENDPOINT_TIMEOUT_S) -> None:
    """RunError, naming the cause, unless the S3 endpoint accepts a TCP connection."""
    from pipeline.storage import S3Storage

    url = S3Storage(options).endpoint()  # where boto3 would go: option, AWS_ENDPOINT_URL*, AWS
    if url:
        check_endpoint(url, timeout_s)


def check_endpoint(url: str, timeout_s: float = ENDPOINT_TIMEOUT_S) -> None:
    """RunError unless `url`'s host resolves and its port accepts a TCP connection in time.

    The cause is named: the name does not resolve (DNS), nothing listens (connection refused),
    or no answer in time (timeout). Behind an HTTP(S) proxy the proxy makes the connection,
    so nothing is probed here.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        raise RunError(f"S3 endpoint {url}: no host in the URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RunError(f"S3 endpoint {url}: the port is not a number") from None
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return
    where = f"S3 endpoint {url}"
    addresses = _resolve(host, port, timeout_s, where)
    last: OSError | None = None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(timeout_s)
            try:
                probe.connect(address)
                return
            except TimeoutError:
                raise RunError(
                    f"{where}: no answer within {timeout_s:g} s (timeout connecting to "
                    f"{host}:{port})"
                ) from None
            except ConnectionRefusedError:
                last = ConnectionRefusedError()
            except OSError as err:
                last = err
    if isinstance(last, ConnectionRefusedError):
        raise RunError(f"{where}: connection refused (nothing listens on {host}:{port})")
    reason = (last.strerror if last else None) or str(last)
    raise RunError(f"{where}: cannot connect to {host}:{port} ({reason})")


def _resolve(host: str, port: int, timeout_s: float, where: str) -> list:
    # getaddrinfo has no timeout of its own: it runs in a daemon thread (one that never
    # answers must not keep the process alive either) and is given up on after timeout_s.
    result: dict[str, object] = {}

    def lookup() -> None:
        try:
            result["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            result["error"] = err

    thread = threading.Thread(target=lookup, name="dns-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RunError(
            f"{where}: the name {host} did not resolve within {timeout_s:g} s (DNS timeout)"
        )
    error = result.get("error")
    if isinstance(error, socket.gaierror):
        raise RunError(f"{where}: the name {host} does not resolve (DNS: {error.strerror})")
    if isinstance(error, OSError):
        raise RunError(f"{where}: cannot look up {host} ({error})")
    return result["addresses"]  # type: ignore[return-value]
