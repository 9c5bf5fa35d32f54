"""The route file JSON Schema: well-formed, annotated for editors, shipped unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from gateway.routefile.schema import load_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "schema" / "routes.schema.json"
SHIPPED = ROOT / "gateway" / "routefile" / "routes.schema.json"


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def test_schema_is_valid_draft_2020_12() -> None:
    schema = _schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"]
    Draft202012Validator.check_schema(schema)


def test_shipped_schema_is_identical_to_the_repository_schema() -> None:
    assert SHIPPED.read_bytes() == SCHEMA.read_bytes()


def test_package_loads_the_shipped_schema() -> None:
    assert load_schema() == _schema()


def test_every_object_refuses_unknown_keys() -> None:
    objects = list(_objects(_schema()))
    assert len(objects) >= 4
    for node in objects:
        assert node.get("additionalProperties") is False, node.get("title")


def test_every_definition_has_a_title_and_description_for_editors() -> None:
    for name, definition in _schema()["$defs"].items():
        assert definition.get("title"), name
        assert definition.get("description"), name


def test_defaults_accept_every_route_key_except_name() -> None:
    defs = _schema()["$defs"]
    assert set(defs["route"]["properties"]) - set(defs["defaults"]["properties"]) == {"name"}


def test_schema_allows_only_qos_0_and_1() -> None:
    assert _schema()["$defs"]["qos"]["enum"] == [0, 1]


def test_examples_in_the_schema_validate_against_their_definitions() -> None:
    schema = _schema()
    for name, definition in schema["$defs"].items():
        for example in definition.get("examples", []):
            sub = {"$ref": f"#/$defs/{name}", "$defs": schema["$defs"]}
            assert not list(Draft202012Validator(sub).iter_errors(example)), (name, example)


def test_example_route_file_names_the_schema_for_editors_and_validates_with_plain_jsonschema() -> None:
    text = (ROOT / "routes.example.yaml").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# yaml-language-server: $schema=./schema/routes.schema.json"
    assert not list(Draft202012Validator(_schema()).iter_errors(yaml.safe_load(text)))
