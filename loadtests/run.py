"""pgflow load tests: one scenario per module in loadtests/scenarios/, each against a fresh database, with its
baseline measured in the same run and a JSON result (and a PNG plot) in loadtests/results/ (git-ignored; the
figures the READMEs quote are kept in loadtests/baselines/).

    python loadtests/run.py SCENARIO [options]      python loadtests/run.py SCENARIO --help

Without --dsn (or PGFLOW_DSN) the embedded PostgreSQL under PGFLOW_HOME is used; set PGFLOW_HOME to a
directory of your own (e.g. /tmp/pgflow-bench-home) not to share a server with the test suite. These are
measurements, not tests: they assert nothing, but print each figure against its target.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
NAMES = sorted(p.stem for p in SCENARIOS.glob("*.py") if p.stem != "__init__")


def summary(name: str) -> str:
    """The first line of a scenario's docstring, read without importing it (imports may need extras)."""
    doc = ast.get_docstring(ast.parse((SCENARIOS / f"{name}.py").read_text())) or ""
    return doc.split("\n")[0]


def usage() -> str:
    width = max(map(len, NAMES))
    return __doc__ + "\nScenarios:\n" + "\n".join(f"  {n:<{width}}  {summary(n)}" for n in NAMES)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in NAMES:
        print(f"unknown scenario {argv[0]!r}; one of: {', '.join(NAMES)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"scenarios.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
