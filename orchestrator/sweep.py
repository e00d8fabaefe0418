"""Sweeps: a base scenario, axes over any scenario keys, one real run per cell.

A sweep file (TOML)::

    name = "smoke"                        # default: the file's stem
    base = "../scenarios/demo.toml"       # a scenario file (relative to this file), or a [base] table
    set = ["federation.rounds=3"]         # --set values every cell gets (optional)
    timeout = 600                         # seconds per cell (default 1800)
    exclude = [{ defense = "krum", attack = "alie" }]   # partial cells to leave out
    include = [{ defense = "median" }]    # if given: only cells matching one of these

    [axes]
    seed = [0, 1]                         # shorthand: the axis name is the scenario key

    [axes.defense]                        # an axis over one key
    key = "defense.name"
    values = ["median", "krum"]

    [axes.attack]                         # an axis whose values set several keys each
    values = [
      { label = "alie", set = { "roles.byz.attack" = "alie" } },
      { label = "ipm",  set = { "roles.byz.attack" = "ipm", "roles.byz.attack_params" = { epsilon = 0.5 } } },
    ]

The grid is the product of the axes in file order. A cell is exactly the base scenario plus
``--set`` values (the sweep's ``set``, then each axis value's), the same mechanism as
``python -m orchestrator run --set``, so role keys are addressed by the role's name
(``roles.<name>.<key>``). Its id names the axes that vary (``defense=krum__attack=alie``),
filesystem-safe; its folder ``DIR/cells/<id>`` is the run's ``--run-dir`` and holds
``cell.json`` (labels, sets, command, status) and ``cell.log`` (the run's output).

Cells run as real ``python -m orchestrator run`` subprocesses, K at a time
(:func:`plan_parallel`); a failed or timed-out cell is recorded and the sweep goes on;
processes are stopped by PID. ``--resume`` skips cells whose ``cell.json`` says ``ok`` for
the same base and sets. ``DIR/results.csv`` has one row per cell; ``DIR/report.md`` is
written by :mod:`orchestrator.report`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .labels import (RESULT_COLUMNS, attack_label, byzantine_names, defense_label, read_rows, safe_id,
                     selects_clients)
from .scenario import ScenarioError, load

STATUSES = ("ok", "failed", "timeout", "invalid", "interrupted", "pending")
DEFAULT_TIMEOUT = 1800.0
class SweepError(ValueError):
    """A sweep file is invalid; the message names the key."""


# ----- the grid -------------------------------------------------------------------------------------------------
def toml_value(v: Any) -> str:
    """``v`` as one TOML value (what ``--set key=<value>`` reads back to ``v``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # (JSON's escapes are TOML basic-string escapes)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise SweepError(f"{v!r} cannot be written as a TOML value")


def toml_document(table: dict[str, Any]) -> str:
    """A scenario table as a TOML file: one ``key = <inline value>`` line per top-level key."""
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in table.items())


