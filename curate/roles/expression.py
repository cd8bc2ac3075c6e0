"""A small, safe language for role conditions: `aesthetic >= 5.5 and min_side >= 512`.

The text is parsed with Python's `ast` module and compiled into closures over a
whitelist of node types; nothing is ever passed to `eval`. Allowed:

- field names from curate/roles/fields.py (dotted ones such as `source.dataset` are names too),
  numbers, strings, `true` / `false`;
- comparisons `== != < <= > >=` (chains such as `5 <= aesthetic < 7` too), and `in` / `not in`
  with a list or tuple of constants (`kind in ['pair', 'edit']`) or a list field
  (`'dense' in caption_names`);
- `and`, `or`, `not`; arithmetic `+ - * /` and unary minus on numbers.

Not allowed: calls, attribute access, indexing, comprehensions, `if` expressions, `is`, and any
other construct. Types are checked when the condition is compiled: numbers compare with numbers,
strings with strings (`==`, `!=`, `in` only), `and` / `or` / `not` join conditions, and the whole
condition must be a condition. A missing value (null score, no caption) makes a comparison false;
arithmetic on a missing value or a division by zero gives a missing value. So `not (aesthetic >= 5)`
is true for a sample without an aesthetic score; write `aesthetic < 5` to require one.
"""

from __future__ import annotations

import ast
import difflib
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from curate.roles.fields import BOOL, NUMBER, STRING, STRINGS, field_types

MAX_LENGTH = 2000  # characters; conditions are short, and this bounds parser recursion

Values = Mapping[str, Any]
Evaluate = Callable[[Values], Any]

ALLOWED = ("field names, numbers, strings, true/false, comparisons (== != < <= > >=, in, not in), "
           "and / or / not, + - * / on numbers, and lists of constants after `in`")


class ExpressionError(ValueError):
    """A condition that cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True)
class Condition:
    """A compiled condition: call it with a sample's field values to get True or False."""

    text: str
    fields: frozenset[str]
    test: Callable[[Values], bool]

    def __call__(self, values: Values) -> bool:
        return self.test(values) is True


