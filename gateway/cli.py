"""The ``mqtt-kinesis-gateway`` command line.

Exit codes (the Ruff/ty/SQLFluff convention, so CI can tell a bad file from a broken run):
  0  valid / every case passed / at least one record would be written / the spool is sound
  1  findings / a case failed / no record would be written / the spool is damaged
  2  usage error, unreadable input (or no spool), invalid route file for explain/test, or an internal error

No input produces a traceback: anything unexpected is caught at the top and printed on one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources
from typing import TextIO

from gateway import __version__
from gateway.explain import (
    InputError,
    compare,
    make_message,
    metadata_line,
    outcome_json,
    parse_cases,
    parse_user_properties,
)
from gateway.model import Record
from gateway.ops.logs import configure_logging, log_uncaught_exceptions, register_secret
from gateway.routefile.configmap import is_configmap, looks_like_configmap, route_entries
from gateway.routefile.findings import REPORTERS, FileReport, Finding, report_text
from gateway.routefile.loader import LoadResult, check_schema_in_child, load_routes, load_routes_bytes, load_routes_text
from gateway.routefile.readfile import RouteFileError, read_route_file
from gateway.routefile.yamlreader import read_yaml
from gateway.routing.table import RouteTable
from gateway.settings.settings import Settings, SettingsError, find_env_file, load_settings

__all__ = ["build_parser", "main"]

PROG = "mqtt-kinesis-gateway"
EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("gateway")


class _UsageError(Exception):
    """Bad input that is the user's to fix: one line on stderr, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Stream MQTT messages into Amazon Kinesis Data Streams, routed by a validated YAML route file.",
        epilog="Exit codes: 0 ok, 1 findings or failures, 2 usage error, unreadable input or internal error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    validate = commands.add_parser("validate",
                                   help="check route files (offline); exit 0 valid, 1 findings, 2 unreadable")
    validate.add_argument("files", nargs="+", metavar="FILE",
                          help="route files to check, or Kubernetes ConfigMaps holding them"
                               " (data entries *.yaml, *.yml)")
    validate.add_argument("--format", choices=sorted(REPORTERS), default="text",
                          help="text: path:line:col: message [rule]; json: one object; github: annotations")
    validate.set_defaults(handler=_cmd_validate)

    explain = commands.add_parser("explain", help="dry-run one message through the route table, print the records")
    explain.add_argument("routes", metavar="ROUTES", help="route file")
    explain.add_argument("--topic", required=True, help="topic of the message (no wildcards)")
    payload = explain.add_mutually_exclusive_group(required=True)
    payload.add_argument("--payload", help="payload text (UTF-8)")
    payload.add_argument("--payload-file", metavar="PATH", help="file holding the payload bytes")
    explain.add_argument("--qos", type=int, choices=(0, 1), default=1, help="QoS the message arrives with (default 1)")
    explain.add_argument("--retain", action="store_true",
                         help="the message comes from the broker's retained store, sent for a new subscription")
    explain.add_argument("--resent", action="store_true",
                         help="with --retain implied: a retained copy the broker sends again for a subscription the "
                              "session already had (a reconnect or restart that resumed the session)")
    explain.add_argument("--user-property", action="append", default=[], metavar="KEY=VALUE", dest="user_properties",
                         help="an MQTT 5 user property (repeatable, in the order sent)")
    explain.add_argument("--content-type", metavar="TYPE", help="the MQTT 5 content type, e.g. application/json")
    explain.set_defaults(handler=_cmd_explain)

    test = commands.add_parser("test", help="run a YAML file of routing cases against a route file")
    test.add_argument("routes", metavar="ROUTES", help="route file")
    test.add_argument("cases", metavar="CASES", help="YAML file: cases: [{name, topic, payload, expect: [...]}]")
    test.set_defaults(handler=_cmd_test)

    schema = commands.add_parser("schema", help="print the route file JSON Schema")
    schema.set_defaults(handler=_cmd_schema)

    spool = commands.add_parser("spool", help="look at a spool directory without changing it")
    spool_commands = spool.add_subparsers(dest="spool_command", metavar="SPOOL_COMMAND", required=True)
    inspect = spool_commands.add_parser(
        "inspect", help="records and bytes per stream and route, oldest record's age, engine check;"
                        " exit 0 ok, 1 damaged, 2 no spool or unreadable")
    inspect.add_argument("directory", metavar="DIR",
                         help="the spool directory (GATEWAY_SPOOL_DIR, or a worker-N in it)")
    inspect.set_defaults(handler=_cmd_spool, contents=True)
    check = spool_commands.add_parser("check", help="the engine check only; exit 0 ok, 1 damaged, 2 unreadable")
    check.add_argument("directory", metavar="DIR", help="the spool directory")
    check.set_defaults(handler=_cmd_spool, contents=False)

    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--routes", metavar="FILE",
                     help="route file (default: GATEWAY_ROUTES, else the legacy .env route)")
    run.add_argument("--env-file", metavar="FILE", help="read settings from this .env file")
    run.add_argument("--workers", type=int, metavar="N", help="worker processes (default: GATEWAY_WORKERS or 1)")
    run.set_defaults(handler=_cmd_run)
    return parser


