"""Which fetch settings decide only which URLs are admitted, and which earlier drops a change of them may cure.

A pool is fetched once. Changing one of these settings on an output that exists fetches again only
the rows the previous settings dropped for a reason the new ones may cure (allowing private
addresses: the rows the address guard refused; longer timeouts or more retries: the transient
failures; ...). A change that would admit fewer rows (a stricter guard, a smaller size limit) cannot
be applied to rows already fetched: then every row is fetched again.
"""

from __future__ import annotations

from typing import Any, Callable

from curate.fetch import reasons

DECOMPRESSION_BOMB = "decompression_bomb"


def _more(before: Any, after: Any) -> bool | None:
    """True: `after` admits more; False: the same; None: fewer."""
    if after == before:
        return False
    return True if after > before else None


def _less(before: Any, after: Any) -> bool | None:
    return _more(after, before)


def _turned_on(before: Any, after: Any) -> bool | None:
    return False if after == before else (True if after else None)


def _turned_off(before: Any, after: Any) -> bool | None:
    return _turned_on(after, before)


def _subset(before: Any, after: Any) -> bool | None:
    """Fewer entries admit more (opt-out directives that are no longer honoured)."""
    old, new = set(before or []), set(after or [])
    return False if old == new else (True if new < old else None)


def _superset(before: Any, after: Any) -> bool | None:
    """More entries admit more, as long as no entry changes (host pins added)."""
    old, new = dict(before or {}), dict(after or {})
    if old == new:
        return False
    return True if all(new.get(k) == v for k, v in old.items()) else None


def _no_limit_or_more(before: Any, after: Any) -> bool | None:
    """host_max_failures: 0 is no limit at all."""
    if after == before:
        return False
    if after == 0:
        return True
    return None if before == 0 else _more(before, after)


def _either_way(before: Any, after: Any) -> bool | None:
    """A setting of effort (timeouts, retries): fetched rows stay fetched; a change may cure transient failures."""
    return False if after == before else True


TRANSIENT = frozenset(reasons.RETRYABLE)

# setting -> (does the new value admit more?, the reasons whose rows it may now admit)
RULES: dict[str, tuple[Callable[[Any, Any], bool | None], frozenset[str]]] = {
    "allow_private_addresses": (_turned_on, frozenset({reasons.BLOCKED_ADDRESS})),
    "resolve": (_superset, frozenset({reasons.DNS_ERROR, reasons.BLOCKED_ADDRESS}) | TRANSIENT),
    "respect_robots": (_turned_off, frozenset({reasons.ROBOTS, reasons.ROBOTS_UNREACHABLE})),
    "opt_out_directives": (_subset, frozenset({reasons.OPT_OUT})),
    "max_bytes": (_more, frozenset({reasons.TOO_LARGE})),
    "max_redirects": (_more, frozenset({reasons.TOO_MANY_REDIRECTS})),
    "max_pixels": (_more, frozenset({DECOMPRESSION_BOMB})),
    "connect_timeout": (_either_way, TRANSIENT),
    "read_timeout": (_either_way, TRANSIENT),
    "total_timeout": (_either_way, TRANSIENT),
    "retries": (_either_way, TRANSIENT),
    "backoff_base": (_either_way, TRANSIENT),
    "backoff_max": (_either_way, TRANSIENT),
    "max_retry_after": (_either_way, TRANSIENT),
    "host_concurrency": (_either_way, TRANSIENT),
    "host_rate": (_either_way, TRANSIENT),
    "host_max_failures": (_no_limit_or_more, frozenset({reasons.HOST_UNREACHABLE})),
    "host_failure_cooldown": (_less, frozenset({reasons.HOST_UNREACHABLE})),
}

ADMISSION_PARAMS = frozenset(RULES)


def readmitted(before: dict[str, Any], after: dict[str, Any]) -> frozenset[str] | None:
    """The drop reasons whose rows the settings `after` may admit that `before` did not; None when some
    setting now admits fewer (or a setting was not recorded then)."""
    found: set[str] = set()
    for name, (compare, cured) in RULES.items():
        if name not in before:
            return None
        verdict = compare(before[name], after.get(name))
        if verdict is None:
            return None
        if verdict:
            found |= cured
    return frozenset(found)
