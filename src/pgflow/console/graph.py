"""What the instance and flow pages draw, computed from rows (no I/O): the graph of a DAG or of a
control-flow tree as nodes and edges (laid out and drawn by static/console.js), and the timeline (Gantt) of
an instance's steps as bars.

A map is one node with its progress (done/total), never one node per task, and a composite node with more
than :data:`COLLAPSE_AT` children shows them as one summary node: a 1,000-wide map or join draws a handful
of SVG elements, so the page stays responsive whatever the width.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

COLLAPSE_AT = 40  # a tree node with more children than this shows them as one summary node
LEAF_TYPES = frozenset({"sql", "python", "http", "sleep", "schedule", "wait_signal"})


@dataclass
class Node:
    """One box of the graph."""

    id: str
    label: str
    kind: str
    status: str
    attempts: int | None = None
    tasks: int = 0  # map tasks, or the leaves a summary node stands for
    done: int = 0
    failed: int = 0
    running: int = 0
    error: str | None = None
    detail: str | None = None  # a tooltip line: the full label, a due time...


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"nodes": [asdict(n) for n in self.nodes], "edges": [list(e) for e in self.edges]}


def dag_graph(shape: dict[str, Any], rows: dict[str, dict[str, Any]] | None = None,
              instance_open: bool = True) -> Graph:
    """A DAG flow's steps as nodes, dependencies as edges. With ``rows`` (step name -> its row aggregate,
    console.sql step_rows) each node carries its status, attempts and map progress; a step without a row is
    'pending' while the instance is open and 'skipped' once it has ended (as pgflow.instance_nodes says).
    Without ``rows`` (a flow's page) every node is drawn as 'shape'."""
    graph = Graph()
    for step in shape.get("steps", []):
        row = None if rows is None else rows.get(step["name"])
        is_map = step.get("over") is not None
        kind = step.get("kind", "python") + (" map" if is_map else "")
        if row is None:
            status = "shape" if rows is None else "pending" if instance_open else "skipped"
            node = Node(step["name"], step["name"], kind, status)
        else:
            node = Node(step["name"], step["name"], kind, row["status"] or "pending",
                        attempts=row["task_attempts"] if is_map else row["attempts"], tasks=row["tasks"],
                        done=row["tasks_completed"], failed=row["tasks_failed"], running=row["tasks_running"],
                        error=row["error"])
        if is_map:
            node.detail = f"map over {step['over']}" + (" (flattened)" if step.get("flatten") else "")
        graph.nodes.append(node)
        sources = list(step.get("deps", []))
        if is_map and step["over"] != "input" and step["over"] not in sources:
            sources.append(step["over"])
        graph.edges += [(d, step["name"]) for d in sources]
    return graph


def tree_graph(nodes: list[dict[str, Any]]) -> Graph:
    """A control-flow workflow's nodes (pgflow.instance_nodes rows, in display order) as a tree; the
    children of a node with more than COLLAPSE_AT of them become one summary node counting their leaves."""
    graph = Graph()
    children: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        children.setdefault(_parent(n["path"]), []).append(n)
    collapsed: set[str] = set()  # paths under a summary node
    for n in nodes:
        path = n["path"]
        if any(path.startswith(c + ".") for c in collapsed):
            continue
        graph.nodes.append(Node(path, n["label"], n["node_type"], n["status"], attempts=n.get("attempts"),
                                error=n.get("error"),
                                detail=f"due {n['due_at']:%Y-%m-%d %H:%M:%S}" if n.get("due_at") else None))
        if path != "r":
            graph.edges.append((_parent(path), path))
        kids = children.get(path, [])
        if len(kids) > COLLAPSE_AT:
            collapsed.add(path)
            graph.nodes.append(_summary(path, kids, nodes))
            graph.edges.append((path, path + ".*"))
    return graph


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _summary(path: str, kids: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> Node:
    """One node standing for all of ``path``'s children: how many of the leaves below are done, failed,
    running."""
    leaves = [n for n in nodes if n["path"].startswith(path + ".") and n["node_type"] in LEAF_TYPES]
    counts = Counter(n["status"] for n in leaves)
    open_ = sum(counts[s] for s in ("queued", "running", "retrying", "waiting"))
    status = "failed" if counts["failed"] else "running" if open_ else (
        "completed" if leaves and counts["completed"] + counts["skipped"] == len(leaves) else "pending")
    return Node(path + ".*", f"{len(kids)} branches", "group", status, tasks=len(leaves),
                done=counts["completed"], failed=counts["failed"], running=open_,
                detail=f"{len(kids)} children of {path}, {len(leaves)} leaves")


# ---------------------------------------------------------------------------------------------- timeline

@dataclass(frozen=True)
class Bar:
    """One step on the timeline: waiting in its queue from ``queued_x``, running from ``x`` for ``width``."""

    label: str
    status: str
    queued_x: float
    x: float
    width: float
    text: str


TIMELINE_WIDTH = 760.0


def timeline(rows: list[dict[str, Any]], start: datetime, now: datetime) -> tuple[list[Bar], float]:
    """Bars for the rows that have started (in start order) on a scale from ``start`` to the last finish
    (or ``now`` while something runs); returns the bars and the span in seconds."""
    started = sorted((r for r in rows if r.get("started_at")), key=lambda r: (r["started_at"], r["step_name"]))
    if not started:
        return [], 0.0
    end = max((r["finished_at"] or now) for r in started)
    span = max((end - start).total_seconds(), 1e-3)

    def x(t: datetime) -> float:
        return round(max(0.0, (t - start).total_seconds()) / span * TIMELINE_WIDTH, 1)

    bars = []
    for r in started:
        finished = r["finished_at"] or now
        seconds = (finished - r["started_at"]).total_seconds()
        queued = r.get("enqueued_at") or r["started_at"]
        bars.append(Bar(r["step_name"], r["status"] or "running", x(min(queued, r["started_at"])),
                        x(r["started_at"]), max(1.0, round(x(finished) - x(r["started_at"]), 1)),
                        _duration(seconds) + ("" if r["finished_at"] else " so far")))
    return bars, span


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def shape_tree_nodes(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """A control-flow workflow's stored tree as the rows :func:`tree_graph` draws (for a flow's page, where
    there is no instance): path, type and a short label per node, status 'shape'."""
    found: list[dict[str, Any]] = []

    def walk(node: dict[str, Any], path: str) -> None:
        kind = node.get("t", "?")
        detail = node.get("name") or node.get("fn") or node.get("cron") or node.get("url") or node.get("sql") or ""
        label = f"{kind}: {' '.join(str(detail).split())}" if detail else kind
        found.append({"path": path, "node_type": kind, "label": label[:80], "status": "shape"})
        for i, child in enumerate(node.get("c") or []):
            walk(child, f"{path}.{i}")

    walk(tree, "r")
    return found
