"""Name patterns, as recipes use them to pick layers and parameters.

Patterns are ``fnmatch`` style and case-sensitive (``fnmatchcase``) on every platform, so a
recipe picks the same names everywhere. A pattern that matches nothing is almost always a
typo; callers check with `first_unmatched` and raise their own error naming the pattern and
the names it could have matched.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

__all__ = ["first_unmatched", "matches_any"]


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches at least one of ``patterns``."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def first_unmatched(patterns: Iterable[str], names: Iterable[str]) -> str | None:
    """The first of ``patterns`` that matches none of ``names``, or None when each matches one."""
    names = list(names)
    return next((pattern for pattern in patterns if not any(fnmatchcase(name, pattern) for name in names)), None)