# --- validate ---------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    reports = [report for name in args.files for report in _validate_file(name)]
    unreadable = any(f.rule == "unreadable" for r in reports for f in r.findings)
    REPORTERS[args.format](reports, out, err)
    if unreadable:
        return EXIT_USAGE
    return EXIT_OK if all(r.valid for r in reports) else EXIT_FINDINGS


def _report(label: str, result: LoadResult) -> FileReport:
    return FileReport(label, result.findings, len(result.table.routes) if result.table is not None else None)


def _validate_file(name: str) -> list[FileReport]:
    """One report for a route file; one per route file entry for a Kubernetes ConfigMap, with its
    findings on the manifest's lines. The file is read once, under the loader's size limit."""
    try:
        raw = read_route_file(name)
    except RouteFileError as error:
        return [FileReport(name, (Finding(name, 1, 1, "", "unreadable", "error", error.message),))]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = ""  # load_routes_bytes below words the finding
    if looks_like_configmap(text):
        doc = read_yaml(text, name)
        if is_configmap(doc.data):
            entries = route_entries(doc)
            if not entries:
                problem = Finding(name, 1, 1, "data", "configmap", "error",
                                  "a ConfigMap with no data entry named *.yaml or *.yml: no route file to check")
                return [FileReport(name, (problem,))]
            reports = []
            for entry in entries:
                result = load_routes_text(entry.text, name)
                placed = LoadResult(result.table, tuple(entry.place(f) for f in result.findings))
                reports.append(_report(f"{name} (data: {entry.key})", placed))
            return reports
    return [_report(name, load_routes_bytes(raw, name))]


# --- explain and test: the same RouteTable.route the gateway runs -----------------------------


def _load_table(path: str, err: TextIO) -> RouteTable:
    result: LoadResult = load_routes(path)
    if result.table is None:
        report_text([FileReport(path, result.findings)], err, err)
        raise _UsageError(f"{path}: the route file is not valid")
    return result.table


def _cmd_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.payload_file is not None:
        try:
            with open(args.payload_file, "rb") as handle:
                payload = handle.read()
        except OSError as exc:
            raise _UsageError(f"{args.payload_file}: cannot read the payload: {exc.strerror or exc}") from None
    else:
        payload = args.payload.encode("utf-8", "surrogateescape")
    message = make_message(args.topic, payload, args.qos)._replace(
        retain=args.retain or args.resent, resent=args.resent,
        user_properties=parse_user_properties(args.user_properties), content_type=args.content_type)
    table = _load_table(args.routes, err)
    err.write(metadata_line(message) + "\n")
    outcomes = table.route(message)
    for outcome in outcomes:
        out.write(json.dumps(outcome_json(outcome), ensure_ascii=False) + "\n")
    if not outcomes:
        err.write(f"no route matches topic {args.topic!r}\n")
    return EXIT_OK if any(isinstance(o, Record) for o in outcomes) else EXIT_FINDINGS


