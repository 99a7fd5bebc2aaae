"""``deploy/template.yaml``: it lints clean, translates, and grants what ``deltalog policy`` says.

cfn-lint (with the cfn-lint-serverless rules) runs on the SAM template as
written; the SAM transform (aws-sam-translator, offline) runs on it with
``Fn::ForEach`` expanded, and cfn-lint runs again on what it produces. The
other tests evaluate the template for several parameter sets
(``tests/deploy/cfn.py``) and compare what a deployment would get with what
it must get: IAM equal to ``deltalog policy``, a dead-letter queue reachable
within the queue's retention, alarms on the metrics the handlers emit.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from compactor.checkpoint import DEFAULT_RATIO
from compactor.metrics import FIGURES, LAG
from deltalog.errors import ConfigurationError
from deltalog.storage.policy import render
from deltalog_lambda.metrics import INGEST_FAILURES, INGEST_FIGURES
from deltalog_lambda.settings import Settings
from tests.deploy.cfn import (
    ACCOUNT,
    REGION,
    STACK,
    STACK_UUID,
    TEMPLATE,
    Stack,
    defaults,
    lint,
    load,
    translate,
)

KMS = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
TABLE = "deltalog-test-Table-1A2B3C4D5E6F"

DEFAULTS: dict[str, Any] = {}
EVERYTHING: dict[str, Any] = {
    "LogNames": ["receipts", "labels.v2", "r-3"],
    "BucketName": "my-deltalog-bucket",
    "KmsKeyArn": KMS,
    "OpenAIKeySecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:openai-AbCdEf",
    "SigningKeySecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:signing-AbCdEf",
    "DeployQueryFunction": "true",
    "CompactOnEntryNotifications": "true",
    "AlarmTopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:alarms",
    "TableDeletionProtection": "false",
    "CheckpointRatio": "0.5",
}
SSM_KEY: dict[str, Any] = {
    "OpenAIKeyParameterName": "/deltalog/openai",
    "DeployQueryFunction": "true",
}
PARAMETER_SETS = pytest.mark.parametrize(
    "parameters", [DEFAULTS, EVERYTHING, SSM_KEY], ids=["defaults", "everything", "ssm-key"]
)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load()


def deployed(template: dict[str, Any], parameters: dict[str, Any]) -> Stack:
    """The stack with ``parameters``; the bucket and the table get their physical names."""
    bucket = Stack(template, parameters).resolve(
        template["Resources"]["Bucket"]["Properties"]["BucketName"]
    )
    return Stack(template, parameters, names={"Bucket": bucket, "Table": TABLE})


def alnum(log: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", log)


# -- validation ------------------------------------------------------------------------


def test_the_template_passes_cfn_lint_and_the_serverless_rules() -> None:
    assert lint(TEMPLATE, serverless=True) == []


def test_cfn_lint_finds_what_is_wrong(tmp_path: Path) -> None:
    """The lint test can fail: a reference to a resource that does not exist is an error."""
    broken = tmp_path / "template.yaml"
    text = TEMPLATE.read_text().replace("!GetAtt IngestDeadLetterQueue.Arn", "!GetAtt Nowhere.Arn")
    broken.write_text(text)
    assert any(finding.startswith("E") for finding in lint(broken, serverless=True))


@PARAMETER_SETS
def test_the_sam_transform_applies_and_its_output_lints_clean(
    template: dict[str, Any], parameters: dict[str, Any], tmp_path: Path
) -> None:
    translated = translate(template, parameters)
    resources = translated["Resources"]
    for logical, handler in (
        ("IngestFunction", "deltalog_lambda.ingest.handler"),
        ("CompactorFunction", "deltalog_lambda.compact.handler"),
    ):
        function = resources[logical]
        assert function["Type"] == "AWS::Lambda::Function"
        assert function["Properties"]["PackageType"] == "Image"
        assert function["Properties"]["ImageConfig"]["Command"] == [handler]
        module, name = handler.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name))
    assert resources["QueryFunctionUrl"]["Condition"] == "DeployQuery"
    assert resources["QueryFunctionUrl"]["Properties"]["AuthType"] == "AWS_IAM"
    out = tmp_path / "translated.json"
    out.write_text(json.dumps(translated))
    # The serverless rules are for SAM templates: on the output they would ask SQS
    # event source mappings for an on-failure destination, which SQS does not support.
    assert lint(out, serverless=False) == []


# -- IAM ---------------------------------------------------------------------------------

ROLES = {"producer": "Ingest", "compactor": "Compactor", "reader": "Query"}


@PARAMETER_SETS
def test_each_log_gets_exactly_the_statements_of_deltalog_policy(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    """A managed policy per log and role (not inline: 10,240 characters per role capped a
    stack at 4 logs), attached to the function's role, equal to ``deltalog policy``."""
    stack = deployed(template, parameters)
    bucket = stack.names["Bucket"]
    kms = parameters.get("KmsKeyArn") or None
    policies = stack.resources("AWS::IAM::ManagedPolicy")
    query = parameters.get("DeployQueryFunction") == "true"
    expected_count = len(stack.parameters["LogNames"]) * (3 if query else 2)
    assert len(policies) == expected_count
    assert not stack.resources("AWS::IAM::RolePolicy")
    for log in stack.parameters["LogNames"]:
        for role, function in ROLES.items():
            logical = f"{function}Policy{alnum(log)}"
            if role == "reader" and not query:
                assert logical not in policies
                continue
            policy = policies[logical]["Properties"]
            assert policy["Roles"] == [f"{function}FunctionRole"]
            assert policy["Description"] == f"deltalog policy --role {role} --log {log}"
            want = render(
                role, bucket=bucket, table=TABLE, log=log, account=ACCOUNT, region=REGION,
                kms_key_arn=kms,
            )  # fmt: skip
            assert policy["PolicyDocument"] == want, (role, log)


