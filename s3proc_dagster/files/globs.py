"""Path globs as users write them (`**/promo*.csv`, `march2024/*.csv`)."""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    """`**` spans folders (including none), `*` and `?` stay within one path segment."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    # DOTALL: a name with a newline is still matched, so it meets the refusal that names it
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def path_matches(relative_path: str, pattern: str) -> bool:
    return _compile(pattern).match(relative_path) is not None


def admitted(relative_path: str, include: tuple[str, ...], exclude: tuple[str, ...] = ()) -> bool:
    """A zone takes the files its `include` globs match and its `exclude` globs do not."""
    included = any(path_matches(relative_path, pattern) for pattern in include)
    return included and not any(path_matches(relative_path, pattern) for pattern in exclude)
