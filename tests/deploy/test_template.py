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

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from compactor.checkpoint import DEFAULT_RATIO
from compactor.metrics import LAG
from deltalog.storage.policy import render
from deltalog_lambda.settings import Settings
from tests.deploy.cfn import (
    ACCOUNT,
    REGION,
    STACK,
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
    stack = deployed(template, parameters)
    bucket = stack.names["Bucket"]
    kms = parameters.get("KmsKeyArn") or None
    policies = stack.resources("AWS::IAM::RolePolicy")
    query = parameters.get("DeployQueryFunction") == "true"
    expected_count = len(stack.parameters["LogNames"]) * (3 if query else 2)
    assert len(policies) == expected_count
    for log in stack.parameters["LogNames"]:
        for role, function in ROLES.items():
            logical = f"{function}Policy{alnum(log)}"
            if role == "reader" and not query:
                assert logical not in policies
                continue
            policy = policies[logical]["Properties"]
            assert policy["RoleName"] == f"{function}FunctionRole"
            assert policy["PolicyName"] == f"deltalog-{role}-{log}"
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


def _statements(translated: dict[str, Any], parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every statement of every identity policy the deployment creates."""
    stack = Stack(translated, parameters)
    found = []
    for resource in stack.resources("AWS::IAM::Role").values():
        for policy in resource["Properties"].get("Policies", []):
            found += policy["PolicyDocument"]["Statement"]
    for resource in stack.resources("AWS::IAM::RolePolicy").values():
        found += resource["Properties"]["PolicyDocument"]["Statement"]
    return found


@PARAMETER_SETS
def test_no_statement_allows_a_wildcard_action(
    template: dict[str, Any], parameters: dict[str, Any]
) -> None:
    translated = translate(template, parameters)
    statements = _statements(translated, parameters)
    assert statements
    for statement in statements:
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            assert action != "*" and not action.endswith(":*"), statement
    managed = {
        arn
        for resource in translated["Resources"].values()
        if resource["Type"] == "AWS::IAM::Role"
        for arn in resource["Properties"].get("ManagedPolicyArns", [])
    }
    assert managed == {
        "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
        "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
        "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole",
    }


def _inline_size(translated: dict[str, Any], parameters: dict[str, Any], function: str) -> int:
    """Characters of a role's inline policies as IAM counts them (no whitespace)."""
    names = {"Bucket": parameters["BucketName"], "Table": TABLE}
    stack = Stack(translated, parameters, names=names)
    role = f"{function}FunctionRole"
    documents = [p["PolicyDocument"] for p in stack.resource(role)["Properties"]["Policies"]]
    documents += [
        r["Properties"]["PolicyDocument"]
        for r in stack.resources("AWS::IAM::RolePolicy").values()
        if r["Properties"]["RoleName"] == role
    ]
    return sum(len(json.dumps(d, separators=(",", ":"))) for d in documents)


MAX_LOGS = 4
"""Logs per stack within IAM's 10,240 characters of inline policy per role (README)."""


def test_inline_policies_fit_iam_for_the_documented_number_of_logs(
    template: dict[str, Any],
) -> None:
    logs = [f"log-{i:02d}" for i in range(MAX_LOGS + 1)]
    fits = {**EVERYTHING, "BucketName": "a" * 63, "LogNames": logs[:MAX_LOGS]}
    too_many = {**fits, "LogNames": logs}
    sizes = {f: _inline_size(translate(template, fits), fits, f) for f in ROLES.values()}
    assert max(sizes.values()) <= 10_240, sizes
    assert _inline_size(translate(template, too_many), too_many, "Compactor") > 10_240


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


def test_the_compactor_reserved_concurrency_covers_its_triggers(template: dict[str, Any]) -> None:
    """One run per log on its schedule, plus the notification pollers' concurrency."""
    stack = deployed(template, {})
    compactor = stack.resource("CompactorFunction")["Properties"]
    pollers = compactor["Events"]["EntryNotifications"]["Properties"]["ScalingConfig"][
        "MaximumConcurrency"
    ]
    reserved = int(compactor["ReservedConcurrentExecutions"])
    assert reserved >= len(stack.parameters["LogNames"]) + pollers
    minimum = template["Parameters"]["CompactorReservedConcurrency"]["MinValue"]
    assert minimum >= 1 + pollers, "even the smallest allowed value leaves a log its run"


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
    (lifecycle,) = props["LifecycleConfiguration"]["Rules"]
    assert lifecycle["Status"] == "Enabled"
    assert lifecycle["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1
    assert bucket["DeletionPolicy"] == "Retain"


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
        assert lag.get("AlarmActions") == actions
    errors = alarms["CompactorErrorsAlarm"]["Properties"]
    assert (errors["Namespace"], errors["MetricName"]) == ("AWS/Lambda", "Errors")
    assert errors["Dimensions"] == [{"Name": "FunctionName", "Value": "CompactorFunction"}]
    for name, queue in (
        ("IngestDeadLetterAlarm", "IngestDeadLetterQueue"),
        ("CompactorDeadLetterAlarm", "CompactorDeadLetterQueue"),
    ):
        dlq = alarms[name]["Properties"]
        assert dlq["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert dlq["Dimensions"] == [{"Name": "QueueName", "Value": queue}]
        assert (dlq["Threshold"], dlq["ComparisonOperator"]) == (0, "GreaterThanThreshold")


def test_every_parameter_has_a_default_that_deploys(template: dict[str, Any]) -> None:
    """``sam deploy --guided`` can accept every default."""
    values = defaults(template)
    assert set(values) == set(template["Parameters"])
    assert values["LogNames"] == ["receipts"]
