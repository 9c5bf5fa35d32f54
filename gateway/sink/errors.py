"""The errors the lean AWS client raises, shaped so the sink's retry code reads them like botocore's.

Why a module of its own: ``gateway.sink.retry`` and ``gateway.sink.health`` sort failures without
importing the client (nor botocore, which the running gateway no longer loads). The class names
are botocore's (``EndpointConnectionError``, ``ReadTimeoutError``, ``NoCredentialsError``…),
because ``classify`` reports ``type(exc).__name__`` as the error code in logs and metrics: the
codes an operator alerts on stay what they were.

Invariant owned here: a ``ServiceError`` carries ``response`` in botocore's ClientError shape
(``Error.Code``, ``Error.Message``, ``ResponseMetadata.HTTPStatusCode``) and the same message text.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AwsError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "CredentialRetrievalError",
    "EndpointConnectionError",
    "NoCredentialsError",
    "NoRegionError",
    "ReadTimeoutError",
    "ServiceError",
    "TransportError",
]


class AwsError(Exception):
    """Anything the lean client raises."""


class ServiceError(AwsError):
    """AWS answered with an error (botocore's ClientError)."""

    def __init__(self, code: str, message: str, status: int, operation: str) -> None:
        super().__init__(f"An error occurred ({code}) when calling the {operation} operation: {message}")
        self.code = code
        self.status = status
        self.operation_name = operation
        self.response: dict[str, Any] = {"Error": {"Code": code, "Message": message},
                                         "ResponseMetadata": {"HTTPStatusCode": status}}


class TransportError(AwsError):
    """The request may or may not have reached AWS (no complete response)."""


class EndpointConnectionError(TransportError):
    """Could not connect (refused, DNS, TLS handshake)."""


class ConnectTimeoutError(EndpointConnectionError):
    """No connection within the connect timeout."""


class ReadTimeoutError(TransportError):
    """Connected, but no complete response within the read timeout."""


class ConnectionClosedError(TransportError):
    """The peer closed or reset the connection before the response was complete."""


class NoCredentialsError(AwsError):
    """No credential source is configured."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("Unable to locate credentials" + (f" ({detail})" if detail else ""))


class CredentialRetrievalError(AwsError):
    """A configured credential source failed (STS refused, metadata endpoint down, bad file)."""

    def __init__(self, provider: str, error_msg: str) -> None:
        super().__init__(f"Error when retrieving credentials from {provider}: {error_msg}")
        self.provider = provider


class NoRegionError(AwsError):
    """No region: not in AWS_REGION / AWS_DEFAULT_REGION nor in the profile."""

    def __init__(self) -> None:
        super().__init__("You must specify a region.")
