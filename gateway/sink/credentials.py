"""Where the gateway's AWS credentials come from: the SDKs' default chain, plus AWS_ASSUME_ROLE_ARN.

Why not botocore's chain: importing it costs ~12 MB of a ~30 MB process. The sources users rely
on are each a file read or one small HTTP call, so they are done here, in botocore's order, with
its variable names (docs/settings.md, "Credentials"):

1. environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``;
2. web identity (IRSA): ``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN`` (or the profile's
   ``web_identity_token_file`` + ``role_arn``), STS AssumeRoleWithWebIdentity, unsigned;
3. the profile (``AWS_PROFILE``) in the shared credentials then config file: static keys;
4. container: ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` (ECS) or ``..._FULL_URI`` with
   ``AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)`` (EKS Pod Identity);
5. EC2 instance role over IMDSv2 (``AWS_EC2_METADATA_SERVICE_ENDPOINT`` to move it,
   ``AWS_EC2_METADATA_DISABLED=true`` to skip it).

A profile whose credentials need more (``role_arn`` with ``source_profile``/``credential_source``,
``credential_process``, SSO) is handed to botocore, imported then and only then: those sources
keep working, at botocore's memory cost. ``AWS_ASSUME_ROLE_ARN`` assumes that role with whatever
the chain found (STS AssumeRole, signed here).

Invariant owned here: temporary credentials are refreshed as botocore does, under a lock, when
less than 15 minutes are left (advisory: a failed refresh keeps the old ones) and at the latest
10 minutes before expiry (mandatory: a failed refresh raises). The clock is injectable.
"""

from __future__ import annotations

import configparser
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

from gateway.sink.errors import AwsError, CredentialRetrievalError, NoCredentialsError, ServiceError
from gateway.sink.httpconn import Response, one_shot
from gateway.sink.sigv4 import Credentials, sign

__all__ = ["ADVISORY_S", "MANDATORY_S", "CredentialSource", "default_chain", "profile_settings", "sts_endpoint"]

log = logging.getLogger(__name__)

ADVISORY_S = 15 * 60
MANDATORY_S = 10 * 60
_METADATA_TIMEOUT_S = 1.0   # botocore's metadata_service_timeout
_STS_TIMEOUT_S = 10.0
_ECS_HOST = "http://169.254.170.2"
_CONTAINER_HOSTS = {"127.0.0.1", "localhost", "::1", "169.254.170.2", "169.254.170.23", "fd00:ec2::23"}
_BOTOCORE_KEYS = ("credential_process", "sso_session", "sso_start_url", "source_profile", "credential_source")

Fetch = Callable[[], Credentials]


class CredentialSource:
    """Credentials from ``fetch``, kept and refreshed before they expire; ``get`` is thread-safe."""

    def __init__(self, fetch: Fetch, method: str, clock: Callable[[], float] = time.time) -> None:
        self._fetch = fetch
        self.method = method
        self._clock = clock
        self._current: Credentials | None = None
        self._lock = threading.Lock()

    def get(self) -> Credentials:
        current = self._current
        if current is not None and (current.expires_at is None or current.expires_at - self._clock() > ADVISORY_S):
            return current
        with self._lock:
            current = self._current
            left = None if current is None or current.expires_at is None else current.expires_at - self._clock()
            if current is not None and (left is None or left > ADVISORY_S):
                return current
            try:
                self._current = self._fetch()
            except AwsError as exc:
                if current is None or left is None or left <= MANDATORY_S:
                    raise
                log.warning("aws credentials (%s): refresh failed, using the current ones for %.0f s more: %s",
                            self.method, left - MANDATORY_S, exc)
                return current
            return self._current


# ---- shared config files -----------------------------------------------------------------------

