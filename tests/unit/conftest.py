"""Fixtures shared by the unit tests."""

from tests.kubeapi import api  # noqa: F401 (the fake API server fixture)
