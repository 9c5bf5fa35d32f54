"""The AWS side of "From MQTT to Athena", stood in for by libraries that do the same work.

What each step does, and which library does it:

* Firehose → S3 objects: KPL aggregates are unpacked with aws-kinesis-agg (Firehose de-aggregates
  records from a Kinesis source before delivery); records are grouped by the template's S3 prefix
  (``dt`` is the UTC day of arrival; with dynamic partitioning ``route`` comes from the record);
  an object is the records' data joined with no separator, or with a newline after each when the
  stack has the AppendDelimiterToRecord processor (documented Firehose behaviour).
* Record format conversion: pyarrow reads the object as JSON lines with the Glue table's schema,
  dropping fields the table does not have (as the OpenX JSON SerDe does) and writes Parquet with
  pyarrow.parquet. A record that does not fit the schema is set aside as Firehose sets it aside
  under the error prefix, and the rest are converted.
* Athena: DuckDB reads the Parquet files with Hive partitioning through a view named like the
  Glue table, and reads the JSON objects line by line (``read_ndjson``, the strict reader: what a
  JSON-format table and every line-based consumer need).

Invariant: names and types come from the resolved template (``Stack``); nothing here knows the
example's columns, so a change on either side shows up as a test failure, not as a silent drop.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from tests.support.cfn import Stack

Column = tuple[str, str]  # (name, Hive type) as the Glue table declares it
_PRIMITIVE_ARROW = {"string": pa.string(), "varchar": pa.string(), "char": pa.string(), "boolean": pa.bool_(),
                    "tinyint": pa.int8(), "smallint": pa.int16(), "int": pa.int32(), "integer": pa.int32(),
                    "bigint": pa.int64(), "float": pa.float32(), "double": pa.float64(), "date": pa.date32(),
                    "timestamp": pa.timestamp("ms"), "binary": pa.binary()}
_PRIMITIVE_DUCKDB = {"string": "VARCHAR", "varchar": "VARCHAR", "char": "VARCHAR", "boolean": "BOOLEAN",
                     "tinyint": "TINYINT", "smallint": "SMALLINT", "int": "INTEGER", "integer": "INTEGER",
                     "bigint": "BIGINT", "float": "FLOAT", "double": "DOUBLE", "date": "DATE",
                     "timestamp": "TIMESTAMP", "binary": "BLOB"}
_INT_BITS = {"tinyint": 8, "smallint": 16, "int": 32, "integer": 32, "bigint": 64}
_TOKEN = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*|\d+|[<>,:()])")


# --- Hive types (the Glue column types) ---------------------------------------------------------

def parse_type(text: str) -> Any:
    """A Hive type as a tree: "double", ("array", t), ("map", k, v), ("struct", ((name, t), ...))."""
    tokens = _TOKEN.findall(text)
    assert "".join(tokens) == re.sub(r"\s", "", text), f"cannot read Hive type {text!r}"
    parsed, rest = _parse(tokens)
    assert not rest, f"cannot read Hive type {text!r}"
    return parsed


def _parse(tokens: list[str]) -> tuple[Any, list[str]]:
    head, rest = tokens[0].lower(), tokens[1:]
    if head == "array":
        element, rest = _parse(rest[1:])
        return ("array", element), rest[1:]
    if head == "map":
        key, rest = _parse(rest[1:])
        value, rest = _parse(rest[1:])
        return ("map", key, value), rest[1:]
    if head == "struct":
        fields: list[tuple[str, Any]] = []
        rest = rest[1:]
        while True:
            name, rest = rest[0], rest[2:]
            kind, rest = _parse(rest)
            fields.append((name.lower(), kind))
            separator, rest = rest[0], rest[1:]
            if separator == ">":
                return ("struct", tuple(fields)), rest
    if head == "decimal" and rest[:1] == ["("]:
        return ("decimal", int(rest[1]), int(rest[3])), rest[5:]
    assert head in _PRIMITIVE_ARROW, f"Hive type {head!r} is not handled by the tests"
    return head, rest


def arrow_type(kind: Any) -> pa.DataType:
    if isinstance(kind, str):
        return _PRIMITIVE_ARROW[kind]
    if kind[0] == "array":
        return pa.list_(arrow_type(kind[1]))
    if kind[0] == "map":
        return pa.map_(arrow_type(kind[1]), arrow_type(kind[2]))
    if kind[0] == "struct":
        return pa.struct([(name, arrow_type(t)) for name, t in kind[1]])
    return pa.decimal128(kind[1], kind[2])


def duckdb_type(kind: Any) -> str:
    if isinstance(kind, str):
        return _PRIMITIVE_DUCKDB[kind]
    if kind[0] == "array":
        return duckdb_type(kind[1]) + "[]"
    if kind[0] == "map":
        return f"MAP({duckdb_type(kind[1])}, {duckdb_type(kind[2])})"
    if kind[0] == "struct":
        return "STRUCT(" + ", ".join(f'"{name}" {duckdb_type(t)}' for name, t in kind[1]) + ")"
    return f"DECIMAL({kind[1]}, {kind[2]})"


def fits(value: Any, kind: Any) -> bool:
    """Whether a JSON value converts into a column of this type without error (null always does)."""
    if value is None:
        return True
    if isinstance(kind, tuple):
        if kind[0] == "array":
            return isinstance(value, list) and all(fits(v, kind[1]) for v in value)
        if kind[0] == "map":
            return isinstance(value, dict) and all(fits(k, kind[1]) and fits(v, kind[2]) for k, v in value.items())
        if kind[0] == "struct":
            names = dict(kind[1])
            return isinstance(value, dict) and all(k.lower() in names and fits(v, names[k.lower()])
                                                   for k, v in value.items())
        return isinstance(value, int | float) and not isinstance(value, bool)  # decimal
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in _INT_BITS:
        bits = _INT_BITS[kind]
        return type(value) is int and -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
    if kind in ("float", "double"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)  # string, varchar, char, date, timestamp, binary (base64)


# --- the table and the delivery, as the stack defines them ------------------------------------

@dataclass(frozen=True)
class GlueTable:
    database: str
    name: str
    columns: tuple[Column, ...]
    partition_keys: tuple[Column, ...]
    location: str  # the S3 path under the bucket, e.g. "data/"

    @classmethod
    def of(cls, stack: Stack) -> GlueTable:
        props = stack.properties("Table")
        table = props["TableInput"]
        storage = table["StorageDescriptor"]
        bucket_location = storage["Location"].split("/", 3)[3]   # s3://bucket/<this>
        return cls(props["DatabaseName"], table["Name"],
                   tuple((c["Name"], c["Type"]) for c in storage["Columns"]),
                   tuple((c["Name"], c["Type"]) for c in table.get("PartitionKeys", ())), bucket_location)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([(name, arrow_type(parse_type(kind))) for name, kind in self.columns])


@dataclass(frozen=True)
class Delivery:
    """What the stack's Firehose stream does to records on their way to S3."""

    prefix: str
    error_prefix: str
    append_delimiter: bool
    partition_field: str | None  # the record field dynamic partitioning reads, if enabled

    @classmethod
    def of(cls, stack: Stack) -> Delivery:
        s3 = stack.properties("DeliveryStream")["ExtendedS3DestinationConfiguration"]
        processors = s3.get("ProcessingConfiguration", {}).get("Processors", [])
        types = [p["Type"] for p in processors]
        partition_field = None
        if s3.get("DynamicPartitioningConfiguration", {}).get("Enabled"):
            (extraction,) = [p for p in processors if p["Type"] == "MetadataExtraction"]
            query = {p["ParameterName"]: p["ParameterValue"] for p in extraction["Parameters"]}
            match = re.fullmatch(r"\{(\w+): \.(\w+)\}", query["MetadataExtractionQuery"])
            assert match and match.group(1) == match.group(2), "only {key: .key} queries are stood in for"
            partition_field = match.group(1)
        return cls(s3["Prefix"], s3["ErrorOutputPrefix"], "AppendDelimiterToRecord" in types, partition_field)

    def key_prefix(self, record: UserRecord) -> str:
        """The S3 prefix of the object this record goes into; ValueError if it cannot be partitioned."""
        prefix = self.prefix.replace("!{timestamp:yyyy-MM-dd}", record.arrival.astimezone(UTC).strftime("%Y-%m-%d"))
        if self.partition_field is not None:
            try:
                value = json.loads(record.data).get(self.partition_field)
            except (ValueError, AttributeError):
                value = None
            if not isinstance(value, str):
                raise ValueError(f"no string {self.partition_field!r} to partition by")
            prefix = prefix.replace(f"!{{partitionKeyFromQuery:{self.partition_field}}}", value)
        assert "!{" not in prefix, f"prefix expression not stood in for: {prefix}"
        return prefix