def _label_of(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        return ",".join(f"{k}={_label_of(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "+".join(_label_of(x) for x in v)
    return toml_value(v)





@dataclass(frozen=True)
class AxisValue:
    label: str
    sets: tuple[str, ...]


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[AxisValue, ...]

    def labels(self) -> list[str]:
        return [v.label for v in self.values]


@dataclass(frozen=True)
class Cell:
    id: str
    labels: tuple[tuple[str, str], ...]
    """``(axis name, value label)`` for every axis, in axis order."""
    sets: tuple[str, ...]

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class Sweep:
    name: str
    base: str
    """The base scenario as a TOML document (a copy of the file, or the inline table written out)."""
    axes: tuple[Axis, ...]
    sets: tuple[str, ...] = ()
    include: tuple[dict[str, tuple[str, ...]], ...] = ()
    exclude: tuple[dict[str, tuple[str, ...]], ...] = ()
    timeout: float = DEFAULT_TIMEOUT

    def cells(self) -> list[Cell]:
        """Every cell of the grid (product of the axes), filtered by include/exclude; ids name the
        axes with more than one value (``base`` when none varies)."""
        varied = {a.name for a in self.axes if len(a.values) > 1}
        out, seen = [], set()
        for combo in itertools.product(*(a.values for a in self.axes)):
            labels = tuple((a.name, v.label) for a, v in zip(self.axes, combo))
            d = dict(labels)
            if self.include and not any(_matches(d, m) for m in self.include):
                continue
            if any(_matches(d, m) for m in self.exclude):
                continue
            text = "__".join(f"{n}={lab}" for n, lab in labels if n in varied) or "base"
            cid = safe_id(text)
            if cid in seen:  # two labels that differ only in unsafe characters
                cid = safe_id(f"{cid}-{hashlib.sha1(text.encode()).hexdigest()[:8]}")
            seen.add(cid)
            out.append(Cell(cid, labels, tuple(self.sets) + tuple(s for v in combo for s in v.sets)))
        return out

    @property
    def base_hash(self) -> str:
        return hashlib.sha256(self.base.encode()).hexdigest()[:16]


def _matches(labels: dict[str, str], partial: dict[str, tuple[str, ...]]) -> bool:
    return all(labels.get(k) in allowed for k, allowed in partial.items())


def _axis(name: str, spec: Any) -> Axis:
    where = f"axes.{name}"
    if isinstance(spec, list):
        spec = {"key": name, "values": spec}
    if not isinstance(spec, dict):
        raise SweepError(f"{where} must be a list of values or a table with values (and key), got {spec!r}")
    unknown = set(spec) - {"key", "values"}
    if unknown:
        raise SweepError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed keys: key, values")
    values, key = spec.get("values"), spec.get("key")
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}.values must be a non-empty list")
    if key is not None and not isinstance(key, str):
        raise SweepError(f"{where}.key must be a scenario key such as 'defense.name', got {key!r}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, dict) and ("set" in v or "label" in v or "value" in v):
            bad = set(v) - {"label", "set", "value"}
            if bad:
                raise SweepError(f"{where}.values[{i}]: unknown key {sorted(bad)[0]!r}; allowed keys: label, set, value")
            table = dict(v.get("set") or {})
            if "value" in v:
                if key is None:
                    raise SweepError(f"{where}.values[{i}] has a value but the axis has no key")
                table = {key: v["value"], **table}
            if not table:
                raise SweepError(f"{where}.values[{i}] sets nothing: give set = {{ \"section.key\" = value, ... }}")
            label = v.get("label")
            if label is None:
                if "value" not in v:
                    raise SweepError(f"{where}.values[{i}] needs a label (it names the cell)")
                label = _label_of(v["value"])
            sets = tuple(f"{k}={toml_value(x)}" for k, x in table.items())
        else:
            if key is None:
                raise SweepError(f"{where}.values[{i}] = {v!r}: an axis of plain values needs key = 'section.key'")
            label, sets = _label_of(v), (f"{key}={toml_value(v)}",)
        out.append(AxisValue(str(label), sets))
    labels = [v.label for v in out]
    dup = next((lab for lab in labels if labels.count(lab) > 1), None)
    if dup is not None:
        raise SweepError(f"{where}: the label {dup!r} names two values")
    return Axis(name, tuple(out))


def _partials(key: str, raw: Any, axes: Sequence[Axis]) -> tuple[dict[str, tuple[str, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(m, dict) and m for m in raw):
        raise SweepError(f"{key} must be a list of partial cells, e.g. [{{ defense = \"krum\", attack = \"alie\" }}]")
    by_name = {a.name: a for a in axes}
    out = []
    for i, m in enumerate(raw):
        entry = {}
        for name, want in m.items():
            if name not in by_name:
                raise SweepError(f"{key}[{i}].{name}: no such axis; axes: {', '.join(by_name)}")
            wants = [want] if not isinstance(want, list) else want
            labels = [w if isinstance(w, str) else _label_of(w) for w in wants]
            for lab in labels:
                if lab not in by_name[name].labels():
                    raise SweepError(f"{key}[{i}].{name} = {lab!r} is no value of axis {name!r}; values: "
                                     f"{', '.join(map(repr, by_name[name].labels()))}")
            entry[name] = tuple(labels)
        out.append(entry)
    return tuple(out)


def parse_sweep(raw: dict[str, Any], where: Path = Path("."), default_name: str = "sweep") -> Sweep:
    """A sweep from its TOML table; ``where``: the folder a relative ``base`` path is read from."""
    allowed = {"name", "base", "set", "timeout", "axes", "include", "exclude"}
    bad = set(raw) - allowed
    if bad:
        raise SweepError(f"unknown key {sorted(bad)[0]!r}; allowed top-level keys: {', '.join(sorted(allowed))}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or safe_id(name) != name:
        raise SweepError(f"name = {name!r} must be a non-empty name of letters, digits and . _ = , + -")
    base = raw.get("base")
    if isinstance(base, str):
        p = (where / base) if not Path(base).is_absolute() else Path(base)
        try:
            text = p.read_text(encoding="utf-8-sig")
            table = tomllib.loads(text)
        except OSError as exc:
            raise SweepError(f"base = {base!r}: cannot read {p}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SweepError(f"base = {base!r}: {p} is not valid TOML: {exc}") from None
        if "name" not in table:  # the scenario's name stays the file's, as `run` would name it
            text = f"name = {json.dumps(p.stem)}\n" + text
    elif isinstance(base, dict):
        text = toml_document(base)
    else:
        raise SweepError("base must be a scenario file path or a [base] table of scenario sections")
    sets = raw.get("set", [])
    if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
        raise SweepError("set must be a list of 'section.key=value' strings")
    timeout = raw.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise SweepError(f"timeout = {timeout!r} must be a number of seconds > 0")
    axes_raw = raw.get("axes", {})
    if not isinstance(axes_raw, dict):
        raise SweepError("axes must be a table: [axes] name = [values] or [axes.NAME] key/values")
    axes = tuple(_axis(n, s) for n, s in axes_raw.items())
    for a in axes:
        if a.name in RESULT_COLUMNS or safe_id(a.name) != a.name:
            raise SweepError(f"axes.{a.name}: an axis name must be a plain word (letters, digits, . _ -) "
                             f"and not one of results.csv's columns ({', '.join(RESULT_COLUMNS)})")
    return Sweep(name=name, base=text, axes=axes, sets=tuple(sets), timeout=float(timeout),
                 include=_partials("include", raw.get("include"), axes),
                 exclude=_partials("exclude", raw.get("exclude"), axes))


def load_sweep(path: str | Path) -> Sweep:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise SweepError(f"sweep file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{p}: not valid TOML: {exc}") from None
    return parse_sweep(raw, p.parent, p.stem)


# ----- cores ------------------------------------------------------------------------------------------------------
def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def plan_parallel(requested: int, cores: int, fixed_slots: int = 0) -> tuple[int, int, str]:
    """``(K, train_slots per cell, note)``. A cell needs its training slots (each node computes
    with one torch thread, at most ``federation.train_slots`` at once) plus one core for its
    orchestrator, so K cells fit when ``K * (slots + 1) <= cores``: K <= cores // 2 with one
    slot each; the cores left over go to the cells' slots (``cores // K - 1``). A scenario that
    fixes ``train_slots`` bounds K by ``cores // (train_slots + 1)``."""
    requested = max(1, int(requested))
    per_cell = (fixed_slots or 1) + 1
    k_max = max(1, cores // per_cell)
    k = min(requested, k_max)
    note = "" if k == requested else (f"--parallel {requested} would oversubscribe {cores} cores "
                                      f"({per_cell} per cell: training slots + orchestrator); running {k} at a time")
    slots = fixed_slots or max(1, cores // k - 1)
    return k, slots, note


# ----- running cells ----------------------------------------------------------------------------------------------
def default_command() -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run"]


def mpi_command(np: int, hostfile: Optional[str] = None, mpirun_args: str = "") -> list[str]:
    """The argv that runs one cell as one ``mpirun`` job (``./launch.sh mpi``; README "Running
    across machines with mpirun"): rank 0 the orchestrator, the next ``aggregation.ranks - 1``
    aggregation ranks, the rest node hosts, on the hostfile's machines."""
    if int(np) < 2:
        raise SweepError(f"--mpi needs at least 2 ranks (the orchestrator and a node host), got {np}")
    if hostfile is not None and not Path(hostfile).is_file():
        raise SweepError(f"--hostfile {hostfile}: no such file")
    cmd = [str(Path(__file__).resolve().parents[1] / "launch.sh"), "mpi", "-np", str(int(np))]
    if hostfile is not None:
        cmd += ["--hostfile", str(Path(hostfile).resolve())]
    extra = shlex.split(mpirun_args)
    if extra:
        cmd += ["--", *extra, "--"]
    return cmd


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (/proc/PID/stat field 22): with the PID, its identity."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """``(pid, start time)`` of ``pid``'s descendants (Linux /proc), so that none outlives a stopped cell."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            started = _start_time(c)
            if started is not None:
                out.append((c, started))
            todo.append(c)
    return out


def stop_processes(procs: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """Stop cells by PID: SIGINT to each (its orchestrator stops its nodes by PID and exits);
    a cell still there after ``grace`` seconds is SIGKILLed, and then so is every descendant it
    had that is still the same process (PID and start time). Nothing is signalled by name."""
    alive = [p for p in procs if p.poll() is None]
    families = {p.pid: _descendants(p.pid) for p in alive}
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
            continue
        except subprocess.TimeoutExpired:
            pass
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid, started in families[p.pid]:
            if _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    stop_processes([proc], grace)


def rounds_short(cell_dir: Path) -> Optional[str]:
    """Why a cell that exited 0 did not finish its run, or None: it ran fewer rounds than
    its scenario asked for, or completed none (e.g. every node evicted on an overloaded
    machine). Rounds abandoned on the way count as run: a scenario's churn may mean them."""
    try:
        want = int(json.loads((cell_dir / "scenario.json").read_text())["federation"]["rounds"])
        summary = json.loads((cell_dir / "summary.json").read_text())
        done = int(summary.get("rounds_completed") or 0)
        ran = done + int(summary.get("rounds_abandoned") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if ran >= want and done > 0:
        return None
    return f"completed {done} of {want} rounds ({ran} run; see summary.json and metrics.jsonl)"


@dataclass
class _Running:
    cell: Cell
    proc: subprocess.Popen
    log: Any
    started: float
    deadline: float


class SweepRunner:
    """Runs a sweep's cells into ``out``; ``command``: the argv that runs one scenario
    (``SCENARIO --run-dir DIR --set k=v ...`` is appended; a fake one in unit tests)."""

    def __init__(self, sweep: Sweep, out: Path, parallel: int = 1, resume: bool = False,
                 command: Optional[list[str]] = None, timeout: Optional[float] = None,
                 on_event: Optional[Callable[[str, dict[str, Any]], None]] = None, cores: Optional[int] = None,
                 validate: bool = True) -> None:
        self.sweep, self.out, self.resume = sweep, Path(out), resume
        self.command = list(command or default_command())
        self.timeout = float(timeout or sweep.timeout)
        self.on_event = on_event or (lambda kind, info: None)
        self.validate = validate
        self.cells = sweep.cells()
        fixed = _fixed_slots(sweep)
        self.parallel, self.slots, self.note = plan_parallel(parallel, cores or usable_cores(), fixed)
        self.extra_sets = () if fixed else (f"federation.train_slots={self.slots}",)
        self.rows: dict[str, dict[str, Any]] = {}
        self.durations: list[float] = []

    # -- files
    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.id

    def _record(self, cell: Cell) -> dict[str, Any]:
        return {"id": cell.id, "labels": cell.label_dict, "sets": list(cell.sets),
                "runtime_sets": list(self.extra_sets), "base_sha256": self.sweep.base_hash}

    def _finished(self, cell: Cell) -> Optional[dict[str, Any]]:
        p = self.cell_dir(cell) / "cell.json"
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        same = rec.get("base_sha256") == self.sweep.base_hash and rec.get("sets") == list(cell.sets)
        return rec if same else None

    def prepare(self) -> list[Cell]:
        """Folders, ``sweep.json``, ``base.toml``; the cells still to run (resume skips finished ones)."""
        cells_dir = self.out / "cells"
        if cells_dir.exists() and any(cells_dir.iterdir()) and not self.resume:
            raise SweepError(f"{self.out} already holds a sweep; pass --resume to continue it or --out for a new one")
        cells_dir.mkdir(parents=True, exist_ok=True)
        (self.out / "base.toml").write_text(self.sweep.base)
        (self.out / "sweep.json").write_text(json.dumps({
            "name": self.sweep.name, "axes": [{"name": a.name, "values": [dataclasses.asdict(v) for v in a.values]}
                                              for a in self.sweep.axes],
            "set": list(self.sweep.sets), "include": list(self.sweep.include), "exclude": list(self.sweep.exclude),
            "timeout": self.timeout, "parallel": self.parallel, "train_slots": self.slots,
            "cells": [c.id for c in self.cells]}, indent=2) + "\n")
        todo = []
        for cell in self.cells:
            rec = self._finished(cell) if self.resume else None
            if rec is not None and rec.get("status") == "ok":
                self.rows[cell.id] = cell_row(self.cell_dir(cell), cell, rec)
                self.on_event("skipped", {"cell": cell.id})
                continue
            d = self.cell_dir(cell)
            if d.exists() and (rec is None or rec.get("status") != "interrupted"):
                shutil.rmtree(d)  # a failed, timed-out or changed cell starts afresh (an interrupted one resumes)
            self.rows[cell.id] = cell_row(d, cell, {"status": "pending"})
            todo.append(cell)
        self.write_results()
        return todo

    def write_results(self) -> Path:
        path = self.out / "results.csv"
        axes = [a.name for a in self.sweep.axes]
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["cell", "status", *axes, *RESULT_COLUMNS[2:]], extrasaction="ignore")
            w.writeheader()
            for cell in self.cells:
                w.writerow({k: _csv(v) for k, v in self.rows[cell.id].items()})
        tmp.replace(path)
        return path

    # -- running
    def _check(self, cell: Cell) -> Optional[str]:
        if not self.validate:
            return None
        try:
            load(self.out / "base.toml", list(cell.sets) + list(self.extra_sets))
        except (ScenarioError, ValueError) as exc:
            return str(exc)
        return None

    def _start(self, cell: Cell) -> Optional[_Running]:
        d = self.cell_dir(cell)
        d.mkdir(parents=True, exist_ok=True)
        rec = self._record(cell)
        error = self._check(cell)
        if error is not None:
            rec.update(status="invalid", error=error)
            self._done(cell, rec)
            return None
        argv = [*self.command, str((self.out / "base.toml").resolve()), "--run-dir", str(d.resolve())]
        for s in [*rec["runtime_sets"], *rec["sets"]]:  # (the cell's own values win)
            argv += ["--set", s]
        rec.update(status="running", command=argv, log="cell.log")
        (d / "cell.json").write_text(json.dumps(rec, indent=2) + "\n")
        log = (d / "cell.log").open("ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        # its own session: a terminal's Ctrl-C reaches the sweep only, which stops cells by PID
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_cell_preexec())
        now = time.monotonic()
        self.on_event("started", {"cell": cell.id})
        return _Running(cell, proc, log, now, now + self.timeout)

    def _done(self, cell: Cell, rec: dict[str, Any]) -> None:
        d = self.cell_dir(cell)
        d.mkdir(parents=True, exist_ok=True)
        (d / "cell.json").write_text(json.dumps(rec, indent=2) + "\n")
        self.rows[cell.id] = cell_row(d, cell, rec)
        self.write_results()
        self.on_event("finished", {"cell": cell.id, "status": rec["status"], "row": self.rows[cell.id]})

    def _finish(self, r: _Running, status: str) -> None:
        r.log.close()
        wall = time.monotonic() - r.started
        rec = json.loads((self.cell_dir(r.cell) / "cell.json").read_text())
        rc = r.proc.returncode
        short = None
        if status == "exited":
            status = "ok" if rc == 0 and (self.cell_dir(r.cell) / "summary.json").exists() else "failed"
            short = rounds_short(self.cell_dir(r.cell)) if status == "ok" else None
            if short:
                status = "failed"  # it ended cleanly, but not with the rounds it was asked for
        rec.update(status=status, returncode=rc, wall_seconds=round(wall, 3))
        if status in ("ok", "failed"):
            self.durations.append(wall)
        if status == "timeout":
            rec["error"] = f"timed out after {self.timeout:g} s; stopped by PID"
        elif status == "interrupted":
            rec["error"] = "interrupted; --resume continues it"
        elif short:
            rec["error"] = short
        elif status != "ok":
            rec["error"] = _last_error(self.cell_dir(r.cell) / "cell.log") or f"exit status {rc}"
        self._done(r.cell, rec)

    def eta(self, pending: int, running: Sequence[_Running]) -> Optional[float]:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        now = time.monotonic()
        left_running = sum(max(0.0, mean - (now - r.started)) for r in running)
        return (pending * mean + left_running) / self.parallel

    def run(self, tick: Optional[Callable[[dict[str, Any]], None]] = None, poll: float = 0.2) -> dict[str, dict[str, Any]]:
        """Run every cell still to run; returns the rows by cell id. Ctrl-C (or SIGTERM) stops
        the running cells by PID, records them ``interrupted`` and re-raises."""
        todo = self.prepare()
        running: list[_Running] = []
        previous = signal.getsignal(signal.SIGTERM)
        in_main = _in_main_thread()
        if in_main:
            signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while todo or running:
                while todo and len(running) < self.parallel:
                    r = self._start(todo.pop(0))
                    if r is not None:
                        running.append(r)
                for r in list(running):
                    if r.proc.poll() is not None:
                        running.remove(r)
                        self._finish(r, "exited")
                    elif time.monotonic() > r.deadline:
                        stop_process(r.proc)
                        running.remove(r)
                        self._finish(r, "timeout")
                if tick is not None:
                    tick(self.state(todo, running))
                if running:
                    time.sleep(poll)
        except KeyboardInterrupt:
            stop_processes([r.proc for r in running])
            for r in running:
                done = r.proc.returncode == 0 and (self.cell_dir(r.cell) / "summary.json").exists()
                self._finish(r, "exited" if done else "interrupted")  # (one may have ended meanwhile)
            raise
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
        return self.rows

    def state(self, todo: Sequence[Cell], running: Sequence[_Running]) -> dict[str, Any]:
        statuses = [row["status"] for row in self.rows.values()]
        return {"total": len(self.cells), "done": sum(s in ("ok", "failed", "timeout", "invalid") for s in statuses),
                "failed": sum(s in ("failed", "timeout", "invalid") for s in statuses),
                "running": [r.cell.id for r in running], "pending": len(todo), "eta": self.eta(len(todo), running)}


def _cell_preexec() -> Callable[[], None]:
    """A cell's ``preexec_fn``: SIGINT back to its default, so the sweep's SIGINT always stops a
    cell cleanly (a sweep started in the background inherits SIGINT ignored), and on Linux
    ``PR_SET_PDEATHSIG``: the kernel SIGKILLs the cell if the sweep dies without stopping it
    (its nodes follow it the same way)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def preexec() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if prctl is not None:
            prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    return preexec


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _fixed_slots(sweep: Sweep) -> int:
    """``federation.train_slots`` when the base or a ``set`` fixes it (> 0), else 0."""
    try:
        fed = tomllib.loads(sweep.base).get("federation", {})
        slots = int(fed.get("train_slots", 0)) if isinstance(fed, dict) else 0
    except (tomllib.TOMLDecodeError, ValueError, TypeError):
        slots = 0
    for s in sweep.sets:
        k, _, v = s.partition("=")
        if k.strip() == "federation.train_slots":
            try:
                slots = int(v)
            except ValueError:
                pass
    return max(0, slots)


def _last_error(log: Path, lines: int = 400) -> str:
    """The last line of a cell's log that looks like an error (for results.csv)."""
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    for line in reversed(tail):
        s = line.strip()
        if s and re.search(r"error|exception|traceback|killed|timed out", s, re.I):
            return s[:300]
    return ""


def _csv(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ----- a cell's results -------------------------------------------------------------------------------------------
def _read_json(p: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def cell_row(d: Path, cell: Cell, rec: dict[str, Any]) -> dict[str, Any]:
    """One ``results.csv`` row from a cell's folder (``scenario.json``, ``metrics.jsonl``) and record."""
    row: dict[str, Any] = {"cell": cell.id, "status": rec.get("status", "pending"), **cell.label_dict,
                           "wall_seconds": rec.get("wall_seconds"), "returncode": rec.get("returncode"),
                           "run_dir": f"cells/{cell.id}", "log": f"cells/{cell.id}/cell.log" if rec.get("log") else "",
                           "error": rec.get("error", "")}
    scenario = _read_json(d / "scenario.json")
    byz: set[str] = set()
    selects = False
    if scenario is not None:
        roles = scenario.get("roles", [])
        nodes = sum(int(r.get("count", 0)) for r in roles)
        byz = byzantine_names(roles)
        defense = scenario.get("defense", {})
        selects = selects_clients(defense.get("name", ""), defense.get("params"))
        row.update(defense_label=defense_label(defense.get("name", ""), defense.get("params")),
                   attack_label=attack_label(roles), scenario_seed=scenario.get("seed"), nodes=nodes,
                   byzantine=len(byz), byzantine_fraction=round(len(byz) / nodes, 4) if nodes else None)
    row.update(metrics_of(read_rows(d / "metrics.jsonl"), byz, selects))
    return row


def metrics_of(rows: list[dict[str, Any]], byzantine: set[str], selects: bool) -> dict[str, Any]:
    """Accuracy (final, best, mean of the last 5 evaluated rounds), loss (final, min), detection
    (pooled over rounds: rejected Byzantine rows / rejected rows, and / Byzantine rows; only for
    rules that select), the mean Byzantine share of accepted rows and aggregation seconds per round."""
    done = [r for r in rows if r.get("accuracy") is not None]
    accs = [float(r["accuracy"]) for r in done]
    losses = [float(r["loss"]) for r in done if r.get("loss") is not None]
    out: dict[str, Any] = {
        "rounds_completed": len(done),
        "final_accuracy": accs[-1] if accs else None, "best_accuracy": max(accs) if accs else None,
        "last5_accuracy": sum(accs[-5:]) / len(accs[-5:]) if accs else None,
        "final_loss": losses[-1] if losses else None, "min_loss": min(losses) if losses else None,
    }
    shares = [float(r["byzantine_share_accepted"]) for r in done if r.get("byzantine_share_accepted") is not None]
    out["byzantine_share_accepted"] = sum(shares) / len(shares) if shares and byzantine else None
    times = [float(r["t_aggregate"]) for r in rows if r.get("t_aggregate") is not None]
    out["t_aggregate_mean"] = sum(times) / len(times) if times else None
    if selects and done:
        rejected = sum(len(r.get("rejected") or []) for r in done)
        tp = sum(len(set(r.get("rejected") or []) & byzantine) for r in done)
        positives = tp + sum(int(r.get("byzantine_accepted") or 0) for r in done)
        out["detection_precision"] = tp / rejected if rejected else None
        out["detection_recall"] = tp / positives if positives else None
    return out


# ----- progress ---------------------------------------------------------------------------------------------------
def _fmt_eta(eta: Optional[float]) -> str:
    if eta is None:
        return "eta ?"
    m, s = divmod(int(eta + 0.5), 60)
    return f"eta {m}m{s:02d}s" if m else f"eta {s}s"


class Progress:
    """One rich progress bar (cells done, running, failed, ETA) on a terminal; one line per
    event otherwise."""

    def __init__(self, total: int, console=None) -> None:
        from rich.console import Console
        self.console = console or Console()
        self.live = self.console.is_terminal
        self.total = total
        self._bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
            self._bar = RichProgress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.description}"), console=self.console)
            self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def event(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "finished":
            row = info["row"]
            acc = row.get("final_accuracy")
            extra = f"acc {acc:.4f}" if isinstance(acc, float) else (row.get("error") or "")[:120]
            colour = "green" if info["status"] == "ok" else "red"
            self.console.print(f"[{colour}]{info['status']:>11}[/] {info['cell']}  {extra}"
                               + (f"  [dim]{row['wall_seconds']:.1f}s[/]" if row.get("wall_seconds") else ""),
                               highlight=False)
        elif kind == "skipped":
            self.console.print(f"[dim]   finished {info['cell']} (resume: kept)[/]", highlight=False)
        elif kind == "started" and not self.live:
            self.console.print(f"    started {info['cell']}", highlight=False)

    def tick(self, state: dict[str, Any]) -> None:
        text = f"running {len(state['running'])}  failed {state['failed']}  pending {state['pending']}  " \
               f"{_fmt_eta(state['eta'])}"
        if self._bar is not None:
            self._bar.update(self._task, completed=state["done"], description=text)
        elif text != getattr(self, "_last", None) and state["done"] != getattr(self, "_done", None):
            self._done = state["done"]
            self._last = text
            self.console.print(f"\\[{state['done']}/{state['total']}] {text}", highlight=False)


# ----- command line -----------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="byzfed-orchestrator sweep", description="run a grid of scenarios and report")
    p.add_argument("sweep", help="sweep file (.toml): base scenario, axes, include/exclude")
    p.add_argument("--out", default=None, help="sweep folder (default: sweeps/<name>)")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="cells at once (bounded so K x (train slots + 1) <= this process's cores)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out, skipping finished cells")
    p.add_argument("--timeout", type=float, default=None, help="seconds per cell (default: the file's timeout)")
    p.add_argument("--no-report", action="store_true", help="skip report.md and its figures")
    p.add_argument("--mpi", type=int, default=None, metavar="NP",
                   help="run each cell as one mpirun job of NP ranks (./launch.sh mpi), e.g. over --hostfile's machines")
    p.add_argument("--hostfile", default=None, help="with --mpi: the hostfile mpirun spreads the ranks over")
    p.add_argument("--mpirun-args", default="", metavar="ARGS",
                   help="with --mpi: more mpirun options, one string (e.g. '--mca btl_tcp_if_include 10.0.0.0/24')")
    args = p.parse_args(argv)
    from rich.console import Console
    console = Console()
    try:
        sweep = load_sweep(args.sweep)
        out = Path(args.out or Path("sweeps") / sweep.name)
        if args.mpi is None and (args.hostfile or args.mpirun_args):
            raise SweepError("--hostfile and --mpirun-args go with --mpi NP")
        command = None if args.mpi is None else mpi_command(args.mpi, args.hostfile, args.mpirun_args)
        runner = SweepRunner(sweep, out, args.parallel, args.resume, command=command, timeout=args.timeout)
    except SweepError as exc:
        print(f"sweep error: {exc}", file=sys.stderr)
        return 2
    if runner.note:
        console.print(f"[yellow]{runner.note}[/]")
    console.print(f"[bold]byzfed sweep[/] {sweep.name}: {len(runner.cells)} cells, {runner.parallel} at a time "
                  f"({runner.slots} training slot(s) each, {usable_cores()} cores)"
                  + ("" if args.mpi is None else f", each one mpirun job of {args.mpi} ranks") + f"; outputs in {out}")
    progress = Progress(len(runner.cells), console)
    runner.on_event = progress.event
    t0 = time.monotonic()
    try:
        with progress:
            rows = runner.run(progress.tick)
    except SweepError as exc:
        print(f"sweep error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        console.print(f"[red]interrupted[/]: running cells stopped; continue with --resume --out {out}")
        return 130
    statuses = [r["status"] for r in rows.values()]
    console.print(f"{statuses.count('ok')}/{len(statuses)} cells ok in {time.monotonic() - t0:.0f}s; "
                  f"results: {out / 'results.csv'}")
    if not args.no_report:
        from .report import write_report
        console.print(f"report: {write_report(out)}")
    return 0 if all(s == "ok" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
