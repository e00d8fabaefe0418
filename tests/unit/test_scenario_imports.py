"""Loading and validating a scenario is pure: no gRPC, no process control.

``orchestrator.scenario._validate`` runs the role and churn checks of
``orchestrator.checks``; it must not pull in the gRPC servicer, the adversary
view and collusion server, the churn restarter or the runner. Checked in a fresh
interpreter, over every file in ``scenarios/``.
"""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
OURS = ("orchestrator", "fednode", "attacks", "proto")

# Modules that talk to the network or start/supervise processes.
FORBIDDEN = {
    "grpc", "mpi4py", "proto.byzfed", "attacks.collusion",
    "orchestrator.adversary", "orchestrator.churn", "orchestrator.launch", "orchestrator.runner", "orchestrator.servicer",
    "orchestrator.coordinator", "orchestrator.collective", "orchestrator.__main__",
    "fednode.node", "fednode.client", "fednode.byzantine",
}
# Standard or third-party modules that none of *our* modules loaded by validation may import.
FORBIDDEN_IMPORTS = {"grpc", "subprocess", "multiprocessing", "mpi4py", "signal"}

CODE = """
import json, pathlib, sys
from orchestrator import scenario
files = sorted(pathlib.Path("scenarios").glob("*.toml"))
assert files, "no scenario files"
for path in files:
    scenario.load(path)
print(json.dumps({"files": [str(p) for p in files],
                  "modules": {m: getattr(sys.modules[m], "__file__", None) for m in sorted(sys.modules)}}))
"""


def _loaded() -> dict:
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _top_imports(path: str) -> set[str]:
    """Top-level names of every absolute import in a module's source."""
    out = set()
    for node in ast.walk(ast.parse(pathlib.Path(path).read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_loading_every_scenario_imports_neither_grpc_nor_process_control():
    got = _loaded()
    assert len(got["files"]) >= 1
    modules = got["modules"]
    bad = sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"scenario.load imported {bad}"
    assert "orchestrator.checks" in modules  # the checks did run
    for name, path in modules.items():
        if name.split(".")[0] in OURS and path and path.endswith(".py"):
            hits = _top_imports(path) & FORBIDDEN_IMPORTS
            assert not hits, f"{name} (loaded by scenario validation) imports {sorted(hits)}"


def test_checks_are_re_exported_where_they_used_to_live():
    import importlib
    import importlib.util

    from orchestrator import adversary, checks

    assert adversary.check_roles is checks.check_roles
    assert adversary.effective_knowledge is checks.effective_knowledge
    if importlib.util.find_spec("orchestrator.churn") is not None:  # folded into orchestrator.launch
        churn = importlib.import_module("orchestrator.churn")
        assert churn.check_churn is checks.check_churn
        assert churn.idle_mode is checks.idle_mode
