"""The template's shards: one compaction per shard in an invocation of its own, the shard
count a parameter the stack scales with, and the query function's fan-out mode.

Evaluated offline (``tests/deploy/cfn.py``, the SAM translator), as the other template tests.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from deltalog_lambda.settings import Settings
from tests.deploy.cfn import ACCOUNT, REGION, Stack, translate
from tests.deploy.test_template import deployed, role_statements


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    from tests.deploy.cfn import load

    return load()


@pytest.mark.parametrize(("shards", "pollers"), [("1", 2), ("8", 8), ("64", 64)])
def test_each_shard_task_is_an_invocation_of_its_own_and_scales_with_the_count(
    template: dict[str, Any], shards: str, pollers: int
) -> None:
    """Batch size 1: one shard per invocation (its memory, its ``/tmp``); as many at once as
    there are shards (at least the 2 SQS event sources allow), with no other edit."""
    parameters = {"Shards": shards}
    stack = Stack(translate(template, parameters), parameters)
    tasks = stack.resource("CompactorFunctionShardTasks")["Properties"]
    assert tasks["EventSourceArn"].endswith(":ShardQueue")
    assert tasks["BatchSize"] == 1
    assert int(tasks["ScalingConfig"]["MaximumConcurrency"]) == pollers
    assert tasks.get("Enabled", True) is True


def test_the_compactor_sends_shard_tasks_and_reads_the_count(template: dict[str, Any]) -> None:
    stack = deployed(template, {"Shards": "12"})
    compactor = stack.resource("CompactorFunction")["Properties"]
    env = {
        **stack.resolve(template["Globals"]["Function"]["Environment"]["Variables"]),
        **stack.resolve(compactor["Environment"]["Variables"]),
    }
    settings = Settings.from_env(env)
    assert settings.shards == 12
    assert settings.shard_queue is not None and settings.shard_queue.endswith("ShardQueue")
    queue = stack.resource("ShardQueue")["Properties"]
    redrive = json.loads(queue["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(":CompactorDeadLetterQueue")
    assert (
        redrive["maxReceiveCount"] * int(queue["VisibilityTimeout"])
        < queue["MessageRetentionPeriod"]
    )
    statements = role_statements(translate(template, {}), {})["CompactorFunctionRole"]
    on_queue = [s for s in statements if str(s["Resource"]).endswith(":ShardQueue")]
    actions = {a for s in on_queue for a in s["Action"]}
    assert {"sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage"} <= actions


def test_the_query_fan_out_may_invoke_the_query_function_and_nothing_else(
    template: dict[str, Any],
) -> None:
    parameters = {"DeployQueryFunction": "true", "QueryFanOut": "true"}
    stack = deployed(template, parameters)
    query = stack.resource("QueryFunction")["Properties"]
    assert query["Environment"]["Variables"]["DELTALOG_QUERY_FANOUT"] == "true"
    statements = role_statements(translate(template, parameters), parameters)
    invokes = [s for s in statements["QueryFunctionRole"] if s["Action"] == "lambda:InvokeFunction"]
    (invoke,) = invokes
    assert invoke["Resource"] == f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:QueryFunction"
    off = {"DeployQueryFunction": "true"}
    without = role_statements(translate(template, off), off)["QueryFunctionRole"]
    assert not [s for s in without if s["Action"] == "lambda:InvokeFunction"]