def _cmd_test(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    table = _load_table(args.routes, err)
    try:
        with open(args.cases, encoding="utf-8-sig") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"{args.cases}: cannot read the cases: {getattr(exc, 'strerror', None) or exc}") from None
    doc = read_yaml(text, args.cases)
    if doc.findings:
        report_text([FileReport(args.cases, doc.findings)], err, err)
        raise _UsageError(f"{args.cases}: the cases file is not valid YAML")
    try:
        parsed = parse_cases(doc.data)
    except InputError as exc:
        raise _UsageError(f"{args.cases}: {exc}") from None
    failed = 0
    for case in parsed:
        try:
            message = make_message(case.topic, case.payload, 1)
        except InputError as exc:
            raise _UsageError(f"{args.cases}: case {case.name!r}: {exc}") from None
        outcomes = table.route(message)
        problems = compare(case, [outcome_json(o) for o in outcomes])
        if problems:
            failed += 1
            out.write(f"FAIL {case.name}\n")
            for line in problems:
                out.write(f"  {line}\n")
        else:
            out.write(f"PASS {case.name}\n")
    err.write(f"{len(parsed) - failed} passed, {failed} failed\n")
    return EXIT_FINDINGS if failed else EXIT_OK


# --- spool inspect and check: read-only --------------------------------------------------------


def _cmd_spool(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from gateway.spool.inspect import inspect_spool, write_report  # noqa: PLC0415  (sqlite3 only here)

    found = inspect_spool(args.directory, contents=args.contents)
    write_report(found, out, err, contents=args.contents)
    return found.exit_code


# --- schema and run ---------------------------------------------------------------------------


def _cmd_schema(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    out.write(resources.files("gateway.routefile").joinpath("routes.schema.json").read_text(encoding="utf-8"))
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    environ = dict(os.environ)
    if args.routes:  # the command line wins over GATEWAY_ROUTES
        environ["GATEWAY_ROUTES"] = args.routes
    try:
        settings = load_settings(environ, env_file=args.env_file or find_env_file(environ))
    except SettingsError as error:
        _log_startup_failure(environ, str(error))
        return EXIT_USAGE
    workers = args.workers or settings.workers
    if workers > 1:  # the supervisor never imports boto3 or paho: it only starts processes
        from gateway.workers import supervise  # noqa: PLC0415 - only the supervisor needs it

        return supervise(workers, settings, sys.argv)
    return _run_gateway(settings)


def _log_startup_failure(environ: dict[str, str], line: str) -> None:
    """A start-up failure is one line in the log format in force, on the log's channel, like every
    later line; the format itself may be what is wrong, so fall back to ``auto``."""
    fmt = environ.get("LOG_FORMAT", "auto").strip().lower()
    configure_logging(fmt if fmt in ("auto", "json", "text") else "auto")  # type: ignore[arg-type]
    log.error("not starting: %s", line)


def _run_gateway(settings: Settings) -> int:
    """One gateway process until SIGTERM/SIGINT. The route file is loaded before boto3 and paho
    are imported, and its schema is checked in a child process (gateway.routefile.schema), so the
    child runs while this process is still small and jsonschema never enters it."""
    configure_logging(settings.logging.format, settings.logging.level)
    log_uncaught_exceptions()
    for secret in settings.secret_values:
        register_secret(secret)
    log.info("settings read from the environment%s",
             f" and {settings.env_file}" if settings.env_file else " (no .env file)")
    for line in settings.ignored:
        log.warning("%s", line)
    check_schema_in_child()
    table = _initial_table(settings)
    if table is None:
        return EXIT_USAGE
    from gateway.app import Gateway  # noqa: PLC0415 - boto3 and paho are imported only to run

    try:
        return int(Gateway(settings, table).run_until_stopped() or 0)
    except SettingsError as error:  # e.g. no region, HTTP port taken: named like a bad setting
        log.error("not starting: %s", error)
        return EXIT_USAGE


def _initial_table(settings: Settings) -> RouteTable | None:
    if settings.routes_file:
        result = load_routes(settings.routes_file)
        for finding in result.findings:
            if finding.severity == "error":
                log.error("%s", finding.format_text())
        if result.table is None:
            log.error("route file %s is invalid; not starting", settings.routes_file)
            return None
        return result.table
    legacy = settings.legacy_route
    if legacy is None:  # load_settings guarantees one or the other
        log.error("no route file (GATEWAY_ROUTES) and no TOPIC/KIN_STREAM_NAME")
        return None
    return RouteTable.legacy(legacy.topic, legacy.stream, legacy.partition_key, legacy.qos)


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (never raises, never prints a traceback)."""
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.handler(args, out, err))
    except (_UsageError, InputError) as exc:
        err.write(f"{PROG}: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the promise is: one line, never a traceback
        err.write(f"{PROG}: internal error: {type(exc).__name__}: {exc}\n".replace("\n", " ").rstrip() + "\n")
        return EXIT_USAGE
