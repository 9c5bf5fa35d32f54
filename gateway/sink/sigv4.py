"""AWS Signature Version 4 for the few requests the gateway makes (Kinesis JSON, STS query).

Why here rather than botocore: botocore's signer cannot be imported without most of botocore
(~12 MB of the running process), and SigV4 for a POST to ``/`` with no query string is a few
hashes. The unit tests pin the result to botocore's own ``SigV4Auth`` for the same clock,
credentials and headers (same Authorization header), so a drift shows there.

Invariant owned here: every header given to ``sign`` is signed except the ones botocore leaves
out (User-Agent, Expect, X-Amzn-Trace-Id); the payload hash covers the exact body sent.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

__all__ = ["Credentials", "sign"]

_UNSIGNED = frozenset({"user-agent", "expect", "x-amzn-trace-id", "authorization"})


@dataclass(frozen=True, slots=True)
class Credentials:
    """One set of AWS credentials; ``expires_at`` is epoch seconds, None for static keys."""

    access_key: str
    secret_key: str
    token: str | None = None
    expires_at: float | None = None
    method: str = "static"

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials({self.access_key[:4]}…, method={self.method!r}, expires_at={self.expires_at!r})"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign(method: str, host: str, path: str, headers: dict[str, str], body: bytes,
         credentials: Credentials, region: str, service: str, now: float | None = None) -> dict[str, str]:
    """Return ``headers`` plus Host, X-Amz-Date, X-Amz-Security-Token and Authorization.

    ``host`` is what the Host header carries (with the port when it is not the scheme's default);
    ``path`` is the already-encoded request path (the gateway only sends ``/``).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    day = stamp[:8]
    out = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    out["Host"] = host
    out["X-Amz-Date"] = stamp
    if credentials.token:
        out["X-Amz-Security-Token"] = credentials.token
    signed = sorted((name.lower(), " ".join(value.split())) for name, value in out.items()
                    if name.lower() not in _UNSIGNED)
    signed_names = ";".join(name for name, _ in signed)
    canonical = "\n".join([
        method, path or "/", "",
        "".join(f"{name}:{value}\n" for name, value in signed),
        signed_names,
        hashlib.sha256(body).hexdigest(),
    ])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{credentials.secret_key}".encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
                            f"SignedHeaders={signed_names}, Signature={signature}")
    return out
