"""Where a setting's value comes from: the process environment over an optional ``.env`` file.

``Source`` looks a name up (documented name before its seed alias, environment before file,
``USER``/``PASS`` from the file only) and turns a bad value into one ``SettingsError`` line that
names the variable, and the file and line when the value came from ``.env``. Secrets are never
echoed. ``settings.py`` says which names exist; this module only knows how to read them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import NamedTuple

from dotenv import dotenv_values
from dotenv.parser import parse_stream

__all__ = ["FILE_ONLY", "SettingsError", "Source", "Value", "find_env_file", "read_env_file", "words"]

FILE_ONLY = frozenset({"USER", "PASS"})
"""Seed names honoured only from the ``.env`` file: in a shell ``USER`` is the login name."""

_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://[^/]+:\d+")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    """A setting is missing or invalid; the message is one line naming the variable (and file)."""


def find_env_file(environ: Mapping[str, str] | None = None) -> str | None:
    """The ``.env`` file to read: ``GATEWAY_ENV_FILE``, else ``./.env`` if present (as the seed)."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("GATEWAY_ENV_FILE", "").strip()
    if explicit:
        return explicit
    return ".env" if os.path.isfile(".env") else None


class Value(NamedTuple):
    name: str
    text: str
    origin: str | None  # "path:line" when the value came from the .env file


class Source:
    """Looks names up (environment over file) and turns bad values into single-line errors."""

    def __init__(self, environ: Mapping[str, str], file_values: Mapping[str, str | None],
                 lines: Mapping[str, int], path: str | None) -> None:
        self._env, self._file, self._lines, self._path = environ, file_values, lines, path

    def get(self, *names: str) -> Value | None:
        """First name, in priority order, with a non-empty value."""
        for name in names:
            if name not in FILE_ONLY:
                text = self._env.get(name)
                if text is not None and text.strip():
                    return Value(name, text, None)
            text = self._file.get(name)
            if text is not None and text.strip():
                return Value(name, text, f"{self._path}:{self._lines.get(name, 1)}")
        return None

    @staticmethod
    def error(value: Value, reason: str, show: bool = True) -> SettingsError:
        where = f"{value.origin}: " if value.origin else ""
        got = f", got {value.text.strip()!r}" if show else ""
        hint = ""
        if show and _SERVICE_LINK.fullmatch(value.text.strip()):
            hint = (" (this looks like a Kubernetes service link variable; set"
                    " enableServiceLinks: false or set the variable explicitly)")
        return SettingsError(f"{where}{value.name}: {reason}{got}{hint}")

    def text(self, *names: str, default: str | None = None) -> str | None:
        value = self.get(*names)
        return value.text.strip() if value else default

    def integer(self, *names: str, default: int, lo: int, hi: int) -> int:
        value = self.get(*names)
        if value is None:
            return default
        try:
            number = int(value.text.strip(), 10)
        except ValueError:
            number = lo - 1
        if not lo <= number <= hi:
            raise self.error(value, f"expected an integer {lo}-{hi}")
        return number

    def number(self, *names: str, default: float, lo: float, scale: float = 1.0,
               unit: str = "seconds") -> float:
        value = self.get(*names)
        if value is None:
            return default * scale
        try:
            number = float(value.text.strip())
        except ValueError:
            number = float("nan")
        if not lo <= number < float("inf"):  # also rejects nan
            raise self.error(value, f"expected a number of {unit} of at least {lo:g}")
        return number * scale

    def millis(self, name: str, default: float, lo: float) -> float:
        return self.number(name, default=default, lo=lo, scale=1e-3, unit="milliseconds")

    def boolean(self, *names: str, default: bool) -> bool:
        value = self.get(*names)
        if value is None:
            return default
        word = value.text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise self.error(value, "expected true or false")

    def choice(self, name: str, default: str, choices: Mapping[str, str]) -> str:
        value = self.get(name)
        if value is None:
            return default
        word = value.text.strip().lower()
        if word not in choices:
            raise self.error(value, "expected one of " + ", ".join(dict.fromkeys(choices.values())))
        return choices[word]

    def secret(self, name: str, seed: str) -> str | None:
        """NAME, else NAME_FILE (a mounted secret), else the seed name from the .env file."""
        direct, from_file = self.get(name), self.get(name + "_FILE")
        if direct and from_file:
            raise self.error(direct, f"both {name} and {name}_FILE are set; use one", show=False)
        if direct:
            return direct.text
        if from_file:
            path = from_file.text.strip()
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise self.error(from_file, f"cannot read {path!r}: {reason}", show=False) from None
            text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
            return text or None
        return self._file.get(seed) or None  # seed USER/PASS: .env only; empty = no credentials

    def path(self, name: str) -> str | None:
        value = self.get(name)
        if value is None:
            return None
        if not os.path.isfile(value.text.strip()):
            raise self.error(value, "no such file")
        return value.text.strip()


def words(text: str) -> dict[str, str]:
    return {word: word for word in text.split()}


def read_env_file(path: str) -> tuple[dict[str, str | None], dict[str, int]]:
    """Values and line numbers; a line python-dotenv cannot parse is an error, not a warning."""
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: tolerate a BOM from editors
            bindings = list(parse_stream(handle))
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SettingsError(f"{path}: cannot read the .env file: {reason}") from None
    lines: dict[str, int] = {}
    for binding in bindings:
        if binding.error:  # the line is not echoed: it may hold a password
            raise SettingsError(f"{path}:{binding.original.line}: cannot parse this line"
                                " (expected NAME=value)")
        if binding.key is not None:
            lines[binding.key] = binding.original.line
    values = dotenv_values(path, interpolate=False, encoding="utf-8-sig")
    return values, lines
