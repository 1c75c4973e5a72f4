"""How a model call's retries are worded for a history line (`actors._retries`)."""

from __future__ import annotations

from undying.actors._models import RetryRecord
from undying.actors._retries import ModelCall, describe_retries


def test_no_retries_say_nothing() -> None:
    assert describe_retries([]) == ""


def test_retries_name_their_kind_the_asked_and_the_waited_time() -> None:
    records = [RetryRecord(attempt=1, kind="http_429", waited_s=0.5213, status=429,
                           retry_after_s=0.5, model="openai:gpt").to_dict(),
               RetryRecord(attempt=2, kind="timeout", waited_s=0.08).to_dict()]
    assert describe_retries(records) == ("2 retries: http_429 (Retry-After 0.5 s, waited 0.52 s); "
                                         "timeout (waited 0.08 s)")
    assert describe_retries(records[1:]) == "1 retry: timeout (waited 0.08 s)"


def test_a_failover_names_the_model_it_left() -> None:
    rec = RetryRecord(attempt=2, kind="failover", waited_s=0.0, model="openai:gpt").to_dict()
    assert describe_retries([rec]) == "1 retry: failover (from openai:gpt)"


def test_a_call_describes_itself() -> None:
    call = ModelCall(effect_id="m4", attempt=1, outcome="failed", retries=(),
                     error="tool call 'read' has arguments that are not valid JSON",
                     malformed=True)
    assert call.describe() == ("m4#1 failed (malformed: tool call 'read' has arguments that are "
                               "not valid JSON)")
    ok = ModelCall(effect_id="m2", attempt=1, outcome="reply",
                   retries=({"kind": "reset", "waited_s": 0.1},))
    assert ok.describe() == "m2#1 reply, 1 retry: reset (waited 0.10 s)"
