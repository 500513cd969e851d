"""Domain names as policies match them (docs: ../shared/conformance/FORMAT-dns.md).

- Case-insensitive, a trailing dot ignored: ``API.Example.com.`` is ``api.example.com``.
- ``*.d`` matches one or more whole labels before ``d`` (``x.d``, ``x.y.d``), never ``d``
  itself nor ``xd``. The only wildcard is a leading ``*.``.
"""

from __future__ import annotations

import functools
import re

# A domain name as the CRDs accept it: labels of letters, digits, '-' and '_' (not at a
# label's ends), at least two labels, an optional leading "*." and trailing dot.
_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?"
DOMAIN_NAME = re.compile(rf"^(\*\.)?({_LABEL}\.)+{_LABEL}\.?$")


def normal(name: str) -> str:
    """The name as compared: lower case, without the trailing dot."""
    return name.rstrip(".").lower()


@functools.lru_cache(maxsize=4096)
def _pattern(pattern: str) -> tuple[bool, str]:
    p = normal(pattern)
    if p.startswith("*."):
        return True, p[1:]  # ".d": the suffix a match must end with
    return False, p


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` (as a pod asked for it) matches a ``domainNames`` entry."""
    wildcard, rest = _pattern(pattern)
    n = normal(name)
    if not wildcard:
        return n == rest
    return len(n) > len(rest) and n.endswith(rest) and not n.startswith(".")
