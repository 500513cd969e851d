"""The PromQL of the chart's dashboard and alerts, and the metric names it reads."""

from __future__ import annotations

import json
import re
from typing import Any

Obj = dict[str, Any]
# every metric the node's processes export starts with one of these
PREFIXES = ("awsnodeagent_", "network_policy_")
_NAME = re.compile(r"\b(?:awsnodeagent|network_policy)_[a-zA-Z0-9_]+")


def dashboard(objs: list[Obj]) -> Obj:
    (cm,) = [
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
    ]
    (text,) = cm["data"].values()
    parsed: Obj = json.loads(text)
    return parsed


def queries(objs: list[Obj]) -> list[str]:
    """Every PromQL expression of the rendered dashboard and PrometheusRule."""
    out = []
    for panel in dashboard(objs)["panels"]:
        out += [t["expr"] for t in panel["targets"]]
    for var in dashboard(objs)["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["query"])
    for rule_set in [o for o in objs if o["kind"] == "PrometheusRule"]:
        for group in rule_set["spec"]["groups"]:
            out += [r["expr"] for r in group["rules"]]
    return out


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def exported(scrape: str) -> set[str]:
    """The sample names of a Prometheus text exposition."""
    return {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in scrape.splitlines()
        if line and not line.startswith("#")
    }
