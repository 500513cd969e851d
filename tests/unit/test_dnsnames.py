"""Domain-name matching as FORMAT-dns.md states it, with the evidence it cites."""

from __future__ import annotations

import pytest

from common.dnsnames import matches, normal


@pytest.mark.parametrize(
    ("pattern", "name", "expect"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.Example.COM.", True),
        ("api.example.com.", "api.example.com", True),
        ("api.example.com", "www.api.example.com", False),
        ("api.example.com", "example.com", False),
        # controller DomainName doc (= upstream)
        ("*.kubernetes.io", "latest.blog.kubernetes.io", True),
        ("*.kubernetes.io", "kubernetes.io", False),
        ("*.kubernetes.io", "wikipedia.org", False),
        # AWS agent test
        ("*.amazonaws.com", "s3.amazonaws.com", True),
        ("*.amazonaws.com", "amazon.com", False),
        ("*.d.example", "xd.example", False),
        ("*.D.Example.", "x.y.d.example", True),
    ],
)
def test_matches(pattern: str, name: str, expect: bool) -> None:
    assert matches(pattern, name) is expect


def test_normal() -> None:
    assert normal("A.B.c.") == "a.b.c"
