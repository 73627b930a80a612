"""What a boto3/botocore failure means: transient (retry it) or a StorageError to report now.

Messages are built from error codes and exception names, never from request data, and pass
through `redact` so no credential or signed URL can reach a log line.
"""

from __future__ import annotations

import http.client

from pipeline.storage.errors import ObjectNotFound, StorageError, one_line
from pipeline.storage.retry import Transient
from pipeline.storage.uris import redact, safe_endpoint

THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "PriorRequestNotComplete",
        "429",
    }
)
UNAVAILABLE_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException"}
)

_CODE_REASONS = {
    "NoSuchBucket": "bucket {bucket!r} does not exist",
    "InvalidAccessKeyId": "wrong AWS credentials: the access key id is not known to the endpoint",
    "SignatureDoesNotMatch": "wrong AWS credentials: the secret key does not match the key id",
    "ExpiredToken": "AWS credentials have expired",
    "InvalidToken": "AWS session token is invalid",
    "AccessDenied": "access denied (check the IAM policy for this bucket and prefix)",
    "AllAccessDisabled": "access to bucket {bucket!r} is disabled",
    "NoSuchKey": "no such object",
    "PreconditionFailed": "the object changed while it was being read",
}


def error_code(err: BaseException) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def http_status(err: BaseException) -> int:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


def transient(err: BaseException, endpoint: str | None = None) -> Transient | None:
    """The retryable reason of a failed attempt, or None when retrying cannot help.

    endpoint: the client's endpoint URL, named (without userinfo) when it cannot be reached.
    """
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        EndpointConnectionError,
        HTTPClientError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(err, ClientError):
        code, status = error_code(err), http_status(err)
        if code in THROTTLING_CODES or status == 429:
            return Transient("throttled", code or str(status))
        if code == "503" or status == 503:
            # A HEAD carries no body, so no code: on S3 a bare 503 is "Slow Down".
            return Transient("throttled" if code in ("", "503") else "unavailable", code or "503")
        if code in UNAVAILABLE_CODES or status >= 500 or code in ("500", "502", "504"):
            return Transient("unavailable", f"{code or status} ({status})" if status else code)
        return None
    if isinstance(err, EndpointConnectionError):
        return Transient("unreachable", str(safe_endpoint(endpoint) or "(default AWS endpoint)"))
    if isinstance(
        err,
        (
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
            Urllib3Error,
            http.client.HTTPException,
            ConnectionResetError,
            TimeoutError,
        ),
    ):
        return Transient("broken", type(err).__name__)
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        return Transient("broken", type(err).__name__)
    return None


def to_storage_error(
    err: BaseException, uri: str, action: str, endpoint: str | None = None
) -> StorageError:
    """A one-line StorageError naming the URI and what to fix."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(err, StorageError):
        return err
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role)"
        )
    if isinstance(err, EndpointConnectionError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {safe_endpoint(endpoint)}")
    if isinstance(err, ClientError):
        code = error_code(err)
        bucket = uri[len("s3://") :].partition("/")[0]
        if code in _CODE_REASONS:
            reason = _CODE_REASONS[code].format(bucket=bucket)
            cls = ObjectNotFound if code == "NoSuchKey" else StorageError
            return cls(f"{uri}: {action}: {reason} ({code})")
        if code == "404":
            return ObjectNotFound(f"{uri}: {action}: no such object")
        if code == "403":
            return StorageError(f"{uri}: {action}: access denied or wrong credentials (403)")
        message = err.response.get("Error", {}).get("Message", "")
        return StorageError(f"{uri}: {action}: {code}: {redact(one_line(message, 200))}")
    return StorageError(f"{uri}: {action}: {type(err).__name__}: {redact(one_line(err, 200))}")
