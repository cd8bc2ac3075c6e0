"""robots.txt as RFC 9309 defines it: parsing, matching, and what a failed fetch means.

- The rules of the groups whose user-agent equals our product token (case-insensitive)
  apply, merged; else those of the ``*`` groups; else everything is allowed.
- The most specific matching rule wins (the longest pattern); an allow and a disallow
  of the same length: allow. ``*`` matches any sequence, a final ``$`` anchors the end.
  Paths and patterns are compared after percent-encoding normalisation.
- Fetch outcomes: 2xx -> parse; 4xx ("unavailable") -> everything allowed;
  5xx, 429 or no answer ("unreachable") -> everything disallowed.
  /robots.txt itself is always allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from curate.fetch.reasons import ROBOTS_UNREACHABLE

MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to parse at least 500 KiB
MAX_REDIRECTS = 5  # RFC 9309: follow at least five consecutive redirects
TTL = 24 * 3600.0  # seconds a fetched robots.txt is used (RFC 9309: at most 24 hours)
UNREACHABLE_TTL = 300.0  # seconds an unreachable robots.txt is remembered before trying again

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_AGENT_TOKEN = re.compile(r"[A-Za-z_-]+")


@dataclass(frozen=True)
class RobotsRules:
    """The rules of one origin that apply to our user agent.

    `status`: ``parsed`` (a 2xx robots.txt), ``unavailable`` (4xx: all allowed) or
    ``unreachable`` (5xx / no answer: all disallowed).
    """

    status: Literal["parsed", "unavailable", "unreachable"]
    rules: tuple[tuple[bool, str], ...] = ()  # (allow?, normalised pattern)
    detail: str = ""
    reason: str = ROBOTS_UNREACHABLE  # drop reason of the URLs an unreachable robots.txt disallows

    def allows(self, path: str) -> bool:
        """Whether `path` (path and query of a URL) may be fetched."""
        if self.status == "unavailable":
            return True
        path = normalise(path or "/")
        if path == "/robots.txt":
            return True
        if self.status == "unreachable":
            return False
        best_length, allowed = -1, True
        for allow, pattern in self.rules:
            length = len(pattern)
            if (length > best_length or (length == best_length and allow)) and pattern_matches(pattern, path):
                best_length, allowed = length, allow
        return allowed


def unavailable(detail: str) -> RobotsRules:
    """robots.txt answered 4xx (or redirected too often): everything is allowed."""
    return RobotsRules("unavailable", detail=detail)


def unreachable(detail: str, reason: str = ROBOTS_UNREACHABLE) -> RobotsRules:
    """robots.txt could not be fetched (5xx, 429, network failure): everything is disallowed.

    `reason` is what the disallowed URLs are dropped with: ``robots_unreachable`` when the
    host answered, the network failure's own reason (``timeout``, ...) when it did not.
    """
    return RobotsRules("unreachable", detail=detail, reason=reason)


def parse_robots(text: str, agent_token: str) -> RobotsRules:
    """The rules of robots.txt `text` that apply to product token `agent_token`."""
    token = agent_token.strip().lower()
    groups: list[tuple[list[str], list[tuple[bool, str]]]] = []
    agents: list[str] = []
    rules: list[tuple[bool, str]] = []
    for line in text.lstrip("\ufeff").splitlines():
        key, sep, value = line.split("#", 1)[0].partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            if rules:
                groups.append((agents, rules))
                agents, rules = [], []
            agents.append(_agent(value))
        elif key in ("allow", "disallow") and agents:
            if value:
                rules.append((key == "allow", normalise(value)))
            elif not rules:
                rules.append((True, ""))  # "Disallow:" with no path: a group that allows everything
    if agents:
        groups.append((agents, rules))
    for wanted in (token, "*"):
        chosen = [rule for group_agents, group_rules in groups if wanted in group_agents for rule in group_rules]
        if any(wanted in group_agents for group_agents, _ in groups):
            return RobotsRules("parsed", tuple(rule for rule in chosen if rule[1]))
    return RobotsRules("parsed")


def _agent(value: str) -> str:
    """The product token of a user-agent line: ``*`` or its leading letters, ``_`` and ``-``."""
    if value.startswith("*"):
        return "*"
    match = _AGENT_TOKEN.match(value)
    return match.group(0).lower() if match else ""


def normalise(path: str) -> str:
    """Percent-encoding normal form: unreserved characters decoded, other escapes in upper case, non-ASCII encoded."""
    path = "".join(char if ord(char) < 128 else "".join(f"%{b:02X}" for b in char.encode()) for char in path)

    def fix(match: re.Match) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _PERCENT.sub(fix, path)


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether robots.txt `pattern` (``*`` wildcards, optional final ``$``) matches the start of `path`."""
    anchored = pattern.endswith("$")
    if anchored:
        pattern = pattern[:-1]
    if "*" not in pattern:
        return path == pattern if anchored else path.startswith(pattern)
    return _wildcard_match(pattern if anchored else pattern + "*", path)


def _wildcard_match(pattern: str, text: str) -> bool:
    """Full match of `pattern` with ``*`` wildcards; linear backtracking to the last star, no regex blow-up."""
    p = t = 0
    star, resume = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif p < len(pattern) and pattern[p] == text[t]:
            p += 1
            t += 1
        elif star >= 0:
            p, resume = star + 1, resume + 1
            t = resume
        else:
            return False
    return all(char == "*" for char in pattern[p:])