@dataclass(frozen=True)
class UserRecord:
    data: bytes
    arrival: datetime


def user_records(kinesis_records: Iterable[dict[str, Any]]) -> list[UserRecord]:
    """Records as read back (tests.support.services.read_all), KPL aggregates unpacked."""
    import base64

    from aws_kinesis_agg.deaggregator import iter_deaggregate_records

    out: list[UserRecord] = []
    for r in kinesis_records:
        boto3_shape = {"SequenceNumber": r["sequence_number"], "PartitionKey": r["partition_key"],
                       "ApproximateArrivalTimestamp": r["arrival"], "Data": r["data"]}
        for user in iter_deaggregate_records(boto3_shape, data_format="Boto3"):
            data = user["kinesis"]["data"]
            out.append(UserRecord(base64.b64decode(data) if user["kinesis"].get("aggregated") else data, r["arrival"]))
    return out


def s3_objects(records: Sequence[UserRecord], delivery: Delivery) -> tuple[dict[str, list[bytes]], list[bytes]]:
    """(prefix -> the records of its object, each with its delimiter if any; records that failed)."""
    objects: dict[str, list[bytes]] = {}
    failed: list[bytes] = []
    for record in records:
        try:
            prefix = delivery.key_prefix(record)
        except ValueError:
            failed.append(record.data)
            continue
        objects.setdefault(prefix, []).append(record.data + (b"\n" if delivery.append_delimiter else b""))
    return objects, failed


