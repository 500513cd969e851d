"""Input is echoed bounded: in rejection reasons, in log lines, in API answers."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import pytest
import structlog

from agent.endpoints import from_api
from common import logs
from common.echo import LOG_VALUE_LIMIT, bounded
from common.podobject import PodError, parse_pod
from common.policyendpoint import PolicyEndpointError

HUGE = "10." + "9" * 1_000_000 + "/8"


def endpoint(cidr: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "pe", "namespace": "default", "generation": 1},
        "spec": {
            "policyRef": {"name": "p", "namespace": "default"},
            "podIsolation": ["Ingress"],
            "podSelectorEndpoints": [],
            "ingress": [{"cidr": cidr}],
            "egress": [],
        },
    }


def test_a_megabyte_cidr_gives_a_short_reason() -> None:
    with pytest.raises(PolicyEndpointError) as err:
        from_api(endpoint(HUGE))
    assert len(err.value.reason) < 1000
    assert "chars)" in err.value.reason  # says how long the value was
    assert len(str(err.value)) < 1100


def test_bounded_says_the_length() -> None:
    assert bounded("abc") == "'abc'"
    text = bounded("x" * 10_000, 50)
    assert text.startswith("'xxx")
    assert text.endswith("... (10002 chars)")


def test_pod_with_wrong_shapes_is_an_error_not_a_crash() -> None:
    for status in ({"podIPs": ["x"]}, {"podIPs": "x"}, "x", {"podIP": ["a"]}):
        with pytest.raises(PodError) as err:
            parse_pod({"metadata": {"name": "a", "namespace": "b"}, "status": status})
        assert (err.value.namespace, err.value.name) == ("b", "a")
    with pytest.raises(PodError):
        parse_pod({"metadata": "x"})
    with pytest.raises(PodError) as err:
        parse_pod({"metadata": {"name": "a" * 100_000, "namespace": "b"}})
    assert len(err.value.reason) < 1000


def test_log_lines_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("info", process="test", json=True)
    try:
        structlog.get_logger("t").error("something", value=HUGE, items=["y" * 100] * 10_000)
    finally:
        structlog.reset_defaults()
    line = out.getvalue().strip()
    assert len(line) < 3 * LOG_VALUE_LIMIT + 500
    event = json.loads(line)
    assert event["value"].endswith(f"({len(HUGE)} chars)")
