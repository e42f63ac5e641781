"""The metric names a PromQL expression reads, so dashboards and alerts can be checked against real scrapes.

`metric_names` tokenizes the expression (it does not evaluate it) and keeps the identifiers that are metric names:
not function or aggregation names (an identifier followed by `(`), not keywords, not label names inside `{...}`
or `by (...)`-style clauses, not durations inside `[...]` or after `offset`, not strings, not numbers, not
Grafana variables (`$lane`, `${lane}`, `${lane:regex}`, `[[lane]]`, `$__rate_interval`). Recording-rule names
(`job:requests:rate5m`) are names. A name given as `{__name__="x"}` or, Prometheus 3 style, as a quoted string
in the braces (`{"x", job="a"}`) counts too. What it cannot read exactly (an unknown character, an unterminated
string or bracket, a Grafana variable glued to a name) raises ValueError rather than guessing.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

# Keywords are case-insensitive in PromQL; each of these is never a metric name.
AGGREGATIONS = frozenset({
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "count_values",
    "group", "limitk", "limit_ratio"})
CLAUSES = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = AGGREGATIONS | CLAUSES | frozenset({"bool", "and", "or", "unless", "atan2", "offset", "inf", "nan"})
MATCH_OPERATORS = frozenset({"=", "!=", "=~", "!~"})

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[[\w:.]+\]\])
  | (?P<number>\d[\w.]*|\.\d[\w.]*)
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<op>==|!=|=~|!~|<=|>=|[-+*/%^=<>@,(){}\[\]:])
""", re.VERBOSE)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


def tokens(expr: str) -> list[Token]:
    """The expression's tokens without whitespace and comments; ValueError at the first unreadable character."""
    result: list[Token] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"unexpected {expr[position]!r} at {position} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            result.append(Token(kind, match.group(), match.start(), match.end()))
        position = match.end()
    for before, after in itertools.pairwise(result):
        if before.end != after.start:
            continue
        in_name = (before.kind == "variable" and (after.kind == "ident" or after.text == "{")) or (
            after.kind == "variable" and before.kind == "ident")
        if in_name:
            raise ValueError(f"a Grafana variable is part of a name at {before.start} in {expr!r}: "
                             "the metric name cannot be known statically")
    return result


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    if literal[0] == "`":
        return body
    return re.sub(r"\\(.)", r"\1", body)


def _matcher_names(inner: list[Token]) -> set[str]:
    """Names given inside one `{...}`: `__name__="x"` or a bare quoted name (Prometheus 3)."""
    names: set[str] = set()
    for index, token in enumerate(inner):
        if token.kind != "string":
            continue
        previous = inner[index - 1].text if index > 0 else ","
        following = inner[index + 1].text if index + 1 < len(inner) else ","
        if previous == "," and following == ",":
            names.add(_unquote(token.text))  # a bare string item is the metric name
        elif previous == "=" and index >= 2 and inner[index - 2].text == "__name__":
            names.add(_unquote(token.text))
    return names


def _closing(expr: str, items: list[Token], index: int, opening: str, closing: str) -> int:
    """Index of the token that closes the bracket opened at `index`."""
    depth = 0
    for position in range(index, len(items)):
        if items[position].text == opening:
            depth += 1
        elif items[position].text == closing:
            depth -= 1
            if depth == 0:
                return position
    raise ValueError(f"unclosed {opening!r} at {items[index].start} in {expr!r}")


def metric_names(expr: str) -> set[str]:
    """The metric names (and recording-rule names) that `expr` selects."""
    items = tokens(expr)
    names: set[str] = set()
    index = 0
    while index < len(items):
        token = items[index]
        following = items[index + 1].text if index + 1 < len(items) else ""
        if token.text == "{":
            end = _closing(expr, items, index, "{", "}")
            names |= _matcher_names(items[index + 1:end])
            index = end + 1
            continue
        if token.text == "[":  # a range or a subquery: durations and variables only
            index = _closing(expr, items, index, "[", "]") + 1
            continue
        if token.text in ("}", "]"):
            raise ValueError(f"unmatched {token.text!r} at {token.start} in {expr!r}")
        if token.kind == "ident":
            word = token.text.lower()
            if word in CLAUSES and following == "(":
                index = _closing(expr, items, index + 1, "(", ")") + 1  # the label list
                continue
            if following != "(" and word not in KEYWORDS:
                names.add(token.text)
        index += 1
    return names
