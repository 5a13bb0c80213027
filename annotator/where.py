"""`annotate export --where`: a small expression language over a run's columns, parsed and typed here (no `eval`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from annotator.errors import AnnotatorError

GRAMMAR = (
    "columns such as label_cat, prob_cat or answer_kind; numbers; 'strings'; true, false; comparisons == != < <= > >=; "
    "and, or, not; parentheses"
)
TOKEN = re.compile(
    r"""(?P<space>\s+)
    |(?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    |(?P<string>'[^']*'|"[^"]*")
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>==|!=|<=|>=|<|>|\(|\))
    |(?P<bad_op>=)
    |(?P<open_string>['"])
    """,
    re.VERBOSE,
)
KEYWORDS = {"and", "or", "not", "true", "false"}
COMPARISONS = {
    "==": pc.equal,
    "!=": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
}
ORDERED = {"number", "string"}  # the kinds `<` applies to
ERROR_COLUMNS = ("error", "error_kind")  # the run's own: null in every row that can be kept


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # number, string, name, op, keyword, end
    text: str
    position: int  # 1-based character


@dataclass(frozen=True, slots=True)
class Node:
    """A typed expression: `kind` is bool, number or string; `_evaluate` turns it into an Arrow array or scalar."""

    kind: str
    op: str  # column, literal, not, and, or, or a comparison
    args: tuple
    position: int


class WhereFilter:
    """Rows for which the expression is true; a row with an error, or where the expression is null, never is."""

    def __init__(self, text: str, schema: pa.Schema) -> None:
        self.text = text
        self.schema = schema
        self.tokens = tokenize(text)
        if len(self.tokens) > MAX_TOKENS:
            raise AnnotatorError(
                _message(text, self.tokens[MAX_TOKENS].position, f"the expression is longer than {MAX_TOKENS} words")
            )
        self.index = 0
        self.depth = 0  # `not` and `(` open so far: bounded, so that neither parsing nor evaluating can recurse deep
        self.root = self._expression()
        if self._peek().kind != "end":
            self._fail(self._peek(), "expected `and`, `or` or the end of the expression")
        if self.root.kind != "bool":
            self._fail_at(
                self.root.position,
                f"the expression is a {self.root.kind}, not true or false",
                "compare it, e.g. `prob_cat >= 0.8`",
            )

    def describe(self) -> str:
        return self.text.strip()

    def mask(self, table: pa.Table) -> pa.ChunkedArray | pa.Array:
        wanted = _evaluate(self.root, table)
        if isinstance(wanted, pa.Scalar):
            wanted = pa.array([wanted.as_py()] * table.num_rows, pa.bool_())
        return pc.fill_null(pc.and_kleene(pc.is_null(table.column("error")), wanted), False)

    # --- recursive descent: or > and > not > comparison > atom ---------------------------------------------

    def _expression(self) -> Node:
        return self._chain("or", self._and)

    def _and(self) -> Node:
        return self._chain("and", self._not)

    def _chain(self, op: str, operand) -> Node:
        """`operand (op operand)*`, grouped from the left."""
        node = operand()
        while self._peek().kind == "keyword" and self._peek().text == op:
            token = self._next()
            node = self._logical(op, node, operand(), token)
        return node

    def _nested(self, token: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self._fail(token, f"the expression nests `not` and parentheses more than {MAX_DEPTH} deep")

    def _not(self) -> Node:
        if self._peek().text == "not" and self._peek().kind == "keyword":
            token = self._next()
            self._nested(token)
            operand = self._not()
            self.depth -= 1
            self._need_bool(operand, "`not`")
            return Node("bool", "not", (operand,), token.position)
        return self._comparison()

    def _comparison(self) -> Node:
        left = self._atom()
        if self._peek().kind != "op" or self._peek().text not in COMPARISONS:
            return left
        token = self._next()
        right = self._atom()
        if self._peek().kind == "op" and self._peek().text in COMPARISONS:
            self._fail(self._peek(), "comparisons do not chain", "write `prob_cat > 0.2 and prob_cat < 0.8`")
        if left.kind != right.kind:
            self._fail(
                token,
                f"`{token.text}` compares a {left.kind} with a {right.kind}",
                "compare a column with a value of its kind, e.g. `answer_kind == 'photo'`",
            )
        if token.text not in ("==", "!=") and left.kind not in ORDERED:
            self._fail(token, f"`{token.text}` does not apply to true/false values", "use `==` or `!=`")
        return Node("bool", token.text, (left, right), token.position)

    def _atom(self) -> Node:
        token = self._next()
        if token.kind == "op" and token.text == "(":
            self._nested(token)
            node = self._expression()
            self.depth -= 1
            closing = self._next()
            if closing.text != ")" or closing.kind != "op":
                self._fail(closing, f"expected `)` to close the `(` at character {token.position}")
            return node
        if token.kind == "number":
            return Node("number", "literal", (float(token.text),), token.position)
        if token.kind == "string":
            return Node("string", "literal", (token.text[1:-1],), token.position)
        if token.kind == "keyword" and token.text in ("true", "false"):
            return Node("bool", "literal", (token.text == "true",), token.position)
        if token.kind == "name":
            return Node(self._column_kind(token), "column", (token.text,), token.position)
        if token.kind == "end":
            self._fail(token, "the expression ends too soon", "finish it, e.g. `label_cat and not label_text`")
        self._fail(token, f"expected a column, a value or `(`, not `{token.text}`")

    def _logical(self, op: str, left: Node, right: Node, token: Token) -> Node:
        self._need_bool(left, f"`{op}`")
        self._need_bool(right, f"`{op}`")
        return Node("bool", op, (left, right), token.position)

    def _need_bool(self, node: Node, where: str) -> None:
        if node.kind != "bool":
            self._fail_at(
                node.position,
                f"{where} needs true/false values, and this is a {node.kind}",
                "compare it, e.g. `prob_cat >= 0.8`",
            )

    def _column_kind(self, token: Token) -> str:
        if token.text in ERROR_COLUMNS and token.text in self.schema.names:
            self._fail(
                token,
                f"column {token.text!r} is null in every row `--where` can keep (a row with an error is never kept), "
                "so a condition on it says nothing about them",
                "leave it out; `annotate status RUN_DIR` counts the errors, and --rejected DIR holds the error rows",
            )
        if token.text not in self.schema.names:
            usable = [f.name for f in self.schema if _kind(f.type) is not None and f.name not in ERROR_COLUMNS]
            hint = f"columns usable here: {', '.join(usable)}"
            if token.text.lower() in ("null", "none"):
                hint = f"there is no null to compare with (rows with an error are never kept); {hint}"
            elif any(_kind(f.type) == "string" for f in self.schema if f.name in usable):
                hint = f"a text is written in quotes, e.g. '{token.text}'; {hint}"
            self._fail(token, f"{token.text!r} is not a column of this run", hint)
        kind = _kind(self.schema.field(token.text).type)
        if kind is None:
            self._fail(
                token,
                f"column {token.text!r} holds {self.schema.field(token.text).type}, which `--where` "
                "cannot compare (it compares true/false, numbers and strings)",
            )
        return kind

    def _peek(self) -> Token:
        return self.tokens[self.index]

    def _next(self) -> Token:
        token = self.tokens[self.index]
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def _fail(self, token: Token, problem: str, hint: str = "") -> None:
        self._fail_at(token.position, problem, hint)

    def _fail_at(self, position: int, problem: str, hint: str = "") -> None:
        raise AnnotatorError(_message(self.text, position, problem, hint))


MAX_TOKENS = 400  # words of an expression: far beyond any filter a person writes, and a tree evaluated shallowly
MAX_DEPTH = 64


def tokenize(text: str) -> list[Token]:
    tokens, position = [], 0
    while position < len(text):
        match = TOKEN.match(text, position)
        if match is None:
            raise AnnotatorError(_message(text, position + 1, f"unexpected character {text[position]!r}"))
        kind = match.lastgroup
        if kind == "bad_op":
            raise AnnotatorError(_message(text, position + 1, "`=` is not a comparison", "write `==`"))
        if kind == "open_string":
            raise AnnotatorError(_message(text, position + 1, "this string has no closing quote"))
        if kind != "space":
            word = match.group()
            tokens.append(Token("keyword" if kind == "name" and word in KEYWORDS else kind, word, position + 1))
        position = match.end()
    return [*tokens, Token("end", "", len(text) + 1)]


def _message(text: str, position: int, problem: str, hint: str = "") -> str:
    return (
        f"--where {text if len(text) <= 200 else text[:197] + '...'!r}: {problem} (at character {position}). "
        + (f"{hint[0].upper()}{hint[1:]}. " if hint else "")
        + f'An expression may use {GRAMMAR}; e.g. --where "label_cat and not label_text".'
    )


def _kind(dtype: pa.DataType) -> str | None:
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    return None


def _evaluate(node: Node, table: pa.Table) -> pa.ChunkedArray | pa.Array | pa.Scalar:
    if node.op == "column":
        column = table.column(node.args[0])
        # float64, as the sink compares when it sets a label: `prob_x >= T` keeps what threshold T labels true.
        return column.cast(pa.float64()) if node.kind == "number" else column
    if node.op == "literal":
        return pa.scalar(node.args[0])
    values = [_evaluate(arg, table) for arg in node.args]
    if node.op == "not":
        return pc.invert(values[0])
    if node.op == "and":
        return pc.and_kleene(*values)
    if node.op == "or":
        return pc.or_kleene(*values)
    return COMPARISONS[node.op](*values)