@PARAMETER_SETS
def test_the_bucket_policy_is_deltalog_policy_role_bucket(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    (policy,) = stack.resources("AWS::S3::BucketPolicy").values()
    want = render(
        "bucket", bucket=stack.names["Bucket"], table=TABLE, kms_key_arn=parameters.get("KmsKeyArn")
    )
    assert policy["Properties"]["PolicyDocument"] == want
    assert policy["Properties"]["Bucket"] == stack.names["Bucket"]


# What AWS's managed policies for Lambda grant (their documents as published): a role
# with one of them attached holds these statements.
AWS_MANAGED: dict[str, list[dict[str, Any]]] = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole": [
        {
            "Effect": "Allow",
            "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": "*",
        }
    ],
    "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole": [
        {
            "Effect": "Allow",
            "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"],
            "Resource": "*",
        }
    ],
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess": [
        {
            "Effect": "Allow",
            "Action": ["xray:PutTraceSegments", "xray:PutTelemetryRecords"],
            "Resource": ["*"],
        }
    ],
}


def role_statements(translated: dict[str, Any], parameters: dict[str, Any]) -> dict[str, list[Any]]:
    """Every statement each role of the deployment holds, from the translated template:
    its inline policies, the policy resources naming it, and every managed policy attached
    (the template's own, and AWS's, whose documents are above; an unknown one fails)."""
    stack = Stack(translated, parameters)
    roles = stack.resources("AWS::IAM::Role")
    found: dict[str, list[Any]] = {name: [] for name in roles}
    for name, role in roles.items():
        for policy in role["Properties"].get("Policies", []):
            found[name] += policy["PolicyDocument"]["Statement"]
        for arn in role["Properties"].get("ManagedPolicyArns", []):
            assert arn in AWS_MANAGED, f"{name}: a managed policy this test cannot read: {arn}"
            found[name] += AWS_MANAGED[arn]
    for kind in ("AWS::IAM::Policy", "AWS::IAM::RolePolicy", "AWS::IAM::ManagedPolicy"):
        for resource in stack.resources(kind).values():
            props = resource["Properties"]
            for role in props.get("Roles", []) + (
                [props["RoleName"]] if "RoleName" in props else []
            ):
                found[role] += props["PolicyDocument"]["Statement"]
    return found


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


