"""Reading ``deploy/template.yaml`` as CloudFormation does, for its tests.

- ``load``: the YAML with its short tags (``!Ref``, ``!Sub``, ...) as the
  long forms, through cfn-lint's own decoder;
- ``expand``: ``AWS::LanguageExtensions``' ``Fn::ForEach`` (the only
  extension the template uses) over given parameter values;
- ``Stack``: conditions and intrinsic functions evaluated for given
  parameter values, pseudo parameters and physical names, so a test can
  compare what a deployment would get (an IAM policy, a queue's retention)
  with what it must be.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cfnlint.decode import cfn_yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "template.yaml"

ACCOUNT = "123456789012"
REGION = "eu-west-1"
STACK = "deltalog-test"
STACK_UUID = "4f1d0c8e-0a9b-11ef-9c3e-0a1b2c3d4e5f"
STACK_ID = f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/{STACK}/{STACK_UUID}"

_NO_VALUE = object()
_VARIABLE = re.compile(r"\$\{([^}!][^}]*)\}")


def load(path: Path = TEMPLATE) -> dict[str, Any]:
    """The template as plain dicts and lists, tags in their long form."""
    data: dict[str, Any] = json.loads(json.dumps(cfn_yaml.load(str(path))))
    return data


def defaults(template: Mapping[str, Any]) -> dict[str, Any]:
    """Each parameter's default, lists split as CloudFormation splits them."""
    values: dict[str, Any] = {}
    for name, spec in template["Parameters"].items():
        default = str(spec.get("Default", ""))
        values[name] = default.split(",") if spec["Type"] == "CommaDelimitedList" else default
    return values


