"""Live terminal progress (rich): rounds, accuracy, who reported, who is missing."""
from __future__ import annotations

import threading
import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class LiveProgress:
    def __init__(self, console: Console, total_rounds: int, coord_ref=None, enabled: bool = True) -> None:
        self.console = console
        self.coord = coord_ref
        self.enabled = enabled
        self.progress = Progress(TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                                 transient=False, disable=not enabled)
        self.task = self.progress.add_task("waiting for nodes to join", total=total_rounds, label="rounds")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._burst: list[float] = []  # times of the eviction lines printed lately
        self._held: list[str] = []  # evicted nodes not printed one by one (a burst of them)
        self._lock = threading.Lock()

    def __enter__(self) -> "LiveProgress":
        self.progress.start()
        if self.enabled and self.console.is_terminal:
            self._thread = threading.Thread(target=self._refresh, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._flush()
        self._stop.set()
        self.progress.stop()

    def _refresh(self) -> None:
        while not self._stop.wait(0.5):
            c = self.coord
            r = c.keeper.current if c else None
            if r is None or r.closed:
                continue
            names = sorted(c.name_of(n) for n in r.missing)
            shown = ", ".join(names[:6]) + (f" +{len(names) - 6}" if len(names) > 6 else "")
            self.progress.update(self.task, description=f"round {r.round_id}: {len(r.uploads)}/{len(r.selected)} "
                                                        f"reported; waiting for {shown}")

    BURST, BURST_SECONDS = 5, 2.0
    """At most BURST eviction lines per BURST_SECONDS; more are summed up in one line
    (counts and a few names), so a thousand-node run stays readable."""

    def _evicted(self, node: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._burst = [t for t in self._burst if now - t < self.BURST_SECONDS]
            if len(self._burst) >= self.BURST:
                self._held.append(node)
                return
            self._burst.append(now)
        self.console.print(f"[yellow]node {node} lease expired (evicted)[/]")

    def _flush(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        if held:
            shown = ", ".join(held[:3]) + (f" +{len(held) - 3}" if len(held) > 3 else "")
            self.console.print(f"[yellow]{len(held)} more nodes' leases expired (evicted): {shown}[/]")

    def event(self, kind: str, info: dict[str, Any]) -> None:
        p = self.console.print
        if kind != "evicted":
            self._flush()
        if kind == "ready":
            p(f"[green]{info['joined']} of {info['expected']} nodes joined[/]; starting rounds")
            self.progress.update(self.task, description="")
        elif kind == "round_closed":
            self._round_line(info)
            self.progress.advance(self.task)
        elif kind == "evicted":
            self._evicted(info["node"])
        elif kind == "resumed":
            p(f"[cyan]resumed from checkpoint at round {info['round']}[/]")
            self.progress.update(self.task, completed=info["round"])
        elif kind == "message":
            p(info["text"])

    def _round_line(self, row: dict[str, Any]) -> None:
        parts = [f"round {row['round']:>3}"]
        if row.get("accuracy") is not None:
            parts.append(f"acc [bold]{row['accuracy']:.4f}[/] loss {row['loss']:.4f}")
        parts.append(f"reported {row.get('reported', 0)}/{row.get('selected', 0)}")
        if row.get("rejected"):
            parts.append(f"rejected {len(row['rejected'])}")
        if row.get("missing"):
            parts.append(f"[yellow]missing {', '.join(row['missing'][:5])}{' …' if len(row['missing']) > 5 else ''}[/]")
        dropped = {k: v for k, v in (row.get("dropped") or {}).items() if v}
        if dropped:
            parts.append("[yellow]dropped " + " ".join(f"{k}:{v}" for k, v in dropped.items()) + "[/]")
        stale = (row.get("refused") or {}).get("stale", 0)
        if stale:
            parts.append(f"stale refused {stale}")
        if row.get("staleness_max") is not None:
            parts.append(f"staleness {row['staleness_mean']:.1f}/{row['staleness_max']}")
        if row.get("byzantine_selected"):
            parts.append(f"byz {row['byzantine_selected']}/{row.get('selected', 0)}"
                         + (f"→{row['byzantine_accepted']}" if row.get("byzantine_accepted") is not None else ""))
        for key in ("joined", "left", "evicted"):
            if row.get(key):
                parts.append(f"{key} {len(row[key])}")
        if not str(row.get("outcome", "")).startswith(("complete",)):
            parts.append(f"[dim]{row.get('outcome')}[/]")
        parts.append(f"[dim]{row.get('t_collect', 0):.1f}s[/]")
        self.console.print("  ".join(parts))


def summary_table(summary: dict[str, Any], run_dir: str) -> Table:
    t = Table(title="byzfed run summary", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    for key in ("scenario", "defense", "nodes", "final_accuracy", "best_accuracy", "final_loss", "rounds_completed",
                "rounds_abandoned", "wall_seconds", "bytes_received"):
        v = summary.get(key)
        t.add_row(key.replace("_", " "), f"{v:.4f}" if isinstance(v, float) else str(v))
    t.add_row("outputs", run_dir)
    return t
