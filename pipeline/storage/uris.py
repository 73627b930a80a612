"""Keep secrets out of URIs, messages and keys: refuse URIs that carry one, redact any text.

A URI with userinfo (`s3://AKIA...:SECRET@bucket/...`, `http://user:pass@host`) or a
presigned-style query (`X-Amz-Signature=...`, `X-Amz-Credential=...`, `Signature=...`) holds a
credential; printing it, storing it in `_SUCCESS.json` or using it as a key prefix would leak it.
Such URIs are refused with the secret replaced by `***`. Credentials come from the AWS chain.
"""

from __future__ import annotations

import re

from pipeline.storage.errors import StorageError

REDACTED = "***"

# scheme://userinfo@ : everything between "//" and the last "@" before the host's end.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#\s@]*)@")
# Query parameters that carry or sign a credential (AWS SigV4 and V2, Azure SAS, GCS, tokens).
_SECRET_PARAMS = (
    r"x-amz-signature|x-amz-credential|x-amz-security-token|x-amz-date|signature|"
    r"awsaccesskeyid|sig|se|sv|sp|token|access_token|x-goog-signature|x-goog-credential|"
    r"googleaccessid|password|secret|key"
)
_SECRET_QUERY = re.compile(rf"(?i)([?&;](?:{_SECRET_PARAMS})=)([^&#\s]*)")
# Bare AWS access key ids that leak into free text.
_ACCESS_KEY = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b")


def redact(text: object) -> str:
    """The text with userinfo, credential query values and access key ids replaced by ***."""
    flat = str(text)
    flat = _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", flat)
    flat = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}{REDACTED}", flat)
    return _ACCESS_KEY.sub(REDACTED, flat)


def check_uri(uri: str, what: str = "URI") -> str:
    """The URI itself, or StorageError (secret redacted) if it carries a credential or a query.

    A query string is never part of a prefix: on S3 it would end up as a literal key prefix
    (`out?X-Amz-Signature=.../date=...`), so any `?` in an s3:// or local URI is refused.
    """
    if _USERINFO.search(uri):
        raise StorageError(
            f"{what} {redact(uri)}: credentials in the URI are refused (they would be "
            "printed and stored); use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role"
        )
    if "?" in uri and ("://" in uri or _SECRET_QUERY.search(uri)):
        scheme = uri.split("://", 1)[0] if "://" in uri else "path"
        raise StorageError(
            f"{what} {redact(uri)}: a query string is not part of a {scheme} prefix "
            "(presigned URLs are refused; credentials come from the AWS chain)"
        )
    return uri


def safe_endpoint(url: str | None) -> str | None:
    """An endpoint URL fit to print: without userinfo or a secret query."""
    return None if url is None else redact(url)
