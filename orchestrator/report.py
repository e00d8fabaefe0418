"""A sweep's report: ``DIR/report.md`` and PNG figures, from ``DIR/results.csv`` and the cell
folders alone (``python -m orchestrator.report DIR``).

Dimensions: the defense is the axis named ``defense`` (else each cell's ``defense_label``),
the attack the axis named ``attack`` (else ``attack_label``); the axis named ``seed`` is
averaged over (mean and standard deviation over seeds); any other axis splits the tables
into slices (one set of tables and figures per combination of its values). Only cells with
status ``ok`` enter the numbers; the others are listed with their logs.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .labels import RESULT_COLUMNS, read_rows, safe_id

METRICS = ("final_accuracy", "best_accuracy", "last5_accuracy")
MAX_SLICES = 12  # figures per kind at most (a big grid gets tables for every slice, figures for the first ones)


def _num(v: Any) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_results(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of ``results.csv`` and its axis columns (every column that is not a result)."""
    with (out / "results.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        axes = [c for c in (reader.fieldnames or []) if c not in RESULT_COLUMNS]
    return rows, axes


def _ordered(values: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def _stats(xs: Sequence[float]) -> tuple[Optional[float], Optional[float], int]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def _fmt(mean: Optional[float], std: Optional[float] = None, digits: int = 3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class Grid:
    """The ok cells grouped as (slice, defense, attack) -> cells (one per seed)."""

    def __init__(self, rows: list[dict[str, Any]], axes: list[str]) -> None:
        self.rows, self.axes = rows, axes
        self.defense_col = "defense" if "defense" in axes else "defense_label"
        self.attack_col = "attack" if "attack" in axes else "attack_label"
        self.seed_col = "seed" if "seed" in axes else None
        self.slice_cols = [a for a in axes if a not in (self.defense_col, self.attack_col, self.seed_col)]
        self.ok = [r for r in rows if r.get("status") == "ok"]
        self.defenses = _ordered(r[self.defense_col] for r in rows)
        self.attacks = _ordered(r[self.attack_col] for r in rows)
        self.slices = _ordered(self.slice_of(r) for r in rows)
        self.seeds = len(_ordered(r[self.seed_col] for r in rows)) if self.seed_col else 1

    def slice_of(self, r: dict[str, Any]) -> str:
        return ", ".join(f"{c}={r[c]}" for c in self.slice_cols)

    def cells(self, sl: str, defense: str, attack: str) -> list[dict[str, Any]]:
        return [r for r in self.ok if self.slice_of(r) == sl and r[self.defense_col] == defense
                and r[self.attack_col] == attack]

    def stat(self, sl: str, defense: str, attack: str, col: str):
        return _stats([_num(r.get(col)) for r in self.cells(sl, defense, attack)])


def _curves(out: Path, cells: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Per round, the mean of ``key`` over ``cells`` (their metrics.jsonl)."""
    by_round: dict[int, list[float]] = {}
    for c in cells:
        for row in read_rows(out / c["run_dir"] / "metrics.jsonl"):
            v = _num(row.get(key))
            if v is not None and row.get("round") is not None:
                by_round.setdefault(int(row["round"]), []).append(v)
    rounds = sorted(by_round)
    return rounds, [statistics.fmean(by_round[r]) for r in rounds]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _heatmap(g: Grid, sl: str, metric: str, path: Path) -> None:
    plt = _plt()
    data = [[g.stat(sl, d, a, metric)[0] for a in g.attacks] for d in g.defenses]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(g.attacks), 1.2 + 0.55 * len(g.defenses)), dpi=110)
    shown = [[math.nan if v is None else v for v in row] for row in data]
    im = ax.imshow(shown, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, "–" if v is None else f"{v:.2f}", ha="center", va="center",
                    color="white" if v is None or v < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(g.attacks)), g.attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(g.defenses)), g.defenses)
    ax.set_xlabel("attack")
    ax.set_title(f"{metric.replace('_', ' ')}" + (f" ({sl})" if sl else ""), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _round_curves(out: Path, g: Grid, sl: str, path: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(len(g.attacks), 2, figsize=(10, 2.6 * len(g.attacks)), dpi=100, squeeze=False)
    for i, attack in enumerate(g.attacks):
        for d in g.defenses:
            cells = g.cells(sl, d, attack)
            for j, key in enumerate(("accuracy", "loss")):
                x, y = _curves(out, cells, key)
                if x:
                    axes[i][j].plot(x, y, marker="o", ms=3, label=d)
        axes[i][0].set_ylabel(f"{attack}\ntest accuracy")
        axes[i][1].set_ylabel("test loss")
        for ax in axes[i]:
            ax.grid(alpha=0.3)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[i][0].set_ylim(0, 1)
    if any(ax.lines for row in axes for ax in row):
        axes[0][0].legend(*next((ax.get_legend_handles_labels() for row in axes for ax in row if ax.lines)), fontsize=8)
    fig.suptitle("per round" + (f", mean over {g.seeds} seeds" if g.seeds > 1 else "") + (f" ({sl})" if sl else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cost(out: Path, g: Grid, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    shown = []
    for d in g.defenses:
        x, y = _curves(out, [r for r in g.ok if r[g.defense_col] == d], "t_aggregate")
        if x:
            ax.plot(x, [1000 * v for v in y], marker="o", ms=3, label=d)
            shown += [1000 * v for v in y if v > 0]
    ax.set_xlabel("round")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("aggregation time per round (ms)")
    if shown and max(shown) > 20 * min(shown):  # rules that differ by orders of magnitude
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_title("aggregation cost per round (mean over cells)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _byz_fraction(g: Grid, metric: str, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(g.attacks), figsize=(4.5 * len(g.attacks), 3.6), dpi=100, squeeze=False)
    for ax, attack in zip(axes[0], g.attacks):
        for d in g.defenses:
            pts: dict[float, list[float]] = {}
            for r in g.ok:
                frac, v = _num(r.get("byzantine_fraction")), _num(r.get(metric))
                if r[g.defense_col] == d and r[g.attack_col] == attack and frac is not None and v is not None:
                    pts.setdefault(frac, []).append(v)
            xs = sorted(pts)
            if xs:
                ax.plot(xs, [statistics.fmean(pts[x]) for x in xs], marker="o", label=d)
        ax.set_title(attack, fontsize=10)
        ax.set_xlabel("Byzantine fraction")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    if axes[0][0].lines:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _slice_md(g: Grid, sl: str, metric: str) -> list[str]:
    """The tables of one slice (one combination of the other axes' values)."""
    md: list[str] = []
    title = f" — {sl}" if sl else ""
    md.append(f"## Accuracy: defense × attack{title}\n")
    md.append(_table(["defense \\ attack", *g.attacks],
                     [[d, *(_fmt(*g.stat(sl, d, a, metric)[:2]) for a in g.attacks)] for d in g.defenses]))
    md.append(f"\n## Worst case{title}\n")
    md.append("Each defense under the attack of the grid that hurt it most (lowest mean "
              f"{metric}).\n")
    worst_rows = []
    for d in g.defenses:
        scored = [(g.stat(sl, d, a, metric), a) for a in g.attacks]
        scored = [(s, a) for s, a in scored if s[0] is not None]
        if not scored:
            worst_rows.append([d, "–", "–", "–", "–"])
            continue
        (wm, ws, _), wa = min(scored, key=lambda t: t[0][0])
        (bm, bs, _), ba = max(scored, key=lambda t: t[0][0])
        worst_rows.append([d, _fmt(wm, ws), wa, _fmt(bm, bs) + f" ({ba})",
                           _fmt(statistics.fmean(s[0] for s, _ in scored)), wm])
    worst_rows.sort(key=lambda r: -r[-1] if isinstance(r[-1], float) else 1.0)  # most robust first
    md.append(_table(["defense", "worst-case accuracy", "strongest attack", "best case", "mean over attacks"],
                     [r[:5] for r in worst_rows]))
    strongest = [(statistics.fmean(v for v in vals), a) for a in g.attacks
                 if (vals := [g.stat(sl, d, a, metric)[0] for d in g.defenses if g.stat(sl, d, a, metric)[0] is not None])]
    if strongest:
        m, a = min(strongest)
        md.append(f"\nStrongest attack of the grid on average over defenses: **{a}** ({m:.3f}).\n")
    md.append(f"\n## Loss and other measures{title}\n")
    md.append(_table(["defense", "attack", "final loss", "min loss", "best acc", "last-5 acc",
                      "Byz. share accepted", "agg. ms/round", "wall s"],
                     [[d, a, _fmt(*g.stat(sl, d, a, "final_loss")[:2]), _fmt(*g.stat(sl, d, a, "min_loss")[:2]),
                       _fmt(*g.stat(sl, d, a, "best_accuracy")[:2]), _fmt(*g.stat(sl, d, a, "last5_accuracy")[:2]),
                       _fmt(*g.stat(sl, d, a, "byzantine_share_accepted")[:2], digits=2),
                       _fmt(*(None if v is None else 1000 * v for v in g.stat(sl, d, a, "t_aggregate_mean")[:2]),
                            digits=1),
                       _fmt(g.stat(sl, d, a, "wall_seconds")[0], digits=0)]
                      for d in g.defenses for a in g.attacks if g.cells(sl, d, a)]))
    selecting = [d for d in g.defenses
                 if any(r.get("detection_precision") or r.get("detection_recall")
                        for a in g.attacks for r in g.cells(sl, d, a))]
    if selecting:
        md.append(f"\n## Detection (defenses that select clients){title}\n")
        md.append("Precision: rejected rows that were Byzantine; recall: Byzantine rows rejected; pooled over "
                  "rounds. Rules that do not select (mean, median, trimmed mean, centered clipping, ...) are "
                  "left out: they accept everyone.\n")
        md.append(_table(["defense \\ attack", *g.attacks],
                         [[d, *(f"P {_fmt(g.stat(sl, d, a, 'detection_precision')[0], digits=2)} / "
                                f"R {_fmt(g.stat(sl, d, a, 'detection_recall')[0], digits=2)}"
                                for a in g.attacks)] for d in selecting]))
    return md


def write_report(out: str | Path, metric: str = "final_accuracy", figures: bool = True) -> Path:
    """Write ``out/report.md`` (and its PNGs next to it) from ``out/results.csv`` and the cell folders."""
    out = Path(out)
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: allowed {', '.join(METRICS)}")
    rows, axes = read_results(out)
    g = Grid(rows, axes)
    name = out.resolve().name
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in _ordered(r["status"] for r in rows))
    md = [f"# Sweep report: {name}\n",
          f"{len(rows)} cells ({counts}); "
          f"axes: {', '.join(axes) or '(none)'}. Numbers are over cells with status ok"
          + (f"; mean ± std over {g.seeds} seeds" if g.seeds > 1 else "") + ".\n",
          f"Metric in the tables: **{metric}** (final: last evaluated round; last5: mean of the last 5 "
          "evaluated rounds). Regenerate with `python -m orchestrator.report " + str(out) + "`.\n"]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        md.append("## Cells that did not finish\n")
        md.append(_table(["cell", "status", "error", "log"],
                         [[r["cell"], r["status"], (r.get("error") or "").replace("|", "/")[:160], r.get("log") or "–"]
                          for r in bad]))
    for k, sl in enumerate(g.slices):
        tag = safe_id(sl) if sl else ""
        md += _slice_md(g, sl, metric)
        if figures and k < MAX_SLICES and g.ok:
            heat = f"heatmap{'-' + tag if tag else ''}.png"
            _heatmap(g, sl, metric, out / heat)
            curves = f"rounds{'-' + tag if tag else ''}.png"
            _round_curves(out, g, sl, out / curves)
            md.append(f"\n![defense x attack]({heat})\n\n![accuracy and loss per round]({curves})\n")
    if figures and g.ok:
        fracs = _ordered(r.get("byzantine_fraction", "") for r in g.ok)
        if len(fracs) > 1:
            _byz_fraction(g, metric, out / "byzantine-fraction.png")
            md.append("\n## Accuracy vs Byzantine fraction\n\nMean over seeds and the other axes.\n\n"
                      "![accuracy vs Byzantine fraction](byzantine-fraction.png)\n")
        _cost(out, g, out / "aggregation-cost.png")
        md.append("\n## Aggregation cost\n")
        md.append(_table(["defense", "agg. ms/round (mean over cells)"],
                         [[d, _fmt(*(None if v is None else 1000 * v for v in _stats(
                             [_num(r.get("t_aggregate_mean")) for r in g.ok if r[g.defense_col] == d])[:2]), digits=2)]
                          for d in g.defenses]))
        md.append("\n![aggregation cost per round](aggregation-cost.png)\n")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.report", description="a sweep's report.md and figures")
    p.add_argument("dir", help="the sweep folder (holds results.csv and cells/)")
    p.add_argument("--metric", default="final_accuracy", choices=METRICS)
    p.add_argument("--no-figures", action="store_true")
    args = p.parse_args(argv)
    if not (Path(args.dir) / "results.csv").exists():
        print(f"report: no results.csv in {args.dir}", file=sys.stderr)
        return 2
    print(write_report(args.dir, args.metric, not args.no_figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