def expand(template: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``Fn::ForEach`` loops replaced by their copies, one per item of the collection."""
    expanded = copy.deepcopy(dict(template))
    for section in ("Conditions", "Resources", "Outputs"):
        if section in expanded:
            expanded[section] = _expand_map(expanded[section], parameters)
    return expanded


def _expand_map(node: dict[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if not key.startswith("Fn::ForEach::"):
            out[key] = value
            continue
        identifier, collection, fragment = value
        items = parameters[collection["Ref"]] if isinstance(collection, dict) else collection
        for item in items:
            out.update(_expand_map(_substitute(fragment, identifier, item), parameters))
    return out


def _substitute(node: Any, identifier: str, item: str) -> Any:
    if isinstance(node, str):
        alnum = re.sub(r"[^A-Za-z0-9]", "", item)
        return node.replace(f"${{{identifier}}}", item).replace(f"&{{{identifier}}}", alnum)
    if isinstance(node, list):
        return [_substitute(n, identifier, item) for n in node]
    if isinstance(node, dict):
        if node == {"Ref": identifier}:
            return item
        done = {
            _substitute(k, identifier, item): _substitute(v, identifier, item)
            for k, v in node.items()
        }
        text = done.get("Fn::Sub")
        if len(done) == 1 and isinstance(text, str) and "${" not in text:
            return text  # as the transform leaves it: nothing left to substitute
        return done
    return node


class Stack:
    """The template deployed with ``parameters``: conditions and intrinsics evaluated.

    ``names`` gives resources their physical names (what ``Ref`` returns);
    a resource not named is referred to by its logical id.
    """

    def __init__(
        self,
        template: Mapping[str, Any],
        parameters: Mapping[str, Any] | None = None,
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        values = {**defaults(template), **(parameters or {})}
        self.parameters = values
        self.template = expand(template, values)
        self.names = dict(names or {})
        self.pseudo = {
            "AWS::AccountId": ACCOUNT,
            "AWS::Region": REGION,
            "AWS::Partition": "aws",
            "AWS::StackName": STACK,
            "AWS::StackId": STACK_ID,
            "AWS::URLSuffix": "amazonaws.com",
        }
        self._conditions: dict[str, bool] = {}
        resources = self.template["Resources"]
        functions = [k for k, r in resources.items() if r["Type"] == "AWS::Serverless::Function"]
        self._generated = {f"{f}{suffix}" for f in functions for suffix in ("Role", "Url")}
        """What the SAM transform adds for a function: its role, its URL."""

    # -- what a test asks -----------------------------------------------------------

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            self._conditions[name] = bool(self.resolve(self.template["Conditions"][name]))
        return self._conditions[name]

    def resources(self, kind: str | None = None) -> dict[str, dict[str, Any]]:
        """The resources created (their condition holds), properties resolved."""
        found = {}
        for logical, resource in self.template["Resources"].items():
            if kind is not None and resource["Type"] != kind:
                continue
            if "Condition" in resource and not self.condition(resource["Condition"]):
                continue
            properties = self.resolve(resource.get("Properties", {}))
            found[logical] = {**resource, "Properties": properties}
        return found

    def resource(self, logical: str) -> dict[str, Any]:
        return self.resources()[logical]

    # -- intrinsic functions --------------------------------------------------------

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in (self.resolve(n) for n in node) if v is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((name, argument),) = node.items()
            function = getattr(self, "_" + name.replace("Fn::", "fn_").replace("::", "_"), None)
            if name == "Ref" or name == "Condition" or name.startswith("Fn::"):
                assert function is not None, f"no evaluator for {name}"
                return function(argument)
        resolved = {k: self.resolve(v) for k, v in node.items()}
        return {k: v for k, v in resolved.items() if v is not _NO_VALUE}

    def _Ref(self, name: Any) -> Any:
        if isinstance(name, dict):  # AWS::LanguageExtensions allows a function here
            name = self.resolve(name)
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        assert name in self.template["Resources"] or name in self._generated, f"Ref to {name}"
        return self.names.get(name, name)

    def _Condition(self, name: str) -> bool:
        return self.condition(name)

    def _fn_GetAtt(self, argument: Any) -> str:
        logical, attribute = argument.split(".", 1) if isinstance(argument, str) else argument
        logical = self.resolve(logical)
        assert logical in self.template["Resources"], f"GetAtt of an unknown resource {logical}"
        kind = self.template["Resources"][logical]["Type"]
        name = self.names.get(logical, logical)
        arns = {
            "AWS::DynamoDB::Table": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}",
            "AWS::SQS::Queue": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}",
            "AWS::Serverless::Function": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}",
            "AWS::Events::Rule": f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{name}",
            "AWS::Logs::LogGroup": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}:*",
            "AWS::IAM::Role": f"arn:aws:iam::{ACCOUNT}:role/{name}",
        }
        if attribute == "Arn" and kind in arns:
            return arns[kind]
        if attribute == "QueueName":
            return str(name)
        return f"{name}.{attribute}"

    def _fn_Sub(self, argument: Any) -> str:
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        values = {k: self.resolve(v) for k, v in variables.items()}

        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in values:
                return str(values[name])
            if "." in name and name.split(".")[0] in self.template["Resources"]:
                return self._fn_GetAtt(name)
            return str(self._Ref(name))

        return _VARIABLE.sub(value, text).replace("${!", "${")

    def _fn_Join(self, argument: Any) -> str:
        delimiter, items = argument
        return str(delimiter).join(str(i) for i in self.resolve(items))

    def _fn_Select(self, argument: Any) -> Any:
        index, items = argument
        return self.resolve(items)[int(self.resolve(index))]

    def _fn_Split(self, argument: Any) -> list[str]:
        delimiter, text = argument
        return str(self.resolve(text)).split(delimiter)

    def _fn_If(self, argument: Any) -> Any:
        name, yes, no = argument
        return self.resolve(yes if self.condition(name) else no)

    def _fn_FindInMap(self, argument: Any) -> Any:
        name, top, second = (self.resolve(a) for a in argument)
        return self.template["Mappings"][name][str(top)][second]

    def _fn_Equals(self, argument: Any) -> bool:
        a, b = (self.resolve(x) for x in argument)
        return str(a) == str(b)

    def _fn_Not(self, argument: Any) -> bool:
        return not self.resolve(argument[0])

    def _fn_And(self, argument: Any) -> bool:
        return all(self.resolve(a) for a in argument)

    def _fn_Or(self, argument: Any) -> bool:
        return any(self.resolve(a) for a in argument)


# -- the SAM transform and cfn-lint, offline ---------------------------------------


IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/deltalog:latest"


def translate(template: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """What CloudFormation deploys: ``Fn::ForEach`` expanded, then the SAM transform.

    ``sam build`` fills in each image function's ``ImageUri``; a fixed one
    stands in for it here.
    """
    import boto3
    from samtranslator.parser.parser import Parser
    from samtranslator.translator.translator import Translator

    values = {**defaults(template), **parameters}
    expanded = expand(template, values)
    expanded["Transform"] = "AWS::Serverless-2016-10-31"
    for resource in expanded["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["ImageUri"] = IMAGE
    flat = {k: ",".join(v) if isinstance(v, list) else v for k, v in values.items()}
    # The template names no managed policy: no IAM lookup is needed.
    translator = Translator({}, Parser(), boto_session=boto3.session.Session(region_name=REGION))
    translated: dict[str, Any] = translator.translate(expanded, parameter_values=flat)
    translator.metrics.publish()  # to its no-op publisher (else it complains on exit)
    return translated


def lint(path: Path, *, serverless: bool) -> list[str]:
    """cfn-lint's findings on a template (informational ones included), as text."""
    from cfnlint.config import ConfigMixIn
    from cfnlint.runner import Runner

    args = ["--include-checks", "I", "--regions", REGION]
    if serverless:
        args += ["--append-rules", "cfn_lint_serverless.rules"]
    matches = Runner(ConfigMixIn([*args, "--", str(path)])).run()
    return [f"{m.rule.id} {m.message} ({m.filename}:{m.linenumber})" for m in matches]
