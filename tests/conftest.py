"""Options for the whole suite (registered here: pytest reads options only from the
conftest files it finds at start-up)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance")
    group.addoption(
        "--cases",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of conformance scenarios (repeatable); default: "
        "../shared/conformance/cases (or the copy in tests/conformance/cases)"
        " plus the generated scenarios",
    )
    group.addoption(
        "--no-generated",
        action="store_true",
        help="do not add the generated scenarios to the default directories",
    )
