"""Split a filter into what runs per pool file and what must see the whole pool.

A filter runs on the Ray engine as one DuckDB query per pool file (a *partition*). That gives
the local engine's answer only if the query is *row-local*: every output row comes from one
pool row (plus uid-keyed tables joined to it), so the union of the per-file answers is the
answer over the whole pool. :func:`row_local_problem` checks that on the query's syntax tree
and names the construct that breaks it (an aggregate, a window, DISTINCT, LIMIT, a set
operation, a second read of ``pool``, ``pool`` inside a predicate subquery...).

The one global step the baselines need is ``fraction_threshold(score, fraction)``, a scalar over
the whole pool. :func:`curate.run.thresholds.extract_fraction_thresholds` cuts each call out of the query text and
puts ``getvariable('__curate_fraction_threshold_N')`` in its place; the engine computes the value
exactly across partitions (:mod:`curate.run.ray_threshold`) and every partition receives it
as a typed variable, never as SQL text. The rest of the query is passed to DuckDB untouched.
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp

_GLOBAL_CLAUSES = {
    "group": "GROUP BY",
    "having": "HAVING",
    "qualify": "QUALIFY",
    "distinct": "DISTINCT",
    "limit": "LIMIT",
    "offset": "OFFSET",
}


def _own_nodes(select: exp.Select):
    """Nodes of a SELECT that belong to it, not to subqueries nested in it."""
    for key in ("expressions", "where", "joins"):
        val = select.args.get(key)
        for root in (val if isinstance(val, list) else [val]):
            if root is None:
                continue
            yield from root.walk(prune=lambda n: n is not root and isinstance(n, (exp.Select, exp.Subquery)))


def _select_problem(select: exp.Select) -> str | None:
    for key, name in _GLOBAL_CLAUSES.items():
        if select.args.get(key):
            return f"{name} needs the whole pool"
    for node in _own_nodes(select):
        if isinstance(node, exp.Window):
            return "a window function needs the whole pool"
        if isinstance(node, exp.AggFunc):
            return f"the aggregate {node.sql(dialect='duckdb')[:40]} needs the whole pool"
    return None


def _table_name(t: exp.Table) -> str:
    return t.name.lower()


def _joined_on_file(ref: exp.Table) -> bool:
    """``ref`` is the right side of an inner or left join whose condition equates its ``file`` column
    with another table's (``ON t.file = p.file AND ...`` or ``USING (file, ...)``)."""
    join = ref.parent
    if not isinstance(join, exp.Join) or ref.arg_key != "this":
        return False
    side, kind = (join.side or "").upper(), (join.kind or "").upper()
    if side not in ("", "LEFT") or kind not in ("", "INNER", "OUTER"):
        return False  # a LEFT join keeps the driving side's rows: still one partition's rows
    if any(getattr(u, "name", "").lower() == "file" for u in join.args.get("using") or []):
        return True
    on = join.args.get("on")
    if on is None:
        return False
    me = ref.alias_or_name.lower()
    for conj in (on.flatten() if isinstance(on, exp.And) else [on]):
        if isinstance(conj, exp.EQ) and all(isinstance(c, exp.Column) and c.name.lower() == "file"
                                            for c in (conj.this, conj.expression)):
            tables = {conj.this.table.lower(), conj.expression.table.lower()}
            if me in tables and len(tables) == 2:
                return True
    return False


def row_local_problem(sql: str, partitioned=("pool",)) -> str | None:
    """None if ``sql`` (after :func:`curate.run.thresholds.extract_fraction_thresholds`) can run per pool file;
    otherwise a short reason naming the construct that needs the whole pool.

    ``partitioned`` names the tables a partition restricts to its pool file: ``pool`` and the
    feature views with a ``file`` column. Exactly one of their references must *drive* the
    query (read in FROM, through row-by-row SELECTs up to the result); every other one must be
    inner-joined to it on ``file``.
    """
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except Exception as e:  # noqa: BLE001 - sqlglot cannot prove anything about this query
        return f"the query cannot be analysed ({str(e).splitlines()[0][:80]})"
    names = {n.lower() for n in partitioned}
    refs = [t for t in tree.find_all(exp.Table) if _table_name(t) in names and t.db in ("", "main")]
    if not refs:
        return f"the query reads none of {', '.join(sorted(names))}"
    joined = [t for t in refs if _joined_on_file(t)]
    drivers = [t for t in refs if not any(t is j for j in joined)]
    if len(drivers) != 1:
        what = ", ".join(f"`{_table_name(t)}`" for t in drivers) or "none"
        return (f"one table must drive the query and the others join it on `file`; "
                f"driving: {what}")
    chain: list[exp.Expression] = []
    problem = _chain_problem(tree, drivers[0], chain)
    if problem:
        return problem
    for ref in joined:
        select = ref.parent.parent
        if not any(select is c for c in chain):
            return f"`{_table_name(ref)}` is joined on `file` outside the query's main path"
        if ref.parent.arg_key != "joins":
            return f"`{_table_name(ref)}` is joined in an unsupported place"
    return None


def _chain_problem(tree, node, chain) -> str | None:
    """Walk from the driving table up to the root; every step must keep rows independent."""
    while node.parent is not None:
        parent, key = node.parent, node.arg_key
        chain.append(parent)
        if isinstance(parent, exp.From) or isinstance(parent, exp.Subquery) and key == "this":
            pass
        elif isinstance(parent, exp.Join):
            if key != "this":
                return f"`{_table_name(node)}` appears inside a join condition"
            side, kind = (parent.side or "").upper(), (parent.kind or "").upper()
            if side in ("LEFT", "FULL") or kind not in ("", "INNER", "CROSS"):
                return f"the driving table is on the inner side of a {side or kind} JOIN"
        elif isinstance(parent, exp.Select):
            if key not in ("from", "from_", "joins"):
                return "the driving table is read inside a subquery of a predicate or projection"
            problem = _select_problem(parent)
            if problem:
                return problem
            if key in ("from", "from_"):
                for j in parent.args.get("joins") or []:
                    if (j.side or "").upper() in ("RIGHT", "FULL"):
                        return f"a {j.side.upper()} JOIN keeps rows that do not come from the pool"
        elif isinstance(parent, exp.CTE):
            name = parent.alias_or_name.lower()
            refs = [t for t in tree.find_all(exp.Table)
                    if _table_name(t) == name and not t.db
                    and all(a is not parent for a in _ancestors(t))]
            if len(refs) != 1:
                return f"the CTE `{name}` that reads the pool is used {len(refs)} times"
            node = refs[0]
            continue
        elif isinstance(parent, exp.SetOperation):
            kind = type(parent).__name__.upper()
            return f"{kind} combines pool rows with rows from elsewhere"
        elif isinstance(parent, exp.With):
            pass
        else:
            return f"the driving table is used inside {type(parent).__name__}"
        node = parent
    return None


def _ancestors(node: exp.Expression):
    out = []
    while node.parent is not None:
        node = node.parent
        out.append(node)
    return out