def _read_ini(path: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise CredentialRetrievalError("shared config", f"{path}: {' '.join(str(exc).split())[:200]}") from None
    return parser


def profile_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The active profile's keys: the config file's ``[profile NAME]`` (``[default]``), overlaid by
    the credentials file's ``[NAME]``."""
    name = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"
    config = _read_ini(environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
    section = "default" if name == "default" and config.has_section("default") else f"profile {name}"
    out = dict(config.items(section)) if config.has_section(section) else {}
    if name == "default" and not out and config.has_section("profile default"):
        out = dict(config.items("profile default"))
    creds = _read_ini(environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials")
    if creds.has_section(name):
        out.update(creds.items(name))
    if environ.get("AWS_PROFILE") and not out:
        raise CredentialRetrievalError("shared config", f"the config profile ({name}) could not be found")
    return out


def services_endpoint(environ: Mapping[str, str], profile: Mapping[str, str], service: str) -> str | None:
    """``endpoint_url`` of ``service`` in the profile's ``services`` section of the config file."""
    name = profile.get("services")
    if not name:
        return None
    config = _read_ini(environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
    section = f"services {name}"
    block = config.get(section, service, fallback="") if config.has_section(section) else ""
    for line in block.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "endpoint_url" and value.strip():
            return value.strip()
    return None


# ---- STS ---------------------------------------------------------------------------------------

def sts_endpoint(environ: Mapping[str, str], profile: Mapping[str, str], region: str | None) -> str:
    if (environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() != "true":
        for url in (environ.get("AWS_ENDPOINT_URL_STS"), services_endpoint(environ, profile, "sts"),
                    environ.get("AWS_ENDPOINT_URL"), profile.get("endpoint_url")):
            if url:
                return url
    if not region:
        return "https://sts.amazonaws.com"
    return f"https://sts.{region}.amazonaws.com" + (".cn" if region.startswith("cn-") else "")


def _sts(url: str, action: str, params: dict[str, str], region: str, credentials: Credentials | None,
         ca_bundle: str | None) -> Credentials:
    import xml.etree.ElementTree as ET  # noqa: PLC0415 - only when STS is used

    body = urlencode({"Action": action, "Version": "2011-06-15", **params}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    split = urlsplit(url)
    if credentials is not None:
        headers = sign("POST", split.netloc, split.path or "/", headers, body, credentials, region, "sts")
    reply = one_shot(url, "POST", headers, body, _STS_TIMEOUT_S, ca_bundle)

    def text(root: ET.Element, tag: str) -> str:
        node = next((n for n in root.iter() if n.tag.rsplit("}", 1)[-1] == tag), None)
        return (node.text or "").strip() if node is not None else ""

    try:
        root = ET.fromstring(reply.body)
    except ET.ParseError:
        raise ServiceError("UnknownError", reply.body[:200].decode(errors="replace"), reply.status, action) from None
    if reply.status != 200:
        raise ServiceError(text(root, "Code") or "UnknownError", text(root, "Message"), reply.status, action)
    return Credentials(text(root, "AccessKeyId"), text(root, "SecretAccessKey"), text(root, "SessionToken"),
                       _epoch(text(root, "Expiration")), action)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def assume_role(source: CredentialSource, role_arn: str, session_name: str, duration_s: int, url: str,
                region: str, ca_bundle: str | None = None, clock: Callable[[], float] = time.time) -> CredentialSource:
    """``role_arn`` assumed with ``source``'s credentials, refreshed before expiry."""
    params = {"RoleArn": role_arn, "RoleSessionName": session_name, "DurationSeconds": str(duration_s)}

    def fetch() -> Credentials:
        try:
            return _sts(url, "AssumeRole", params, region, source.get(), ca_bundle)
        except ServiceError as exc:
            raise CredentialRetrievalError("assume-role", str(exc)) from exc

    return CredentialSource(fetch, "assume-role", clock)


# ---- the providers -----------------------------------------------------------------------------

def _web_identity(token_file: str, role_arn: str, session_name: str, url: str, ca_bundle: str | None) -> Fetch:
    def fetch() -> Credentials:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise CredentialRetrievalError("assume-role-with-web-identity", f"{token_file}: {exc.strerror}") from None
        params = {"RoleArn": role_arn, "RoleSessionName": session_name, "WebIdentityToken": token}
        try:
            return _sts(url, "AssumeRoleWithWebIdentity", params, "us-east-1", None, ca_bundle)
        except ServiceError as exc:
            raise CredentialRetrievalError("assume-role-with-web-identity", str(exc)) from exc
    return fetch


def _json_credentials(reply: Response, provider: str) -> Credentials:
    try:
        data = orjson.loads(reply.body)
        expiration = data.get("Expiration")
        return Credentials(data["AccessKeyId"], data["SecretAccessKey"], data.get("Token"),
                           _epoch(expiration) if expiration else None, provider)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
        raise CredentialRetrievalError(provider, f"HTTP {reply.status}: {reply.body[:200]!r}") from None


def _container(environ: Mapping[str, str]) -> Fetch | None:
    relative = environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    full = environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if relative:
        url = _ECS_HOST + relative
    elif full:
        parts = urlsplit(full)
        if parts.scheme != "https" and (parts.hostname or "") not in _CONTAINER_HOSTS:
            raise CredentialRetrievalError("container-role", f"unsupported host in {full} (https, loopback or the "
                                           "ECS/EKS link-local addresses only)")
        url = full
    else:
        return None
    token_file = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    token_value = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")

    def fetch() -> Credentials:
        headers = {"Accept": "application/json"}
        token = token_value
        if token_file:  # read on every fetch: the kubelet rotates it
            try:
                with open(token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as exc:
                raise CredentialRetrievalError("container-role", f"{token_file}: {exc.strerror}") from None
        if token:
            headers["Authorization"] = token
        try:
            reply = one_shot(url, "GET", headers, b"", 2.0)
        except AwsError as exc:
            raise CredentialRetrievalError("container-role", str(exc)) from None
        return _json_credentials(reply, "container-role")
    return fetch


def _imds(environ: Mapping[str, str], profile: Mapping[str, str]) -> Fetch | None:
    if (environ.get("AWS_EC2_METADATA_DISABLED") or "").lower() == "true":
        return None
    base = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or profile.get("ec2_metadata_service_endpoint")
    if not base:
        mode = (environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE")
                or profile.get("ec2_metadata_service_endpoint_mode"))
        base = "http://[fd00:ec2::254]" if (mode or "").lower() == "ipv6" else "http://169.254.169.254"
    base = base.rstrip("/")

    def fetch() -> Credentials:
        try:
            headers: dict[str, str] = {}
            token = one_shot(base + "/latest/api/token", "PUT",
                             {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, b"", _METADATA_TIMEOUT_S)
            if token.status == 200:
                headers["X-aws-ec2-metadata-token"] = token.body.decode().strip()
            elif token.status not in (403, 404, 405):
                raise CredentialRetrievalError("iam-role", f"IMDS token request: HTTP {token.status}")
            path = base + "/latest/meta-data/iam/security-credentials/"
            role = one_shot(path, "GET", headers, b"", _METADATA_TIMEOUT_S)
            if role.status != 200 or not role.body.strip():
                raise CredentialRetrievalError("iam-role", f"no instance role (HTTP {role.status})")
            reply = one_shot(path + role.body.decode().split()[0], "GET", headers, b"", _METADATA_TIMEOUT_S)
        except CredentialRetrievalError:
            raise
        except AwsError as exc:  # botocore too says "no credentials" when nothing answers here
            raise NoCredentialsError(f"none configured, and the instance metadata service did not answer: {exc}"
                                     ) from None
        return _json_credentials(reply, "iam-role")
    return fetch


def _botocore(profile_name: str | None, clock: Callable[[], float]) -> Fetch:
    held: list[Any] = []

    def fetch() -> Credentials:
        if not held:
            import botocore.session  # noqa: PLC0415 - only for the profile features done by botocore

            credentials = botocore.session.Session(profile=profile_name).get_credentials()
            if credentials is None:
                raise NoCredentialsError(f"profile {profile_name or 'default'}")
            held.append(credentials)
        frozen = held[0].get_frozen_credentials()  # botocore refreshes its own under its lock
        refreshable = getattr(held[0], "refresh_needed", None) is not None
        # Ask botocore again a minute later: it decides when its credentials need refreshing.
        expires_at = clock() + ADVISORY_S + 60 if refreshable else None
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token, expires_at, "botocore")
    return fetch


def default_chain(environ: Mapping[str, str] = os.environ, region: str | None = None, *,
                  clock: Callable[[], float] = time.time) -> CredentialSource:
    """The first source of the chain that is configured; raises NoCredentialsError when none is."""
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        static = Credentials(key, secret, environ.get("AWS_SESSION_TOKEN") or environ.get("AWS_SECURITY_TOKEN"),
                             method="env")
        return CredentialSource(lambda: static, "env", clock)
    profile = profile_settings(environ)
    ca_bundle = environ.get("AWS_CA_BUNDLE") or profile.get("ca_bundle")
    token_file = environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or profile.get("web_identity_token_file")
    role_arn = environ.get("AWS_ROLE_ARN") or profile.get("role_arn")
    if role_arn and any(k in profile for k in ("source_profile", "credential_source")):
        return CredentialSource(_botocore(environ.get("AWS_PROFILE"), clock), "botocore", clock)
    if token_file and role_arn:
        session = environ.get("AWS_ROLE_SESSION_NAME") or profile.get("role_session_name") or f"gateway-{int(clock())}"
        fetch = _web_identity(token_file, role_arn, session, sts_endpoint(environ, profile, region), ca_bundle)
        return CredentialSource(fetch, "assume-role-with-web-identity", clock)
    if any(k in profile for k in _BOTOCORE_KEYS):
        return CredentialSource(_botocore(environ.get("AWS_PROFILE"), clock), "botocore", clock)
    if profile.get("aws_access_key_id") and profile.get("aws_secret_access_key"):
        static = Credentials(profile["aws_access_key_id"], profile["aws_secret_access_key"],
                             profile.get("aws_session_token"), method="shared-credentials-file")
        return CredentialSource(lambda: static, "shared-credentials-file", clock)
    container = _container(environ)
    if container is not None:
        return CredentialSource(container, "container-role", clock)
    imds = _imds(environ, profile)
    if imds is not None:
        return CredentialSource(imds, "iam-role", clock)
    raise NoCredentialsError()