@PARAMETER_SETS
def test_no_role_holds_a_wildcard_action_or_resource_managed_policies_included(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    """Read from the translated template, every role's statements (managed policies too, such
    as the ``AWSLambdaSQSQueueExecutionRole`` SAM attaches to a role it makes for an SQS event
    source: sqs:* actions on ``*``) name their actions and scope their resources."""
    translated = translate(template, parameters)
    statements = role_statements(translated, parameters)
    query = parameters.get("DeployQueryFunction") == "true"
    expected = {f"{f}FunctionRole" for f in ("Ingest", "Compactor")} | (
        {"QueryFunctionRole"} if query else set()
    )
    assert set(statements) == expected
    for role, held in statements.items():
        assert held, role
        for statement in held:
            for action in _listed(statement["Action"]):
                assert action != "*" and not action.endswith(":*"), (role, statement)
            for resource in _listed(statement["Resource"]):
                assert resource != "*" and not resource.endswith(":*:*"), (role, statement)
    functions = [
        r for r in translated["Resources"].values() if r["Type"] == "AWS::Lambda::Function"
    ]
    assert all("TracingConfig" not in f["Properties"] for f in functions), "nothing is traced"


def _policy_size(document: dict[str, Any]) -> int:
    """Characters of a policy document as IAM counts them (no whitespace)."""
    return len(json.dumps(document, separators=(",", ":")))


MAX_LOGS = 10
"""Logs per stack: one managed policy per log on each role, and IAM attaches at most 10
managed policies to a role by default (20 on request) (README)."""
MAX_LOG_NAME = 50
"""Characters of a log name: its schedule's name is ``dl-<8>-c-<log>``, at most 64."""


def test_policies_fit_iam_for_the_documented_number_of_logs(template: dict[str, Any]) -> None:
    logs = [f"{i:02d}".ljust(MAX_LOG_NAME, "x") for i in range(MAX_LOGS)]
    most = {**EVERYTHING, "BucketName": "a" * 63, "LogNames": logs}
    translated = translate(template, most)
    stack = Stack(translated, most, names={"Bucket": most["BucketName"], "Table": TABLE})
    for name, role in stack.resources("AWS::IAM::Role").items():
        inline = sum(_policy_size(p["PolicyDocument"]) for p in role["Properties"]["Policies"])
        assert inline <= 10_240, name
        attached = [
            p
            for p in stack.resources("AWS::IAM::ManagedPolicy").values()
            if name in p["Properties"]["Roles"]
        ]
        assert len(attached) == MAX_LOGS <= 10, name
        assert max(_policy_size(p["Properties"]["PolicyDocument"]) for p in attached) <= 6_144
    for rule in stack.resources("AWS::Events::Rule").values():
        assert len(rule["Properties"]["Name"]) <= 64


# -- queues, triggers, concurrency --------------------------------------------------------


def _redrive(queue: dict[str, Any]) -> dict[str, Any]:
    redrive: dict[str, Any] = json.loads(queue["Properties"]["RedrivePolicy"])
    return redrive


@pytest.mark.parametrize("timeout", [30, 60, 120, 300, 600, 900])
def test_the_ingest_dead_letter_queue_is_reachable_within_the_retention(
    template: dict[str, Any], timeout: int
) -> None:
    most = template["Parameters"]["IngestMaxReceiveCount"]["MaxValue"]
    stack = deployed(template, {"IngestTimeout": str(timeout), "IngestMaxReceiveCount": str(most)})
    queue = stack.resource("IngestQueue")
    dlq = stack.resource("IngestDeadLetterQueue")
    visibility = int(queue["Properties"]["VisibilityTimeout"])
    retention = queue["Properties"]["MessageRetentionPeriod"]
    redrive = _redrive(queue)
    assert visibility >= 6 * timeout, "AWS's advice for an SQS event source"
    assert redrive["deadLetterTargetArn"].endswith(":IngestDeadLetterQueue")
    # A failed message comes back once per visibility timeout: the last delivery
    # before the dead-letter queue happens well within the queue's retention.
    assert redrive["maxReceiveCount"] * visibility < retention
    assert dlq["Properties"]["MessageRetentionPeriod"] > retention


@pytest.mark.parametrize("timeout", [300, 600, 900])
def test_the_notification_dead_letter_queue_is_reachable_within_the_retention(
    template: dict[str, Any], timeout: int
) -> None:
    stack = deployed(template, {"CompactorTimeout": str(timeout)})
    queue = stack.resource("NotificationsQueue")
    visibility = int(queue["Properties"]["VisibilityTimeout"])
    assert visibility >= 6 * timeout
    assert (
        _redrive(queue)["maxReceiveCount"] * visibility
        < queue["Properties"]["MessageRetentionPeriod"]
    )


@PARAMETER_SETS
def test_the_event_sources_report_batch_item_failures_and_bound_their_concurrency(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    translated = translate(template, parameters)
    stack = Stack(translated, parameters)
    ingest = stack.resource("IngestFunctionReceipts")["Properties"]
    assert ingest["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert ingest["BatchSize"] == stack.parameters["IngestBatchSize"]
    assert ingest["ScalingConfig"]["MaximumConcurrency"] == stack.parameters["IngestMaxConcurrency"]
    assert ingest["EventSourceArn"].endswith(":IngestQueue")
    notify = stack.resource("CompactorFunctionEntryNotifications")["Properties"]
    assert notify["Enabled"] == (parameters.get("CompactOnEntryNotifications") == "true")
    assert "ReservedConcurrentExecutions" not in stack.resource("IngestFunction")["Properties"]


def test_reserved_concurrency_is_optional_and_covers_the_triggers_when_set(
    template: dict[str, Any],
) -> None:
    """None by default (a new account cannot reserve any); when set, the compactor's covers
    one run per log plus the notification pollers, as its description says."""
    stack = deployed(template, {"DeployQueryFunction": "true"})
    for function in ("IngestFunction", "CompactorFunction", "QueryFunction"):
        assert "ReservedConcurrentExecutions" not in stack.resource(function)["Properties"]
    set_ = deployed(
        template,
        {"DeployQueryFunction": "true", "CompactorReservedConcurrency": "12",
         "QueryReservedConcurrency": "4"},
    )  # fmt: skip
    compactor = set_.resource("CompactorFunction")["Properties"]
    assert compactor["ReservedConcurrentExecutions"] == "12"
    assert set_.resource("QueryFunction")["Properties"]["ReservedConcurrentExecutions"] == "4"
    pollers = compactor["Events"]["EntryNotifications"]["Properties"]["ScalingConfig"][
        "MaximumConcurrency"
    ]
    assert "logs plus 2" in template["Parameters"]["CompactorReservedConcurrency"]["Description"]
    assert pollers == 2


@PARAMETER_SETS
def test_each_log_is_compacted_on_its_own_schedule(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    rules = stack.resources("AWS::Events::Rule")
    permissions = stack.resources("AWS::Lambda::Permission")
    for log in stack.parameters["LogNames"]:
        rule = rules[f"CompactorSchedule{alnum(log)}"]["Properties"]
        assert rule["ScheduleExpression"] == stack.parameters["CompactionSchedule"]
        (target,) = rule["Targets"]
        assert json.loads(target["Input"]) == {"log": log}
        assert target["Arn"].endswith(":function:CompactorFunction")
        assert target["DeadLetterConfig"]["Arn"].endswith(":CompactorDeadLetterQueue")
        permission = permissions[f"CompactorSchedulePermission{alnum(log)}"]["Properties"]
        assert permission["Principal"] == "events.amazonaws.com"
        assert permission["SourceArn"].endswith(f"rule/CompactorSchedule{alnum(log)}")
    assert len(rules) == len(stack.parameters["LogNames"])


# -- storage ---------------------------------------------------------------------------------


@PARAMETER_SETS
def test_the_bucket_is_private_encrypted_and_cleans_up_uploads(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    bucket = stack.resource("Bucket")
    props = bucket["Properties"]
    assert all(props["PublicAccessBlockConfiguration"].values())
    assert len(props["PublicAccessBlockConfiguration"]) == 4
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    if parameters.get("KmsKeyArn"):
        assert rule["ServerSideEncryptionByDefault"] == {
            "SSEAlgorithm": "aws:kms",
            "KMSMasterKeyID": KMS,
        }
    else:
        assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    uploads, tiering = props["LifecycleConfiguration"]["Rules"]
    assert uploads["Status"] == "Enabled"
    assert uploads["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1
    assert tiering["Transitions"] == [
        {"StorageClass": "INTELLIGENT_TIERING", "TransitionInDays": "30"}
    ]
    assert "Expiration" not in json.dumps(props), "entries are never expired"
    assert bucket["DeletionPolicy"] == "Retain"
    off = deployed(template, {**parameters, "TieringAfterDays": "0"}).resource("Bucket")
    assert len(off["Properties"]["LifecycleConfiguration"]["Rules"]) == 1


@PARAMETER_SETS
def test_entry_notifications_reach_the_queue_without_a_circular_dependency(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    bucket = stack.resource("Bucket")
    notify = parameters.get("CompactOnEntryNotifications") == "true"
    configurations = bucket["Properties"].get("NotificationConfiguration", {})
    if notify:
        (queue,) = configurations["QueueConfigurations"]
        assert queue == {
            "Event": "s3:ObjectCreated:*",
            "Queue": f"arn:aws:sqs:{REGION}:{ACCOUNT}:NotificationsQueue",
        }
    else:
        assert configurations == {}
    # The bucket waits for the queue's policy; the policy names the bucket by the
    # same name the bucket gets, never by a reference to it.
    assert bucket["DependsOn"] == "NotificationsQueuePolicy"
    raw_policy = json.dumps(template["Resources"]["NotificationsQueuePolicy"])
    assert '"Bucket"' not in raw_policy
    policy = stack.resource("NotificationsQueuePolicy")["Properties"]["PolicyDocument"]
    (statement,) = policy["Statement"]
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"] == (
        f"arn:aws:s3:::{stack.names['Bucket']}"
    )
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}


def test_a_bucket_without_a_given_name_gets_a_stable_valid_one(template: dict[str, Any]) -> None:
    name = deployed(template, {}).names["Bucket"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name), name
    assert name.startswith(f"deltalog-{ACCOUNT}-")


@PARAMETER_SETS
def test_the_table_is_on_demand_with_point_in_time_recovery(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    props = deployed(template, parameters).resource("Table")["Properties"]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    protected = parameters.get("TableDeletionProtection", "true") == "true"
    assert props["DeletionProtectionEnabled"] is protected
    assert {k["AttributeName"]: k["KeyType"] for k in props["KeySchema"]} == {
        "pk": "HASH",
        "sk": "RANGE",
    }


# -- functions, secrets, alarms ----------------------------------------------------------------


@PARAMETER_SETS
def test_the_functions_get_the_environment_the_handlers_read_and_no_secret(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    env = stack.resolve(template["Globals"]["Function"]["Environment"]["Variables"])
    settings = Settings.from_env(env)
    assert settings.logs == tuple(stack.parameters["LogNames"])
    config = settings.config(settings.default_log)
    assert (config.bucket, config.table) == (stack.names["Bucket"], TABLE)
    assert settings.namespace == f"deltalog/{STACK}"
    assert str(settings.cache_dir).startswith("/tmp/")
    assert settings.checkpoint_ratio == float(parameters.get("CheckpointRatio", DEFAULT_RATIO))
    assert (config.sse, config.sse_kms_key_id) == (
        ("aws:kms", KMS) if parameters.get("KmsKeyArn") else ("AES256", None)
    )
    # Secrets are named, never given: no key in the environment.
    assert not {"OPENAI_API_KEY", "DELTALOG_SIGNING_KEY", "DELTALOG_VERIFY_KEYS"} & env.keys()
    assert settings.openai_key_secret == (parameters.get("OpenAIKeySecretArn") or None)
    assert settings.openai_key_parameter == (parameters.get("OpenAIKeyParameterName") or None)
    assert settings.signing_key_secret == (parameters.get("SigningKeySecretArn") or None)


def test_the_compactor_has_room_for_the_snapshot_cache(template: dict[str, Any]) -> None:
    props = deployed(template, {}).resource("CompactorFunction")["Properties"]
    assert int(props["Timeout"]) == 900
    assert int(props["MemorySize"]) >= 3008
    assert int(props["EphemeralStorage"]["Size"]) == 10240


@PARAMETER_SETS
def test_the_alarms_watch_lag_errors_and_dead_letters(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    alarms = stack.resources("AWS::CloudWatch::Alarm")
    actions = [parameters["AlarmTopicArn"]] if parameters.get("AlarmTopicArn") else None
    for log in stack.parameters["LogNames"]:
        lag = alarms[f"LagAlarm{alnum(log)}"]["Properties"]
        # What the compactor's EMF lines carry: namespace, metric name, dimension.
        assert (lag["Namespace"], lag["MetricName"]) == (f"deltalog/{STACK}", LAG.name)
        assert lag["Dimensions"] == [{"Name": "log", "Value": log}]
        assert lag["Threshold"] == stack.parameters["LagAlarmThreshold"]
        assert lag["EvaluationPeriods"] == stack.parameters["LagAlarmPeriods"]
        assert lag["ComparisonOperator"] == "GreaterThanThreshold"
        assert lag["TreatMissingData"] == "breaching", "a compactor that stops reporting stalled"
        failures = alarms[f"IngestFailuresAlarm{alnum(log)}"]["Properties"]
        assert (failures["Namespace"], failures["MetricName"]) == (
            f"deltalog/{STACK}",
            INGEST_FAILURES.name,
        )
        assert failures["Dimensions"] == [{"Name": "log", "Value": log}]
    errors = alarms["CompactorErrorsAlarm"]["Properties"]
    assert (errors["Namespace"], errors["MetricName"]) == ("AWS/Lambda", "Errors")
    assert errors["Dimensions"] == [{"Name": "FunctionName", "Value": "CompactorFunction"}]
    ingest_errors = alarms["IngestErrorsAlarm"]["Properties"]
    assert (ingest_errors["DatapointsToAlarm"], ingest_errors["EvaluationPeriods"]) == (2, 3), (
        "one transient failure does not fire it"
    )
    for name, queue in (
        ("IngestDeadLetterAlarm", "IngestDeadLetterQueue"),
        ("CompactorDeadLetterAlarm", "CompactorDeadLetterQueue"),
    ):
        dlq = alarms[name]["Properties"]
        assert dlq["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert dlq["Dimensions"] == [{"Name": "QueueName", "Value": queue}]
        assert (dlq["Threshold"], dlq["ComparisonOperator"]) == (0, "GreaterThanThreshold")
    age = alarms["IngestQueueAgeAlarm"]["Properties"]
    assert (age["Namespace"], age["MetricName"]) == ("AWS/SQS", "ApproximateAgeOfOldestMessage")
    assert age["Dimensions"] == [{"Name": "QueueName", "Value": "IngestQueue"}]
    throttled = {
        a["Properties"]["Dimensions"][0]["Value"]
        for a in alarms.values()
        if a["Properties"].get("MetricName") == "Throttles"
    }
    query = parameters.get("DeployQueryFunction") == "true"
    assert throttled == {"IngestFunction", "CompactorFunction"} | (
        {"QueryFunction"} if query else set()
    )
    for name, alarm in alarms.items():
        props = alarm["Properties"]
        assert props.get("AlarmActions") == actions, name
        reminder = name.endswith("ReminderAlarm")
        assert props.get("OKActions") == (None if reminder else actions), name


@pytest.mark.parametrize("timeout", [300, 600, 900])
def test_the_duration_alarm_fires_near_the_compactors_timeout(
    template: dict[str, Any], timeout: int
) -> None:
    stack = deployed(template, {"CompactorTimeout": str(timeout)})
    duration = stack.resource("CompactorDurationAlarm")["Properties"]
    assert (duration["Namespace"], duration["MetricName"]) == ("AWS/Lambda", "Duration")
    assert duration["Dimensions"] == [{"Name": "FunctionName", "Value": "CompactorFunction"}]
    assert duration["Threshold"] == 0.9 * timeout * 1000
    assert duration["Statistic"] == "Maximum"


def _metric_math(expression: str, depth: float, hour: int, minute: int) -> float:
    """A CloudWatch metric math expression over one metric (``depth``), evaluated at one
    datapoint: IF, AND, OR, comparisons, MINUTE, HOUR, FLOOR, arithmetic."""
    python = (
        expression.replace("IF(", "_if(")
        .replace(" AND ", " and ")
        .replace(" OR ", " or ")
        .replace("MINUTE(depth)", str(minute))
        .replace("HOUR(depth)", str(hour))
        .replace("FLOOR(", "_floor(")
    )
    scope = {
        "_if": lambda c, a, b: a if c else b,
        "_floor": math.floor,
        "depth": depth,
        "__builtins__": {},
    }
    return float(eval(python, scope))


@pytest.mark.parametrize("hours", ["1", "6", "24"])
def test_a_dead_letter_reminder_notifies_again_every_few_hours_while_messages_wait(
    template: dict[str, Any], hours: str
) -> None:
    """Alarms notify on a change of state: the reminder's expression rests (0) for five
    minutes every ``hours`` hours while the queue holds messages, so over a day of a
    non-empty queue it fires 24 / hours times; with the queue empty it never does."""
    stack = deployed(template, {"DeadLetterReminderHours": hours})
    for name in ("IngestDeadLetterReminderAlarm", "CompactorDeadLetterReminderAlarm"):
        props = stack.resource(name)["Properties"]
        (expression,) = [m["Expression"] for m in props["Metrics"] if m.get("ReturnData")]
        (depth,) = [m for m in props["Metrics"] if m["Id"] == "depth"]
        assert depth["MetricStat"]["Metric"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert depth["MetricStat"]["Period"] == 60
        for waiting, fires in ((3.0, 24 // int(hours)), (0.0, 0)):
            states = [
                _metric_math(expression, waiting, minute // 60, minute % 60) > props["Threshold"]
                for minute in range(24 * 60)
            ]
            # Starting from OK, each step from OK to ALARM is a notification.
            steps = zip([False, *states[:-1]], states, strict=True)
            alarms = sum(1 for before, now in steps if now and not before)
            assert alarms == fires, (name, waiting)


@PARAMETER_SETS
def test_a_dashboard_shows_the_pipeline_with_the_metrics_the_handlers_emit(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    dashboard = stack.resource("Dashboard")["Properties"]
    body = json.loads(dashboard["DashboardBody"])
    text = json.dumps(body)
    searched = set(re.findall(r'MetricName=\\"(\w+)\\"', text))
    emitted = {f.name for f in FIGURES} | {f.name for f in INGEST_FIGURES}
    assert searched <= emitted, searched - emitted
    wanted = {"Lag", "EntriesApplied", "BytesPublished", "DeltasIngested", "CheckpointBytes"}
    assert wanted <= searched
    assert f'{{\\"deltalog/{STACK}\\",log}}' in text, "the namespace the handlers use"
    for shown in ("IngestDeadLetterQueue", "CompactorDeadLetterQueue", "IngestQueue"):
        assert f'"QueueName", "{shown}"' in text
    assert '"Duration", "FunctionName", "CompactorFunction"' in text
    assert all(w["properties"]["region"] == REGION for w in body["widgets"])


@PARAMETER_SETS
def test_logs_are_structured_json_at_info_in_groups_with_a_retention(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    query = parameters.get("DeployQueryFunction") == "true"
    for name in ("Ingest", "Compactor", "Query"):
        if name == "Query" and not query:
            continue
        logging = stack.resource(f"{name}Function")["Properties"]["LoggingConfig"]
        assert (logging["LogFormat"], logging["ApplicationLogLevel"]) == ("JSON", "INFO")
        group = stack.resource(logging["LogGroup"])
        assert group["Properties"]["RetentionInDays"] == stack.parameters["LogRetentionDays"]
        (own,) = [
            st
            for st in stack.resource(f"{name}FunctionRole")["Properties"]["Policies"][0][
                "PolicyDocument"
            ]["Statement"]
            if st["Sid"] == "WriteItsLogs"
        ]
        assert own["Resource"].startswith(
            f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{logging['LogGroup']}:"
        )


@PARAMETER_SETS
def test_the_ingest_queue_is_fifo_and_invalid_input_can_reach_its_dead_letter_queue(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    queue = stack.resource("IngestQueue")["Properties"]
    dlq = stack.resource("IngestDeadLetterQueue")["Properties"]
    assert (queue["FifoQueue"], queue["ContentBasedDeduplication"], dlq["FifoQueue"]) == (
        True,
        True,
        True,
    )
    ingest = stack.resource("IngestFunction")["Properties"]
    source = ingest["Events"]["Receipts"]["Properties"]
    assert "MaximumBatchingWindowInSeconds" not in source, "FIFO sources take no window"
    assert int(template["Parameters"]["IngestBatchSize"]["MaxValue"]) <= 10
    url = ingest["Environment"]["Variables"]["DELTALOG_DEAD_LETTER_QUEUE_URL"]
    assert url == "IngestDeadLetterQueue"
    statements = stack.resource("IngestFunctionRole")["Properties"]["Policies"][0][
        "PolicyDocument"
    ]["Statement"]
    sends = [st for st in statements if st["Action"] == "sqs:SendMessage"]
    assert [st["Resource"] for st in sends] == [
        f"arn:aws:sqs:{REGION}:{ACCOUNT}:IngestDeadLetterQueue"
    ]


def test_the_query_function_has_its_own_timeout_storage_concurrency_and_bounds(
    template: dict[str, Any],
) -> None:
    stack = deployed(
        template,
        {"DeployQueryFunction": "true", "QueryTimeout": "300", "QueryEphemeralStorage": "8192",
         "QueryMaxResults": "200"},
    )  # fmt: skip
    query = stack.resource("QueryFunction")["Properties"]
    assert (query["Timeout"], query["EphemeralStorage"]["Size"]) == ("300", "8192")
    assert query["Environment"]["Variables"]["DELTALOG_QUERY_MAX_RESULTS"] == "200"
    defaults_ = deployed(template, {"DeployQueryFunction": "true"}).resource("QueryFunction")
    assert defaults_["Properties"]["Timeout"] == "120"


@PARAMETER_SETS
def test_only_this_stacks_schedules_reach_the_compactor_dead_letter_queue(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    stack = deployed(template, parameters)
    policy = stack.resource("CompactorDeadLetterQueuePolicy")["Properties"]["PolicyDocument"]
    (statement,) = policy["Statement"]
    pattern = statement["Condition"]["ArnLike"]["aws:SourceArn"]
    stack_id = STACK_UUID.split("-")[0]
    assert pattern == f"arn:aws:events:{REGION}:{ACCOUNT}:rule/dl-{stack_id}-c-*"
    for log in stack.parameters["LogNames"]:
        rule = stack.resource(f"CompactorSchedule{alnum(log)}")["Properties"]
        assert fnmatch.fnmatchcase(
            f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{rule['Name']}", pattern
        )
        # The schedule names its log's policy: it starts once the compactor may work the log.
        assert rule["Description"].endswith(f"(with CompactorPolicy{alnum(log)})")


@PARAMETER_SETS
def test_the_table_uses_the_customer_key_when_one_is_given(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    table = deployed(template, parameters).resource("Table")["Properties"]
    if parameters.get("KmsKeyArn"):
        assert table["SSESpecification"] == {
            "SSEEnabled": True,
            "SSEType": "KMS",
            "KMSMasterKeyId": KMS,
        }
    else:
        assert "SSESpecification" not in table


def test_secrets_under_a_customer_key_may_be_decrypted_through_their_service_only(
    template: dict[str, Any],
) -> None:
    key = KMS.replace("1234abcd", "5678abcd")
    stack = deployed(template, {**EVERYTHING, "SecretsKmsKeyArn": key})
    for role in ("IngestFunctionRole", "QueryFunctionRole", "CompactorFunctionRole"):
        statements = stack.resource(role)["Properties"]["Policies"][0]["PolicyDocument"][
            "Statement"
        ]
        (decrypt,) = [st for st in statements if st["Sid"] == "DecryptTheSecrets"]
        assert (decrypt["Action"], decrypt["Resource"]) == ("kms:Decrypt", key)
        services = _listed(decrypt["Condition"]["StringEquals"]["kms:ViaService"])
        assert f"secretsmanager.{REGION}.amazonaws.com" in services
    none = deployed(template, {**SSM_KEY})
    statements = none.resource("IngestFunctionRole")["Properties"]["Policies"][0]["PolicyDocument"][
        "Statement"
    ]
    assert "DecryptTheSecrets" not in {st["Sid"] for st in statements}


def test_every_parameter_has_a_default_that_deploys(template: dict[str, Any]) -> None:
    """``sam deploy --guided`` can accept every default."""
    values = defaults(template)
    assert set(values) == set(template["Parameters"])
    assert values["LogNames"] == ["receipts"]


def test_log_names_that_differ_only_in_punctuation_are_refused(template: dict[str, Any]) -> None:
    """The template's logical ids keep a log name's letters and digits only: ``a.b`` and
    ``ab`` would share ``CompactorScheduleab``. The expanded template shows the collision,
    and the handlers refuse such a list at once, naming both."""
    stack = deployed(template, {"LogNames": ["labels.v2", "labelsv2"]})
    assert len(stack.resources("AWS::Events::Rule")) == 1, "one log lost its schedule"
    env = stack.resolve(template["Globals"]["Function"]["Environment"]["Variables"])
    with pytest.raises(ConfigurationError, match=r"'labels\.v2' and 'labelsv2'"):
        Settings.from_env(env)
