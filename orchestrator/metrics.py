"""Run outputs: one JSONL line per round, a summary, and a PNG plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():  # resuming: keep what was recorded
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def rewind(self, next_round: int) -> int:
        """Resuming at ``next_round``: keep the rows of earlier rounds (rewritten
        atomically); the later ones, written after the checkpoint and run again now,
        are appended to ``metrics.interrupted.jsonl``. Returns how many were dropped."""
        keep = [r for r in self.rows if int(r.get("round", -1)) < next_round]
        dropped = [r for r in self.rows if int(r.get("round", -1)) >= next_round]
        if not dropped:
            return 0
        with (self.run_dir / "metrics.interrupted.jsonl").open("a") as fh:
            fh.writelines(json.dumps(r, default=_jsonable) + "\n" for r in dropped)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, default=_jsonable) + "\n" for r in keep))
        tmp.replace(self.path)
        self.rows = keep
        return len(dropped)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=_jsonable) + "\n")

    def summary(self, wall_seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        done = [r for r in self.rows if r.get("accuracy") is not None]
        accs = [r["accuracy"] for r in done]
        out = {
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "final_loss": done[-1]["loss"] if done else None,
            "rounds_completed": len(done),
            "rounds_abandoned": sum(1 for r in self.rows if str(r.get("outcome", "")).startswith("abandoned")),
            "wall_seconds": round(wall_seconds, 3),
            "bytes_received": sum(r.get("bytes_received", 0) for r in self.rows),
        }
        out.update(extra or {})
        try:  # the rule with its parameters, e.g. krum(layerwise, cosine, clip=median), from the run's scenario
            from .labels import defense_label
            d = json.loads((self.run_dir / "scenario.json").read_text())["defense"]
            out.setdefault("defense_label", defense_label(d["name"], d.get("params")))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2, default=_jsonable) + "\n")
        return out

    def plot(self, title: str) -> Path | None:
        done = [r for r in self.rows if r.get("accuracy") is not None]
        if not done:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in done]
        fig, ax1 = plt.subplots(figsize=(7, 4), dpi=110)
        ax1.plot(rounds, [r["accuracy"] for r in done], "o-", color="tab:blue", label="test accuracy")
        ax1.set_xlabel("round")
        from matplotlib.ticker import MaxNLocator
        ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.set_ylabel("test accuracy", color="tab:blue")
        ax1.set_ylim(0, 1)
        ax1.grid(alpha=0.3)
        ax2 = ax1.twinx()
        ax2.plot(rounds, [r["loss"] for r in done], "s--", color="tab:red", label="test loss")
        ax2.set_ylabel("test loss", color="tab:red")
        abandoned = [r["round"] for r in self.rows if str(r.get("outcome", "")).startswith("abandoned")]
        for x in abandoned:
            ax1.axvline(x, color="grey", alpha=0.4, lw=1)
        ax1.set_title(title)
        fig.tight_layout()
        out = self.run_dir / "accuracy.png"
        fig.savefig(out)
        plt.close(fig)
        return out


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return str(x)


def detection_scores(accepted: dict[str, bool], byzantine: set[str]) -> dict[str, float | None]:
    """Precision/recall of rejecting Byzantine rows (positive = rejected)."""
    rejected = {n for n, ok in accepted.items() if not ok}
    byz = {n for n in accepted if n in byzantine}
    tp = len(rejected & byz)
    return {
        "detection_precision": tp / len(rejected) if rejected else None,
        "detection_recall": tp / len(byz) if byz else None,
    }
