"""The CloudFormation stack of docs/athena.md: lint-clean, and in agreement with its route file.

CloudFormation, Firehose and Glue do not run in CI, so the template is checked the next best
way: cfn-lint (the linter AWS publishes, with its resource schemas), and the template resolved
for a set of parameters (tests.support.cfn) compared with what the gateway itself produces for
the example messages, through ``explain``. A column renamed or retyped on either side fails
here, instead of disappearing silently in Firehose's Parquet conversion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import lint_file
from cfnlint.config import ManualArgs

from gateway.cli import main
from gateway.routefile.loader import load_routes
from tests.support.athena_shape import WELDER_COLUMNS, Delivery, GlueTable, column_parameters, record_problems
from tests.support.cfn import ROOT, Stack, load_template

AWS = ROOT / "deploy" / "aws"
ROUTES = AWS / "example" / "routes.yaml"
PAYLOAD = AWS / "example" / "payload.json"
TOPIC = "factory/line1/welder/w7"
# (label, explain options): the sample messages, with and without MQTT 5 metadata
MESSAGES: list[tuple[str, list[str]]] = [
    ("pretty-printed payload, MQTT 3.1.1", ["--payload-file", str(PAYLOAD), "--qos", "0"]),
    ("MQTT 5 with user properties and content type",
     ["--payload-file", str(PAYLOAD), "--user-property", "site=plant-7", "--user-property", "line=1",
      "--content-type", "application/json"]),
    ("retained, whole-number readings", ["--retain", "--payload", json.dumps(
        {"name": "w7", "model": "welder", "status": "idle", "sensor_1": 24, "sensor_2": 98, "sensor_3": 16,
         "sensor_4": 1, "sensor_5": 5, "sensor_6": 100})]),
]


METADATA_COLUMNS = ("route string", "topic string", "received_at bigint", "qos int", "retained boolean",
                    "content_type string", "user_properties map<string,string>")
ENVELOPE = ("{route: 'welders', topic: topic(), received_at: timestamp(), qos: qos(), retained: retained(), "
            "content_type: content_type(), user_properties: user_properties(), payload: @}")
RECIPES = {  # docs/athena.md's other shapes: (transform, the columns the guide gives for it)
    "payload-as-is": (None, WELDER_COLUMNS),
    "envelope": (ENVELOPE, (*METADATA_COLUMNS, "payload struct<" + ",".join(
        c.replace(" ", ":") for c in WELDER_COLUMNS) + ">")),
}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def explain_records(capsys: pytest.CaptureFixture[str], routes: Path, options: list[str]) -> list[dict[str, Any]]:
    """The record data ``mqtt-kinesis-gateway explain`` prints, parsed."""
    code = main(["explain", str(routes), "--topic", TOPIC, *options])
    out = capsys.readouterr().out
    assert code == 0, out
    return [json.loads(json.loads(line)["data"]) for line in out.splitlines()]


def problems_of(capsys: pytest.CaptureFixture[str], routes: Path, stack: Stack) -> list[str]:
    table, delivery = GlueTable.of(stack), Delivery.of(stack)
    found: list[str] = []
    for label, options in MESSAGES:
        for record in explain_records(capsys, routes, options):
            found += [f"{label}: {p}" for p in record_problems(record, table, delivery.partition_field)]
    return found


# --- cfn-lint --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(AWS.glob("*.yaml")), ids=lambda p: p.name)
def test_cfn_lint_finds_nothing_not_even_informational(path: Path) -> None:
    matches = lint_file(path, ManualArgs(include_checks=["I"], regions=["us-east-1", "eu-west-1", "ap-southeast-2"]))
    assert [str(m) for m in matches] == []


def test_the_deploy_folder_holds_templates_only_so_cfn_lint_can_glob_it() -> None:
    for path in AWS.glob("*.yaml"):
        assert "AWSTemplateFormatVersion" in path.read_text(encoding="utf-8"), path


# --- the route file and the Glue table agree ------------------------------------------------------

@pytest.mark.parametrize("parameters", [{}, {"DynamicPartitioning": "Enabled"}, {"RecordFormat": "JSON"}],
                         ids=["defaults", "dynamic-partitioning", "json"])
def test_example_routes_write_exactly_the_glue_columns_and_types(
        capsys: pytest.CaptureFixture[str], template: dict[str, Any], parameters: dict[str, str]) -> None:
    assert problems_of(capsys, ROUTES, Stack(template, parameters)) == []


def test_a_column_renamed_in_the_template_fails_the_agreement(
        capsys: pytest.CaptureFixture[str], template: dict[str, Any]) -> None:
    renamed = Stack(template, {"Column08": "device string"})   # was "name string"
    assert problems_of(capsys, ROUTES, renamed)[:2] == [
        "pretty-printed payload, MQTT 3.1.1: field 'name' is not a column of readings (Firehose would drop it)",
        "pretty-printed payload, MQTT 3.1.1: column 'device' is not in the record",
    ]


def test_a_field_renamed_in_the_route_file_fails_the_agreement(
        capsys: pytest.CaptureFixture[str], template: dict[str, Any], tmp_path: Path) -> None:
    text = ROUTES.read_text(encoding="utf-8")
    assert "sensor_1: sensor_1" in text
    routes = tmp_path / "routes.yaml"
    routes.write_text(text.replace("sensor_1: sensor_1", "temperature: sensor_1"), encoding="utf-8")
    problems = problems_of(capsys, routes, Stack(template))
    assert "pretty-printed payload, MQTT 3.1.1: field 'temperature' is not a column of readings " \
           "(Firehose would drop it)" in problems
    assert "pretty-printed payload, MQTT 3.1.1: column 'sensor_1' is not in the record" in problems


def test_a_column_whose_type_changes_fails_the_agreement(
        capsys: pytest.CaptureFixture[str], template: dict[str, Any]) -> None:
    problems = problems_of(capsys, ROUTES, Stack(template, {"Column04": "qos string"}))
    assert problems[0] == "pretty-printed payload, MQTT 3.1.1: field 'qos' = 0 does not fit column type string"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_guides_other_recipes_write_the_columns_it_gives_for_them(
        capsys: pytest.CaptureFixture[str], template: dict[str, Any], tmp_path: Path, recipe: str) -> None:
    transform, columns = RECIPES[recipe]
    guide = " ".join((ROOT / "docs" / "athena.md").read_text(encoding="utf-8").split())
    assert transform is None or transform in guide
    assert all(c in guide for c in columns if not c.startswith("sensor_"))
    routes = tmp_path / "routes.yaml"
    routes.write_text("version: 1\nroutes:\n  - name: welders\n    topic: 'factory/+/welder/#'\n    stream: s\n"
                      "    partition_key: name\n    append_newline: true\n"
                      + (f'    transform: "{transform}"\n' if transform else ""), encoding="utf-8")
    assert problems_of(capsys, routes, Stack(template, column_parameters(columns))) == []


def test_example_route_file_is_valid_and_targets_the_stacks_stream(template: dict[str, Any]) -> None:
    result = load_routes(str(ROUTES))
    assert result.table is not None, [f.format_text() for f in result.findings]
    assert {r.stream for r in result.table.routes} == {Stack(template).outputs["StreamArn"]}


# --- what the stack creates -------------------------------------------------------------------------

def test_stream_is_on_demand_and_encrypted_unless_told_otherwise(template: dict[str, Any]) -> None:
    stream = Stack(template).properties("Stream")
    assert stream["StreamModeDetails"] == {"StreamMode": "ON_DEMAND"} and "ShardCount" not in stream
    assert stream["StreamEncryption"] == {"EncryptionType": "KMS", "KeyId": "alias/aws/kinesis"}
    provisioned = Stack(template, {"StreamMode": "PROVISIONED", "ShardCount": "4"}).properties("Stream")
    assert provisioned["ShardCount"] == "4"


def test_firehose_converts_to_parquet_against_the_glue_table(template: dict[str, Any]) -> None:
    stack = Stack(template, {"BufferIntervalSeconds": "60", "BufferSizeMB": "64"})
    firehose = stack.properties("DeliveryStream")
    assert firehose["DeliveryStreamType"] == "KinesisStreamAsSource"
    assert firehose["KinesisStreamSourceConfiguration"]["KinesisStreamARN"] == stack.outputs["StreamArn"]
    s3 = firehose["ExtendedS3DestinationConfiguration"]
    conversion = s3["DataFormatConversionConfiguration"]
    assert conversion["InputFormatConfiguration"] == {"Deserializer": {"OpenXJsonSerDe": {}}}
    assert "ParquetSerDe" in conversion["OutputFormatConfiguration"]["Serializer"]
    table = stack.properties("Table")
    assert (conversion["SchemaConfiguration"]["DatabaseName"], conversion["SchemaConfiguration"]["TableName"]) == \
        (table["DatabaseName"], table["TableInput"]["Name"])
    assert s3["BufferingHints"] == {"IntervalInSeconds": "60", "SizeInMBs": "64"}
    assert s3["CompressionFormat"] == "UNCOMPRESSED"   # required with conversion: Parquet compresses itself
    assert s3["ErrorOutputPrefix"].startswith("errors/!{firehose:error-output-type}/")
    assert "ProcessingConfiguration" not in s3 and "DynamicPartitioningConfiguration" not in s3


def test_buffer_size_cannot_go_below_what_parquet_and_dynamic_partitioning_need(template: dict[str, Any]) -> None:
    assert int(template["Parameters"]["BufferSizeMB"]["MinValue"]) >= 64


@pytest.mark.parametrize(("record_format", "delimiter"), [("Parquet", False), ("JSON", True)])
def test_dynamic_partitioning_by_route_and_day(template: dict[str, Any], record_format: str, delimiter: bool) -> None:
    stack = Stack(template, {"DynamicPartitioning": "Enabled", "RecordFormat": record_format})
    delivery, table = Delivery.of(stack), GlueTable.of(stack)
    assert delivery.partition_field == "route" and delivery.append_delimiter is delimiter
    assert delivery.prefix == "data/route=!{partitionKeyFromQuery:route}/dt=!{timestamp:yyyy-MM-dd}/"
    assert [n for n, _ in table.partition_keys] == ["route", "dt"]
    assert "route" not in dict(table.columns)   # Athena refuses a name that is both
    engine = stack.properties("DeliveryStream")["ExtendedS3DestinationConfiguration"]["ProcessingConfiguration"]
    (extraction,) = [p for p in engine["Processors"] if p["Type"] == "MetadataExtraction"]
    assert {"ParameterName": "JsonParsingEngine", "ParameterValue": "JQ-1.6"} in extraction["Parameters"]


def test_json_output_without_dynamic_partitioning_relies_on_append_newline(template: dict[str, Any]) -> None:
    stack = Stack(template, {"RecordFormat": "JSON"})
    s3 = stack.properties("DeliveryStream")["ExtendedS3DestinationConfiguration"]
    assert not Delivery.of(stack).append_delimiter and "DataFormatConversionConfiguration" not in s3
    assert s3["CompressionFormat"] == "GZIP"
    serde = stack.properties("Table")["TableInput"]["StorageDescriptor"]["SerdeInfo"]
    assert serde["SerializationLibrary"] == "org.openx.data.jsonserde.JsonSerDe"
    routes = load_routes(str(ROUTES)).table
    assert routes is not None and all(r.append_newline for r in routes.routes)


@pytest.mark.parametrize("parameters", [{}, {"DynamicPartitioning": "Enabled"}], ids=["by-day", "by-route-and-day"])
def test_partition_projection_describes_the_prefixes_firehose_writes(
        template: dict[str, Any], parameters: dict[str, str]) -> None:
    stack = Stack(template, parameters)
    table = stack.properties("Table")["TableInput"]
    projection = table["Parameters"]
    assert projection["projection.enabled"] == "true"
    for key in table["PartitionKeys"]:
        assert f"projection.{key['Name']}.type" in projection
    assert projection["projection.dt.format"] == "yyyy-MM-dd"
    layout = Delivery.of(stack).prefix.replace("!{timestamp:yyyy-MM-dd}", "${dt}")
    layout = layout.replace("!{partitionKeyFromQuery:route}", "${route}")
    bucket = stack.resources["Bucket"]
    assert bucket["Type"] == "AWS::S3::Bucket"
    assert projection["storage.location.template"] == f"s3://{stack.resolve({'Ref': 'Bucket'})}/{layout}"


def test_bucket_blocks_public_access_encrypts_and_expires(template: dict[str, Any]) -> None:
    bucket = Stack(template, {"RetentionDays": "30"}).properties("Bucket")
    assert set(bucket["PublicAccessBlockConfiguration"].values()) == {True}
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    expiry = {r["Prefix"]: r["ExpirationInDays"] for r in bucket["LifecycleConfiguration"]["Rules"] if "Prefix" in r}
    assert expiry == {"data/": "30", "errors/": "30", "athena-results/": 7}
    kept = Stack(template, {"RetentionDays": "0"}).properties("Bucket")
    assert [r["Prefix"] for r in kept["LifecycleConfiguration"]["Rules"] if "Prefix" in r] == ["athena-results/"]


def _statements(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in document["Statement"]}


def _actions(statement: dict[str, Any]) -> set[str]:
    action = statement["Action"]
    return {action} if isinstance(action, str) else set(action)


def test_firehose_role_reaches_only_this_stacks_stream_bucket_table_and_logs(template: dict[str, Any]) -> None:
    stack = Stack(template)
    (policy,) = stack.properties("FirehoseRole")["Policies"]
    statements = _statements(policy["PolicyDocument"])
    assert {sid: _actions(s) for sid, s in statements.items()} == {
        "ReadTheStream": {"kinesis:DescribeStream", "kinesis:GetShardIterator", "kinesis:GetRecords",
                          "kinesis:ListShards"},
        "ListTheBucket": {"s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"},
        "WriteDataAndErrors": {"s3:AbortMultipartUpload", "s3:GetObject", "s3:PutObject"},
        "ReadTheTableSchema": {"glue:GetTable", "glue:GetTableVersion", "glue:GetTableVersions"},
        "LogDeliveryErrors": {"logs:PutLogEvents"},
    }
    bucket = stack.resolve({"Fn::GetAtt": ["Bucket", "Arn"]})
    own = (stack.outputs["StreamArn"], bucket, "arn:aws:glue:eu-west-1:123456789012:",
           stack.resolve({"Fn::GetAtt": ["DeliveryLogGroup", "Arn"]}))
    for statement in statements.values():
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        assert all(r.startswith(own) for r in resources), statement
    trust = stack.properties("FirehoseRole")["AssumeRolePolicyDocument"]["Statement"][0]
    assert trust["Condition"]["StringEquals"]["sts:ExternalId"] == "123456789012"
    custom = Stack(template, {"StreamKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/1"})
    (policy,) = custom.properties("FirehoseRole")["Policies"]
    assert _statements(policy["PolicyDocument"])["DecryptTheStream"]["Resource"] == \
        "arn:aws:kms:eu-west-1:123456789012:key/1"


def test_gateway_policy_only_writes_the_stream(template: dict[str, Any]) -> None:
    stack = Stack(template)
    statements = _statements(stack.properties("GatewayPolicy")["PolicyDocument"])
    assert list(statements) == ["WriteTheStream"]
    assert _actions(statements["WriteTheStream"]) == {"kinesis:PutRecords", "kinesis:PutRecord"}
    assert statements["WriteTheStream"]["Resource"] == stack.outputs["StreamArn"]
    aggregating = Stack(template, {"GatewayAggregation": "true"})
    statements = _statements(aggregating.properties("GatewayPolicy")["PolicyDocument"])
    assert _actions(statements["ShardMapForAggregatedRoutes"]) == {"kinesis:ListShards"}
    assert "GatewayRole" not in stack.resources and "GatewayRoleArn" not in stack.outputs


def test_irsa_role_trusts_only_the_gateways_service_account(template: dict[str, Any]) -> None:
    provider = "arn:aws:iam::123456789012:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE"
    stack = Stack(template, {"OidcProviderArn": provider, "GatewayNamespace": "iot"})
    role = stack.properties("GatewayRole")
    (trust,) = json.loads(role["AssumeRolePolicyDocument"])["Statement"]
    assert trust["Principal"] == {"Federated": provider}
    assert trust["Condition"]["StringEquals"] == {
        "oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE:sub": "system:serviceaccount:iot:mqtt-kinesis-gateway",
        "oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE:aud": "sts.amazonaws.com"}
    assert role["ManagedPolicyArns"] == [stack.outputs["GatewayPolicyArn"]]
    assert "GatewayRoleArn" in stack.outputs


def test_athena_workgroup_keeps_results_in_the_stacks_bucket(template: dict[str, Any]) -> None:
    stack = Stack(template)
    config = stack.properties("WorkGroup")["WorkGroupConfiguration"]
    bucket = stack.resolve({"Ref": "Bucket"})
    assert config["ResultConfiguration"]["OutputLocation"] == f"s3://{bucket}/athena-results/"
    assert config["EnforceWorkGroupConfiguration"] is True
    assert stack.outputs["Query"] == stack.properties("LatestRowsQuery")["QueryString"]
    assert stack.outputs["Query"].startswith('SELECT * FROM "mqtt_telemetry"."readings" WHERE dt = ')
