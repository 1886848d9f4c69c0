"""The drill: refused outside the sandbox before any side effect; its condition is real."""

from __future__ import annotations

import pytest
import redis

from runbook.settings import load_settings
from sandbox.drills import BACKLOG_MESSAGES, cause, drill


def broker(platform) -> redis.Redis:
    return redis.Redis.from_url(platform.redis.url)


def test_a_drill_outside_the_sandbox_is_refused_before_any_side_effect(platform, monkeypatch):
    monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "staging")
    state = drill(issue="queue-backlog", return_state=True)
    assert state.is_failed()
    assert "only in the sandbox" in str(state.message)
    assert broker(platform).llen("celery") == 0


def test_the_queue_backlog_drill_puts_real_messages_on_the_broker_and_takes_them_back(platform):
    condition = cause("queue-backlog", load_settings())
    try:
        assert broker(platform).llen("celery") == BACKLOG_MESSAGES
    finally:
        condition.undo()
    assert broker(platform).llen("celery") == 0
    condition.undo()  # twice is harmless


def test_latency_drills_are_refused_until_the_standin_can_be_reached(platform):
    with pytest.raises(Exception, match="not available yet"):
        cause("latency", load_settings())
