"""The console's pages and actions. Pages read through the named queries of sql/queries/console.sql;
actions call :class:`pgflow.Client` on one of the console's connections, so a page, the CLI, Python and SQL
all do the same thing. Every action is a POST with a CSRF token, answered first by a confirmation page (a
second POST, with ``confirm=yes``, runs it); ``--read-only`` refuses them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
import psycopg
from jinja2 import Environment
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..client import Client
from ..db.connection import without_dsn
from ..errors import PgflowError
from ..registry import REGISTRY
from ..statuses import OPEN_INSTANCE_STATUSES, InstanceStatus
from . import graph
from .app import Console, Q
from .security import COOKIE

PAGE_SIZE = 50
MAX_SHOWN_JSON = 100_000  # characters of an input, output or message shown before "truncated"
NEVER = 2**63 - 1  # an id bound no instance reaches


# ---------------------------------------------------------------------------------------------- rendering

def register_filters(env: Environment) -> None:
    env.filters["pretty"] = pretty_json
    env.filters["when"] = lambda t: "" if not t else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    env.filters["seconds"] = lambda s: "" if s is None or s == "" else graph._duration(float(s))


def pretty_json(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_SHOWN_JSON else text[:MAX_SHOWN_JSON] + f"\n… ({len(text):,} characters)"


def console_of(request: Request) -> Console:
    return request.app.state.console


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """A page, with the role it was read as, the CSRF token of this browser (the cookie is set on first
    visit) and the notice of a finished action."""
    console = console_of(request)
    cookie = request.cookies.get(COOKIE)
    fresh = cookie is None
    if fresh:
        cookie = console.csrf.new_cookie()
    who = context.get("who") or whoami(console)
    response = console.templates.TemplateResponse(request, template, {
        "read_only": console.read_only, "where": console.where, "who": who, "csrf": console.csrf.token(cookie),
        "notice": request.query_params.get("notice"), **context}, status_code=status_code)
    if fresh:
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", path="/")
    return response


@dataclass(frozen=True)
class Who:
    role: str
    sees_all: bool
    dead_letters: bool  # may read pgflow.dead_letters (the pgflow owner, pgflow_admin)


def whoami(console: Console) -> Who:
    with console.connection() as conn:
        return Who(*Q.one(conn, "whoami"))


def error_page(request: Request, status: int, message: str) -> Response:
    return render(request, "error.html", {"status": status, "message": message}, status_code=status)


# ---------------------------------------------------------------------------------------------- instances

def instances(request: Request) -> Response:
    """The instance list: filters, id search, keyset pagination (``before``), live rows (``partial=rows``)."""
    console = console_of(request)
    p = request.query_params
    if p.get("id"):
        if not p["id"].strip().isdigit():
            return error_page(request, 400, f"not an instance id: {p['id']!r}")
        return RedirectResponse(f"/instances/{int(p['id'])}", status_code=303)
    filters = {k: (p.get(k) or None) for k in ("status", "flow", "label", "since", "until")}
    if filters["status"] and filters["status"] not in set(InstanceStatus):
        return error_page(request, 400, f"unknown status {filters['status']!r}")
    try:
        before = int(p["before"]) if p.get("before") else None
        limit = min(max(int(p.get("limit") or PAGE_SIZE), 1), 500)
        since, until = (_parse_time(filters[k]) for k in ("since", "until"))
    except ValueError as exc:
        return error_page(request, 400, str(exc))
    with console.connection() as conn:
        who = Who(*Q.one(conn, "whoami"))
        mine = None if who.sees_all else who.role
        from_id = _id_at(conn, since, mine, NEVER) if since else None
        if until:
            until_id = _id_at(conn, until, mine, None)
            before = until_id if before is None or (until_id is not None and until_id < before) else before
        rows = Q.all_dicts(conn, "list_instances", {"status": filters["status"], "flow": filters["flow"],
                                              "label": filters["label"], "before": before, "from_id": from_id,
                                              "mine": mine, "limit": limit + 1})
        flows = [r["flow_name"] for r in Q.all_dicts(conn, "flow_names")]
    more = len(rows) > limit
    rows = rows[:limit]
    next_page = None
    if more:
        next_page = "/?" + urlencode({**{k: v for k, v in filters.items() if v}, "before": rows[-1]["id"],
                                      "limit": limit})
    context = {"who": who, "rows": rows, "filters": filters, "flows": flows, "statuses": list(InstanceStatus),
               "next_page": next_page, "paged": before is not None and not filters["until"]}
    if p.get("partial") == "rows":
        return render(request, "_instance_rows.html", context)
    return render(request, "instances.html", context)


def _parse_time(text: str | None) -> datetime | None:
    """A time filter from the form (ISO 8601; no zone means UTC)."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use YYYY-MM-DDTHH:MM)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _id_at(conn: psycopg.Connection, at: datetime, mine: str | None, none: int | None) -> int | None:
    """The id range's bound for a time filter (``none`` when no instance was created since ``at``)."""
    found = Q.value(conn, "first_instance_after", {"at": at, "mine": mine})
    return none if found is None else found