def compile_condition(text: str, types: Mapping[str, str] | None = None) -> Condition:
    """Parse and type-check `text` against the field types; raise ExpressionError if it is not usable."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("the condition is empty; write one such as `clip_score >= 0.3` (or `true`)")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"the condition is longer than {MAX_LENGTH} characters")
    source = text.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as error:
        raise ExpressionError(_syntax_message(source, error)) from None
    except (RecursionError, MemoryError, ValueError):
        raise ExpressionError("the condition is nested too deeply or contains a null character") from None
    compiler = _Compiler(source, types if types is not None else field_types())
    try:
        kind, evaluate = compiler.compile(tree.body)
    except RecursionError:
        raise ExpressionError("the condition is nested too deeply") from None
    if kind != BOOL:
        raise ExpressionError(f"the condition must be true or false (a comparison such as `clip_score >= 0.3`), "
                              f"but `{source}` is a {kind}")
    return Condition(text, frozenset(compiler.used), evaluate)


def _syntax_message(source: str, error: SyntaxError) -> str:
    message = f"not a valid expression: {error.msg}"
    if error.offset:
        message += f" at column {error.offset}"
    if re.search(r"(?<![=!<>])=(?!=)", source):
        message += "; compare with == (a single = assigns)"
    if "&&" in source or "||" in source:
        message += "; use `and` / `or`"
    return message


_ORDER = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_EQUALITY = {ast.Eq: operator.eq, ast.NotEq: operator.ne}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
            ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Mod: "%", ast.Pow: "**",
            ast.FloorDiv: "//", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<",
            ast.RShift: ">>", ast.MatMult: "@", ast.Invert: "~", ast.UAdd: "unary +"}
_BOOL_NAMES = {"true": True, "false": False, "True": True, "False": False}
_DISALLOWED = {
    ast.Call: "function calls are not allowed",
    ast.Subscript: "indexing (`x[...]`) is not allowed",
    ast.Attribute: "attribute access is not allowed",
    ast.IfExp: "`... if ... else ...` is not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.NamedExpr: "assignment (:=) is not allowed",
    ast.JoinedStr: "f-strings are not allowed",
}


class _Compiler:
    """Turns an `ast` expression into (type, closure), refusing every node outside the whitelist."""

    def __init__(self, source: str, types: Mapping[str, str]):
        self.source = source
        self.types = types
        self.used: set[str] = set()

    def snippet(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or type(node).__name__

    def compile(self, node: ast.AST) -> tuple[str, Evaluate]:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            reason = _DISALLOWED.get(type(node), f"{type(node).__name__} is not allowed")
            raise ExpressionError(f"{reason}: `{self.snippet(node)}`; a condition may use {ALLOWED}")
        return method(node)

    # -- leaves

    def _Constant(self, node: ast.Constant) -> tuple[str, Evaluate]:
        value = node.value
        if isinstance(value, bool):
            return BOOL, lambda values: value
        if isinstance(value, (int, float)):
            return NUMBER, lambda values: value
        if isinstance(value, str):
            return STRING, lambda values: value
        if value is None:
            raise ExpressionError(f"`{self.snippet(node)}` cannot be compared: a missing value already makes "
                                  "every comparison false")
        raise ExpressionError(f"`{self.snippet(node)}` is not allowed; a condition may use {ALLOWED}")

    def _Name(self, node: ast.Name) -> tuple[str, Evaluate]:
        if node.id in _BOOL_NAMES:
            constant = _BOOL_NAMES[node.id]
            return BOOL, lambda values: constant
        return self._field(node.id, node)

    def _Attribute(self, node: ast.Attribute) -> tuple[str, Evaluate]:
        parts, current = [node.attr], node.value
        while isinstance(current, ast.Attribute):
            parts.insert(0, current.attr)
            current = current.value
        if not isinstance(current, ast.Name):
            raise ExpressionError(f"attribute access is not allowed: `{self.snippet(node)}`")
        name = ".".join([current.id, *parts])
        if name not in self.types and current.id in self.types:
            raise ExpressionError(f"attribute access is not allowed: `{name}` ({current.id} is a field)")
        return self._field(name, node)

    def _field(self, name: str, node: ast.AST) -> tuple[str, Evaluate]:
        if name not in self.types:
            close = difflib.get_close_matches(name, list(self.types), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ExpressionError(f"unknown field `{name}`{hint}; known fields: {', '.join(sorted(self.types))}")
        self.used.add(name)
        return self.types[name], lambda values: values.get(name)

    # -- operators

    def _BoolOp(self, node: ast.BoolOp) -> tuple[str, Evaluate]:
        word = "and" if isinstance(node.op, ast.And) else "or"
        parts = []
        for operand in node.values:
            kind, evaluate = self.compile(operand)
            if kind != BOOL:
                raise ExpressionError(f"`{word}` joins conditions, but `{self.snippet(operand)}` is a {kind}")
            parts.append(evaluate)
        if word == "and":
            return BOOL, lambda values: all(part(values) is True for part in parts)
        return BOOL, lambda values: any(part(values) is True for part in parts)

    def _UnaryOp(self, node: ast.UnaryOp) -> tuple[str, Evaluate]:
        kind, evaluate = self.compile(node.operand)
        if isinstance(node.op, ast.Not):
            if kind != BOOL:
                raise ExpressionError(f"`not` applies to a condition, but `{self.snippet(node.operand)}` is a {kind}")
            return BOOL, lambda values: evaluate(values) is not True
        if isinstance(node.op, ast.USub):
            if kind != NUMBER:
                raise ExpressionError(f"unary minus needs a number, but `{self.snippet(node.operand)}` is a {kind}")
            return NUMBER, lambda values: None if (value := evaluate(values)) is None else -value
        raise ExpressionError(f"operator {_SYMBOLS.get(type(node.op), '?')} is not allowed: `{self.snippet(node)}`")

    def _BinOp(self, node: ast.BinOp) -> tuple[str, Evaluate]:
        function = _ARITHMETIC.get(type(node.op))
        if function is None:
            raise ExpressionError(f"operator {_SYMBOLS.get(type(node.op), '?')} is not allowed "
                                  f"(only + - * /): `{self.snippet(node)}`")
        (left_kind, left), (right_kind, right) = self.compile(node.left), self.compile(node.right)
        for side, kind in ((node.left, left_kind), (node.right, right_kind)):
            if kind != NUMBER:
                raise ExpressionError(f"arithmetic needs numbers, but `{self.snippet(side)}` is a {kind}")

        def arithmetic(values: Values) -> Any:
            a, b = left(values), right(values)
            if a is None or b is None or (function is operator.truediv and b == 0):
                return None
            return function(a, b)

        return NUMBER, arithmetic

    def _Compare(self, node: ast.Compare) -> tuple[str, Evaluate]:
        left_kind, left = self.compile(node.left)
        left_node = node.left
        steps: list[tuple[Callable[[Any, Any], bool], Evaluate]] = []
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                right_kind, right = self._membership_target(right_node, left_node, left_kind)
                test = _member if isinstance(op, ast.In) else _not_member
            else:
                right_kind, right = self.compile(right_node)
                test = self._comparison(op, left_node, left_kind, right_node, right_kind)
            steps.append((test, right))
            left_node, left_kind = right_node, right_kind

        def compare(values: Values) -> bool:
            a = left(values)
            for test, right in steps:
                b = right(values)
                if not test(a, b):
                    return False
                a = b
            return True

        return BOOL, compare

    def _comparison(self, op: ast.cmpop, left_node: ast.AST, left_kind: str, right_node: ast.AST,
                    right_kind: str) -> Callable[[Any, Any], bool]:
        symbol = _SYMBOLS.get(type(op), "?")
        if isinstance(op, (ast.Is, ast.IsNot)):
            raise ExpressionError(f"`{symbol}` is not allowed; compare with == or !=: `{self.snippet(right_node)}`")
        if left_kind != right_kind or left_kind == STRINGS:
            raise ExpressionError(f"cannot compare `{self.snippet(left_node)}` (a {left_kind}) with "
                                  f"`{self.snippet(right_node)}` (a {right_kind}) using {symbol}")
        if type(op) in _ORDER:
            if left_kind != NUMBER:
                raise ExpressionError(f"{symbol} compares numbers; `{self.snippet(left_node)}` is a {left_kind} "
                                      "(strings compare with ==, != or in)")
            function = _ORDER[type(op)]
        else:
            function = _EQUALITY[type(op)]
        return lambda a, b: a is not None and b is not None and function(a, b)

    def _membership_target(self, node: ast.AST, left_node: ast.AST, left_kind: str) -> tuple[str, Evaluate]:
        if isinstance(node, (ast.List, ast.Tuple)):
            if left_kind not in (NUMBER, STRING):
                raise ExpressionError(f"`in` tests a number or a string, but `{self.snippet(left_node)}` is a "
                                      f"{left_kind}")
            members = []
            for element in node.elts:
                kind, value = self._constant(element)
                if kind != left_kind:
                    raise ExpressionError(f"cannot look for `{self.snippet(left_node)}` (a {left_kind}) among "
                                          f"{kind}s: `{self.snippet(node)}`")
                members.append(value)
            frozen = frozenset(members)
            return "list", lambda values: frozen
        kind, evaluate = self.compile(node)
        if kind != STRINGS:
            raise ExpressionError(f"`in` needs a list of constants (e.g. `kind in ['pair', 'edit']`) or a list "
                                  f"field, but `{self.snippet(node)}` is a {kind}")
        if left_kind != STRING:
            raise ExpressionError(f"`{self.snippet(node)}` holds strings, but `{self.snippet(left_node)}` is a "
                                  f"{left_kind}")
        return STRINGS, evaluate

    def _constant(self, node: ast.AST) -> tuple[str, Any]:
        """A list element: a number, a (negated) number or a string, nothing computed."""
        negate = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
        inner = node.operand if negate else node
        if not isinstance(inner, ast.Constant) or isinstance(inner.value, bool) or \
                not isinstance(inner.value, (int, float, str)) or (negate and isinstance(inner.value, str)):
            raise ExpressionError(f"a list after `in` holds numbers or strings only: `{self.snippet(node)}`")
        kind = STRING if isinstance(inner.value, str) else NUMBER
        return kind, -inner.value if negate else inner.value


def _member(value: Any, members: Any) -> bool:
    return value is not None and members is not None and value in members


def _not_member(value: Any, members: Any) -> bool:
    return value is not None and members is not None and value not in members
