"""The $reference grammar: what is a reference in SQL steps and in HTTP text, what is left alone, how values
bind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from psycopg.types.json import Jsonb

from pgflow.engine.runners.http import substitute_body, substitute_text
from pgflow.errors import FlowDefinitionError
from pgflow.references import MissingValue, Reference, compile_sql, compile_text, resolve


def test_references_become_placeholders_in_order():
    t = compile_sql("SELECT $input.a, $load.id, $item, $x? FROM t WHERE y = $input")
    assert t.text == "SELECT %s, %s, %s, %s FROM t WHERE y = %s"
    assert t.references == (Reference("input", ("a",)), Reference("load", ("id",)), Reference("item"),
                            Reference("x", (), True), Reference("input"))


@pytest.mark.parametrize("sql", [
    "SELECT '$input'",
    "SELECT 'it''s $input'",
    "SELECT E'\\'$input'",
    'SELECT "$input" FROM t',
    "SELECT 1 -- $input\n",
    "SELECT 1 /* $input /* nested */ $input */",
    "SELECT $$ $input $$",
    "SELECT $tag$ $input $tag$",
])
def test_dollar_signs_inside_literals_comments_and_bodies_are_not_references(sql):
    t = compile_sql(sql)
    assert t.references == ()
    assert t.text == sql


def test_percent_signs_are_escaped_for_psycopg():
    assert compile_sql("SELECT '100%' LIKE $input").text == "SELECT '100%%' LIKE %s"
    assert compile_sql("SELECT 5 % 2").text == "SELECT 5 %% 2"


@pytest.mark.parametrize("sql, message", [
    ("SELECT $1", "positional parameter"),
    ("SELECT 'open", "unterminated"),
    ("SELECT $x$ never closed", "unterminated dollar-quoted"),
    ("SELECT $input.a.*", "use \\$name.\\* on a whole result"),
    ("SELECT $ 1", "stray"),
])
def test_malformed_sql_is_a_definition_error(sql, message):
    with pytest.raises(FlowDefinitionError, match=message):
        compile_sql(sql)


def test_resolve_columns_rows_and_null_safety():
    scope = {"input": {"a": 1}, "rows": [{"id": 7}, {"id": 8}], "empty": [], "item": "x"}
    assert resolve(Reference("input", ("a",)), scope) == 1
    assert resolve(Reference("rows", ("id",)), scope) == 7  # first row's column
    assert resolve(Reference("empty", ("id",), True), scope) is None
    with pytest.raises(MissingValue, match="no rows"):
        resolve(Reference("empty", ("id",)), scope)
    with pytest.raises(MissingValue, match="no key 'b'"):
        resolve(Reference("input", ("b",)), scope)
    assert resolve(Reference("input", ("b",), True), scope) is None
    with pytest.raises(MissingValue, match="no value named 'nope'"):
        resolve(Reference("nope"), scope)


def test_row_sets_render_as_typed_relations():
    t = compile_sql("SELECT a FROM $batch.* WHERE a > $min")
    text, params = t.render({"batch": [{"a": 1, "b": "x"}], "min": 0}, {"batch": [["a", "integer"], ["b", "text"]]})
    assert text == 'SELECT a FROM jsonb_to_recordset(%s::jsonb) AS "batch"("a" integer, "b" text) WHERE a > %s'
    assert params[1] == 0
    inferred, _ = t.render({"batch": [{"a": 1.5, "b": True}], "min": 0})
    assert '"a" double precision, "b" boolean' in inferred
    with pytest.raises(MissingValue, match="no rows and no known columns"):
        t.render({"batch": [], "min": 0})
    with pytest.raises(MissingValue, match="unsupported column type"):
        t.render({"batch": [], "min": 0}, {"batch": [["a", "int); DROP TABLE x; --"]]})


def test_a_sql_result_by_name_is_its_first_cell():
    t = compile_sql("SELECT $total, $total.other, $empty?")
    columns = {"total": [["amount", "integer"], ["other", "integer"]], "empty": [["v", "text"]]}
    _, params = t.render({"total": [{"other": 1, "amount": 100}], "empty": []}, columns)
    assert params == [100, 1, None]


def test_parameters_adapt_structures_to_jsonb_and_keep_scalars():
    t = compile_sql("SELECT $input, $input.s, $input.n")
    _, params = t.render({"input": {"s": "'; DROP TABLE x; --", "n": 3}})
    assert isinstance(params[0], Jsonb)
    assert params[1:] == ["'; DROP TABLE x; --", 3]


TEXT_VECTORS = json.loads((Path(__file__).parents[1] / "data" / "text_references.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", TEXT_VECTORS, ids=[v["text"][:40] for v in TEXT_VECTORS])
def test_the_reference_grammar_of_http_text(vector):
    """HTTP text uses the same reference grammar as SQL steps (tests/db/test_grammar.py checks those), but every
    ``$name...`` is a reference and any other ``$`` is text."""
    if "error" in vector:
        with pytest.raises(FlowDefinitionError, match=re.escape(vector["error"])):
            compile_text(vector["text"])
    else:
        assert [str(r) for r in compile_text(vector["text"]).references] == vector["references"]


def test_http_text_substitutes_values_and_keeps_other_dollars():
    scope = {"input": {"id": "a b/c", "price": 5}, "secrets": {"token": "t0k"}}
    assert substitute_text("https://x/orders/$input.id", scope, url=True) == "https://x/orders/a%20b%2Fc"
    assert substitute_text("costs $5 and $input.price", scope) == "costs $5 and 5"
    assert substitute_body({"id": "$input.id", "note": "id $input.id", "n": 1}, scope) == \
        {"id": "a b/c", "note": "id a b/c", "n": 1}
    with pytest.raises(MissingValue, match="only be used in a SQL step"):
        substitute_text("$rows.*", {"rows": []})