# --- conversion and queries ---------------------------------------------------------------------

def read_json_lines(body: bytes, table: GlueTable) -> pa.Table:
    """pyarrow's JSON reader with the Glue schema; fields the table lacks are dropped.

    pyarrow cannot read a JSON object into a map column, so map columns are read as inferred
    structs and turned into maps (the pairs present in each object)."""
    schema = table.schema
    maps = {f.name for f in schema if pa.types.is_map(f.type)}
    explicit = pa.schema([f for f in schema if f.name not in maps])
    behaviour = "infer" if maps else "ignore"
    read = pa_json.read_json(io.BytesIO(body), parse_options=pa_json.ParseOptions(
        explicit_schema=explicit, unexpected_field_behavior=behaviour))
    columns = []
    for f in schema:
        if f.name not in maps:
            columns.append(read.column(f.name).cast(f.type))
        elif f.name in read.column_names:
            values = [None if v is None else [(k, x) for k, x in v.items() if x is not None]
                      for v in read.column(f.name).to_pylist()]
            columns.append(pa.array(values, type=f.type))
        else:
            columns.append(pa.nulls(read.num_rows, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def convert(records: Sequence[bytes], table: GlueTable) -> tuple[pa.Table, list[bytes]]:
    """One object's records to a table with the Glue schema, and the records that do not fit."""
    try:
        return read_json_lines(b"".join(records), table), []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    good: list[pa.Table] = []
    failed: list[bytes] = []
    for record in records:   # as Firehose does: each record converts, or goes to the error prefix
        try:
            good.append(read_json_lines(record, table))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            failed.append(record)
    return (pa.concat_tables(good) if good else table.schema.empty_table()), failed


def deliver(records: Sequence[UserRecord], stack: Stack, root: Path) -> list[bytes]:
    """Write the stack's S3 layout under ``root``: per object one .json (as delivered) and one
    .parquet (converted). Returns the records Firehose would have put under the error prefix."""
    table, delivery = GlueTable.of(stack), Delivery.of(stack)
    objects, failed = s3_objects(records, delivery)
    for number, (prefix, object_records) in enumerate(sorted(objects.items())):
        folder = root / prefix
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"object-{number}.json").write_bytes(b"".join(object_records))
        converted, bad = convert(object_records, table)
        failed += bad
        pq.write_table(converted, folder / f"object-{number}.parquet")
        assert pq.read_schema(folder / f"object-{number}.parquet").equals(table.schema, check_metadata=False)
    return failed


def athena(root: Path, stack: Stack, *, parquet: bool = True) -> duckdb.DuckDBPyConnection:
    """DuckDB with the Glue table as "database"."table" over what ``deliver`` wrote: the Parquet
    files, or (``parquet=False``) the JSON objects read line by line with the Glue column types."""
    table = GlueTable.of(stack)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    pattern = str(root / table.location / "**" / ("*.parquet" if parquet else "*.json"))
    hive_types = "{" + ", ".join(f"'{n}': '{duckdb_type(parse_type(t))}'" for n, t in table.partition_keys) + "}"
    if parquet:
        source = f"read_parquet('{pattern}', hive_partitioning = true, hive_types = {hive_types})"
    else:
        columns = "{" + ", ".join(f"'{n}': '{duckdb_type(parse_type(t))}'" for n, t in table.columns) + "}"
        source = (f"read_ndjson('{pattern}', columns = {columns}, hive_partitioning = true, "
                  f"hive_types = {hive_types})")
    con.execute(f'CREATE SCHEMA "{table.database}"')
    con.execute(f'CREATE VIEW "{table.database}"."{table.name}" AS SELECT * FROM {source}')
    return con


def rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    result = con.execute(sql)
    names = [d[0] for d in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def record_problems(record: Any, table: GlueTable, partition_field: str | None = None) -> list[str]:
    """Why a record's JSON would not land as written: a field that is not a column (Firehose
    drops it), a column the record lacks, a value that does not fit its column's type."""
    if not isinstance(record, dict):
        return [f"the record is {type(record).__name__}, not a JSON object"]
    expected = dict(table.columns)
    if partition_field is not None:
        expected[partition_field] = dict(table.partition_keys)[partition_field]
    problems = [f"field {name!r} is not a column of {table.name} (Firehose would drop it)"
                for name in record if name not in expected]
    problems += [f"column {name!r} is not in the record" for name in expected if name not in record]
    problems += [f"field {name!r} = {record[name]!r} does not fit column type {kind}"
                 for name, kind in expected.items() if name in record and not fits(record[name], parse_type(kind))]
    return problems


def column_parameters(columns: Sequence[str], slots: int = 20) -> dict[str, str]:
    """Stack parameters Column01..ColumnNN for a table of exactly ``columns`` ("name type" each)."""
    assert len(columns) <= slots
    return {f"Column{i:02d}": (columns[i - 1] if i <= len(columns) else "") for i in range(1, slots + 1)}


WELDER_COLUMNS = ("name string", "model string", "status string", *(f"sensor_{i} double" for i in range(1, 7)))