def instance(request: Request) -> Response:
    """One instance: graph, timeline, steps with errors and tracebacks, map progress, signals, timers,
    input and output, and the actions that apply. ``partial=live`` returns the part that live updates swap."""
    instance_id = int(request.path_params["id"])
    console = console_of(request)
    with console.connection() as conn:
        found = Q.all_dicts(conn, "instance", {"id": instance_id})
        if not found:
            return error_page(request, 404, f"no instance with id {instance_id}")
        inst = found[0]
        rows = {r["step_name"]: r for r in Q.all_dicts(conn, "step_rows", {"id": instance_id})}
        is_tree = "tree" in inst["shape"]
        nodes = Q.all_dicts(conn, "tree_nodes", {"id": instance_id}) if is_tree else []
        signals = Q.all_dicts(conn, "signals", {"id": instance_id})
    is_open = inst["status"] in OPEN_INSTANCE_STATUSES
    now = datetime.now(UTC)
    drawn = graph.tree_graph(nodes) if is_tree else graph.dag_graph(inst["shape"], rows, is_open)
    if is_tree:
        steps = [{**n, **_timing(rows.get(n["path"]))} for n in nodes if n["node_type"] in graph.LEAF_TYPES]
        timed = [rows[n["path"]] for n in nodes if n["node_type"] in graph.LEAF_TYPES and n["path"] in rows]
    else:
        steps = [_dag_step(s, rows.get(s["name"]), is_open) for s in inst["shape"]["steps"]]
        timed = list(rows.values())
    bars, span = graph.timeline(timed, inst["started_at"] or inst["created_at"], now)
    awaited = [n for n in nodes if n["node_type"] == "wait_signal" and n["status"] == "waiting"]
    timers = [n for n in nodes if n["node_type"] in ("sleep", "schedule", "wait_signal") and n["due_at"]
              and n["status"] == "waiting"]
    timers += [{"label": f"retry of {s['name']}", "due_at": s["due_at"]} for s in steps
               if not is_tree and s.get("status") == "retrying" and s.get("due_at")]
    context = {"inst": inst, "is_open": is_open, "is_tree": is_tree, "graph": drawn.as_json(), "steps": steps,
               "maps": [s for s in steps if s.get("tasks")], "bars": bars, "span": span,
               "timeline_width": graph.TIMELINE_WIDTH, "signals": signals, "awaited": awaited, "timers": timers}
    if request.query_params.get("partial") == "live":
        return render(request, "_instance_live.html", context)
    return render(request, "instance.html", context)


