"""The CloudFormation template as the tests read it: decoded by cfn-lint, resolved for parameters.

Why resolve it here: the Glue columns, the Firehose processors and the S3 prefixes the tests
check are written with Fn::If / Fn::Select / Fn::Sub over parameters, so the test must see what
CloudFormation would create for a given set of parameter values, not the template's text. Only
the intrinsic functions the template uses are resolved; anything else fails loudly, so a new
function in the template cannot slip past the tests unresolved. Physical names and ARNs of the
stack's own resources are made up the way CloudFormation forms them (Ref of a named resource is
its name; GetAtt Arn is the service's ARN format) in a fixed account and region.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfnlint.decode import decode_str

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "aws" / "mqtt-to-athena.yaml"
ACCOUNT, REGION, STACK = "123456789012", "eu-west-1", "mqtt-athena"
PSEUDO = {"AWS::AccountId": ACCOUNT, "AWS::Region": REGION, "AWS::Partition": "aws", "AWS::StackName": STACK,
          "AWS::URLSuffix": "amazonaws.com"}
_NO_VALUE: Any = object()
_NAME_PROPERTY = {  # what Ref returns for these types: the resource's own name
    "AWS::Kinesis::Stream": ("Name",), "AWS::Glue::Database": ("DatabaseInput", "Name"),
    "AWS::Glue::Table": ("TableInput", "Name"), "AWS::Logs::LogGroup": ("LogGroupName",),
    "AWS::Logs::LogStream": ("LogStreamName",), "AWS::Athena::WorkGroup": ("Name",),
    "AWS::KinesisFirehose::DeliveryStream": ("DeliveryStreamName",),
}
_SUB = re.compile(r"\$\{(!?)([^}]+)\}")


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    """The template as CloudFormation reads it (short-form tags expanded), or AssertionError."""
    template, problems = decode_str(path.read_text(encoding="utf-8"))
    assert not problems and template is not None, [str(p) for p in problems]
    return template


@dataclass
class Stack:
    """The template resolved for ``parameters`` (defaults for the rest): what the stack creates."""

    template: Mapping[str, Any]
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        declared = self.template["Parameters"]
        unknown = set(self.parameters) - set(declared)
        assert not unknown, f"not parameters of the template: {sorted(unknown)}"
        self.values = {name: str(self.parameters.get(name, spec.get("Default", ""))) for name, spec in declared.items()}
        self._conditions: dict[str, bool] = {}

    # --- what the tests look at --------------------------------------------------------------

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            self._conditions[name] = bool(self.resolve(self.template["Conditions"][name]))
        return self._conditions[name]

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        return {name: {"Type": spec["Type"], "Properties": self.resolve(spec.get("Properties", {}))}
                for name, spec in self.template["Resources"].items()
                if "Condition" not in spec or self.condition(spec["Condition"])}

    def properties(self, logical_id: str) -> dict[str, Any]:
        return self.resources[logical_id]["Properties"]

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: self.resolve(spec["Value"]) for name, spec in self.template["Outputs"].items()
                if "Condition" not in spec or self.condition(spec["Condition"])}

    # --- intrinsic functions -----------------------------------------------------------------

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(v) for v in value]
            return [v for v in items if v is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, argument), = value.items()
            if key == "Ref" or key.startswith("Fn::") or (key == "Condition" and isinstance(argument, str)):
                return self._function(key, argument)
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not _NO_VALUE}

    def _function(self, name: str, arg: Any) -> Any:
        if name == "Ref":
            return self._ref(arg)
        if name == "Condition":
            return self.condition(arg)
        if name == "Fn::If":
            condition, if_true, if_false = arg
            return self.resolve(if_true if self.condition(condition) else if_false)
        if name == "Fn::Equals":
            left, right = (self.resolve(a) for a in arg)
            return str(left) == str(right)
        if name == "Fn::Not":
            return not self.resolve(arg[0])
        if name == "Fn::And":
            return all(self.resolve(a) for a in arg)
        if name == "Fn::Or":
            return any(self.resolve(a) for a in arg)
        if name == "Fn::Select":
            index, items = self.resolve(arg[0]), self.resolve(arg[1])
            return items[int(index)]
        if name == "Fn::Split":
            return str(self.resolve(arg[1])).split(arg[0])
        if name == "Fn::Join":
            return arg[0].join(str(v) for v in self.resolve(arg[1]))
        if name == "Fn::Sub":
            text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))
            return _SUB.sub(lambda m: "${" + m.group(2) + "}" if m.group(1) else str(
                variables[m.group(2)] if m.group(2) in variables else self._sub_name(m.group(2))), text)
        if name == "Fn::GetAtt":
            logical, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
            return self._get_att(logical, attribute)
        raise AssertionError(f"the tests do not resolve {name}; teach tests/support/cfn.py")

    def _sub_name(self, name: str) -> Any:
        if "." in name:
            logical, attribute = name.split(".", 1)
            return self._get_att(logical, attribute)
        return self._ref(name)

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.values:
            return self.values[name]
        spec = self.template["Resources"][name]
        path = _NAME_PROPERTY.get(spec["Type"])
        if path is None:
            if spec["Type"] == "AWS::S3::Bucket":
                return f"{STACK}-{name.lower()}-1a2b3c4d5e6f"
            if spec["Type"] == "AWS::IAM::ManagedPolicy":
                return f"arn:aws:iam::{ACCOUNT}:policy/{STACK}-{name}-1A2B3C4D5E6F"
            return f"{STACK}-{name}-1A2B3C4D5E6F"
        node: Any = spec["Properties"]
        for key in path:
            node = node[key]
        return self.resolve(node)

    def _get_att(self, logical: str, attribute: str) -> str:
        kind = self.template["Resources"][logical]["Type"]
        assert attribute == "Arn", f"GetAtt {logical}.{attribute} is not resolved by the tests"
        name = self._ref(logical)
        arns = {
            "AWS::Kinesis::Stream": f"arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{name}",
            "AWS::S3::Bucket": f"arn:aws:s3:::{name}",
            "AWS::IAM::Role": f"arn:aws:iam::{ACCOUNT}:role/{STACK}-{logical}-1A2B3C4D5E6F",
            "AWS::Logs::LogGroup": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}:*",
        }
        assert kind in arns, f"GetAtt Arn of {kind} is not resolved by the tests"
        return arns[kind]