def _timing(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {}
    return {k: row[k] for k in ("queue", "enqueued_at", "started_at", "finished_at", "traceback", "tasks",
                                 "tasks_completed", "tasks_failed", "tasks_running")}


def _dag_step(step: dict[str, Any], row: dict[str, Any] | None, is_open: bool) -> dict[str, Any]:
    """One line of a DAG instance's step table."""
    base = {"name": step["name"], "path": step["name"], "kind": step.get("kind"), "over": step.get("over"),
            "sql": step.get("sql"), "label": step["name"]}
    if row is None:
        return {**base, "status": "pending" if is_open else "skipped"}
    is_map = step.get("over") is not None
    return {**base, **_timing(row), "status": row["status"], "error": row["error"],
            "attempts": row["task_attempts"] if is_map else row["attempts"], "failed_task": row["failed_task"],
            "due_at": row["due_at"]}


# ---------------------------------------------------------------------------------------------- flows

def flows(request: Request) -> Response:
    console = console_of(request)
    with console.connection() as conn:
        versions = Q.all_dicts(conn, "flows")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for v in versions:
        by_name.setdefault(v["flow_name"], []).append(v)
    code = sorted(REGISTRY)
    return render(request, "flows.html", {"flows": by_name, "code_flows": code})


def flow(request: Request) -> Response:
    console = console_of(request)
    name, version = request.path_params["name"], request.path_params["version"]
    with console.connection() as conn:
        found = Q.all_dicts(conn, "flow", {"flow": name, "version": version})
    if not found:
        return error_page(request, 404, f"no flow {name!r} version {version!r}")
    f = found[0]
    shape = f["shape"]
    drawn = graph.tree_graph(graph.shape_tree_nodes(shape["tree"])) if "tree" in shape else graph.dag_graph(shape)
    return render(request, "flow.html", {"flow": f, "graph": drawn.as_json(), "steps": shape.get("steps", []),
                                         "tree": shape.get("tree")})


# ---------------------------------------------------------------------------------------------- queues

def queues(request: Request) -> Response:
    console = console_of(request)
    who = whoami(console)
    with console.connection() as conn:
        stats = Q.all_dicts(conn, "queue_stats")
        processes = Q.all_dicts(conn, "engine_processes")
        letters = {r["queue"]: r for r in Q.all_dicts(conn, "dead_letter_counts")} if who.dead_letters else None
    for s in stats:
        s["rates"] = console.throughput.rates(s["queue"])[-36:]
        s["per_minute"] = console.throughput.per_minute(s["queue"])
        s["spark"] = _sparkline(s["rates"])
    workers = [p for p in processes if p["kind"] == "worker"]
    return render(request, "queues.html", {"who": who, "stats": stats, "processes": processes, "workers": workers,
                                           "letters": letters})


def _sparkline(rates: list[float], width: float = 180.0, height: float = 28.0) -> str:
    """SVG polyline points of a rate series (0 at the bottom)."""
    if len(rates) < 2:
        return ""
    top = max(max(rates), 1e-9)
    step = width / (len(rates) - 1)
    return " ".join(f"{i * step:.1f},{height - r / top * (height - 2):.1f}" for i, r in enumerate(rates))


def dead_letters(request: Request) -> Response:
    console = console_of(request)
    who = whoami(console)
    if not who.dead_letters:
        return render(request, "dead_letters.html", {"who": who, "allowed": False, "letters": []})
    before = request.query_params.get("before")
    with console.connection() as conn:
        letters = Q.all_dicts(conn, "dead_letters", {"before": int(before) if before and before.isdigit() else None,
                                               "limit": PAGE_SIZE + 1})
    more = len(letters) > PAGE_SIZE
    letters = letters[:PAGE_SIZE]
    return render(request, "dead_letters.html", {
        "who": who, "allowed": True, "letters": letters,
        "next_page": f"/dead-letters?before={letters[-1]['id']}" if more else None})


# ---------------------------------------------------------------------------------------------- actions

@dataclass
class Action:
    """A confirmed POST: what it does in words, the fields it carries, and how to run it (on a connection,
    returning where to go and the notice to show there)."""

    title: str
    description: str
    run: Callable[[psycopg.Connection], tuple[str, str]]
    fields: dict[str, str] = field(default_factory=dict)
    danger: bool = False


async def act(request: Request, make: Callable[[Request, dict[str, str]], Action]) -> Response:
    """The one path of every action: read-only and CSRF checks, then the confirmation page or the action."""
    console = console_of(request)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if console.read_only:
        return error_page(request, 403, "this console is read-only (pgflow console --read-only)")
    own_origin = f"{request.url.scheme}://{request.url.netloc}"
    if not console.csrf.valid(request.cookies.get(COOKIE), form.get("csrf"), request.headers.get("origin"),
                              own_origin):
        return error_page(request, 403, "this form has expired or did not come from this console: reload the page")
    try:
        action = make(request, form)
    except ValueError as exc:
        return error_page(request, 400, str(exc))
    if form.get("confirm") != "yes":
        return render(request, "confirm.html", {"action": action, "target": request.url.path,
                                                "back": _back(request.url.path)})
    return await _run(request, action)


def _back(path: str) -> str:
    """The page an action was asked from: /instances/5/retry -> /instances/5, /start -> /flows."""
    if path.startswith("/instances/"):
        return path.rsplit("/", 1)[0]
    return "/dead-letters" if path.startswith("/dead-letters/") else "/flows"


async def _run(request: Request, action: Action) -> Response:
    from starlette.concurrency import run_in_threadpool

    console = console_of(request)

    def run() -> tuple[str, str]:
        with console.connection() as conn:
            return action.run(conn)

    try:
        target, notice = await run_in_threadpool(run)
    except PgflowError as exc:
        status = 404 if "no instance" in str(exc) or "no dead letter" in str(exc) or "no registered" in str(exc) \
            else 409
        if "may not" in str(exc) or "permission denied" in str(exc):
            status = 403
        return error_page(request, status, without_dsn(str(exc), console.dsn))
    except psycopg.errors.InsufficientPrivilege as exc:
        return error_page(request, 403, f"the console's role may not do this: {exc.diag.message_primary}")
    except psycopg.Error as exc:
        return error_page(request, 409, without_dsn(exc.diag.message_primary or str(exc), console.dsn))
    sep = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{sep}{urlencode({'notice': notice})}", status_code=303)


def _client() -> Client:
    return Client(pool=False)  # every call gets the console's connection (conn=)


def _json_field(form: dict[str, str], name: str) -> Any:
    text = (form.get(name) or "").strip()
    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None


def cancel_action(request: Request, form: dict[str, str]) -> Action:
    iid = int(request.path_params["id"])
    reason = form.get("reason") or None

    def run(conn: psycopg.Connection) -> tuple[str, str]:
        outcome = _client().cancel(iid, reason, conn=conn)
        return f"/instances/{iid}", (f"instance {iid} cancelled" if outcome == InstanceStatus.CANCELLED
                                     else f"instance {iid} had already ended ({outcome})")

    return Action(f"Cancel instance {iid}?", "Its unfinished steps are cancelled and their queued messages "
                  "archived unrun; completed steps keep their outputs. This cannot be undone.", run,
                  {"reason": reason or ""}, danger=True)


def retry_action(request: Request, form: dict[str, str]) -> Action:
    iid = int(request.path_params["id"])

    def run(conn: psycopg.Connection) -> tuple[str, str]:
        _client().retry(iid, conn=conn)
        return f"/instances/{iid}", f"instance {iid} retried from its failed steps"

    return Action(f"Retry instance {iid} from its failed steps?", "The instance runs again: its failed (and "
                  "cancelled) steps get fresh attempts, completed steps keep their outputs and are not run "
                  "again.", run)


def signal_action(request: Request, form: dict[str, str]) -> Action:
    iid = int(request.path_params["id"])
    name = (form.get("name") or "").strip()
    if not name:
        raise ValueError("a signal needs a name")
    data = _json_field(form, "data")

    def run(conn: psycopg.Connection) -> tuple[str, str]:
        _client().signal(iid, name, data, conn=conn)
        return f"/instances/{iid}", f"signal {name!r} sent to instance {iid}"

    return Action(f"Send signal {name!r} to instance {iid}?",
                  f"A wait for {name!r} receives this data: {orjson.dumps(data).decode()[:500]}", run,
                  {"name": name, "data": form.get("data") or ""})


def start_action(request: Request, form: dict[str, str]) -> Action:
    """Start a registered flow version (``flow`` + ``version``), or a DAG flow the console process imported
    (``code`` names it in the registry)."""
    data = _json_field(form, "input")
    label = (form.get("label") or "").strip() or None
    code, flow_name, version = form.get("code") or None, form.get("flow") or None, form.get("version") or None
    if code:
        if code not in REGISTRY:
            raise ValueError(f"no flow {code!r} in this console process (pgflow console --import MODULE)")
        what = f"flow {code} from the console's imported code"
    elif flow_name:
        what = f"flow {flow_name}" + (f" version {version}" if version else " (its newest version)")
    else:
        raise ValueError("name a flow to start")

    def run(conn: psycopg.Connection) -> tuple[str, str]:
        if code:
            handle = _client().start(REGISTRY[code], data, label=label, conn=conn)
        else:
            handle = _client().start_registered(flow_name, data, version=version, label=label, conn=conn)
        return f"/instances/{handle.id}", f"instance {handle.id} started"

    return Action(f"Start {what}?", f"Input: {orjson.dumps(data).decode()[:500]}"
                  + (f"; label {label!r}" if label else ""), run,
                  {"code": code or "", "flow": flow_name or "", "version": version or "", "input": form.get("input")
                   or "", "label": label or ""})


def dead_letter_action(kind: str) -> Callable[[Request, dict[str, str]], Action]:
    def make(request: Request, form: dict[str, str]) -> Action:
        did = int(request.path_params["id"])

        def run(conn: psycopg.Connection) -> tuple[str, str]:
            if kind == "requeue":
                msg = _client().requeue_dead_letter(did, conn=conn)
                return "/dead-letters", f"dead letter {did} requeued as message {msg}"
            _client().discard_dead_letter(did, conn=conn)
            return "/dead-letters", f"dead letter {did} discarded"

        if kind == "requeue":
            return Action(f"Requeue dead letter {did}?", "Its message goes back on its queue as it was; a worker "
                          "reads it again (and puts it aside again if it still cannot run).", run)
        return Action(f"Discard dead letter {did}?", "The record and its message are deleted for good.", run,
                      danger=True)

    return make


def not_found(request: Request, exc: HTTPException) -> Response:
    return error_page(request, exc.status_code, exc.detail or "not found")
