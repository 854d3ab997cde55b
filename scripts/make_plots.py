"""Plots of a table folder written by ``make_tables.py``: metric, activation memory and step time vs probes.

For every table in ``TABLE_DIR/tables.csv`` one PNG with three panels against the probe count
r (log scale): the headline metric (mean ± std over seeds) with the exact baseline as a band
(mean ± std), the activation memory in MiB with the exact value as a line, and the time per
training step with the exact value as a line. Each XConv variant (mode, distribution,
deflation) is its own series. The PNGs go next to the tables, named after the table.

With ``--pareto`` (the equal-memory comparison) each table's PNG (``..._pareto.png``) has two
panels against activation memory (MiB): the metric (mean ± std), every row a labelled point and
the Pareto front (the rows no other row beats in both bytes and metric) as a line, and the time
per training sample (per step for tables written before ``make_tables.py`` had that column), which
compares rows of different batch sizes. Rows of every batch size share a table there, as with
``make_tables.py --batch-rows``.

Usage:
    python scripts/make_plots.py results/paper_mnist_table_cpu
    python scripts/make_plots.py results/equal_memory_segmentation_cpu --pareto

Exits with status 2 and one line on stderr when ``TABLE_DIR/tables.csv`` is missing.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from make_tables import TABLE_KEYS, row_label, settings_label, setup_suffix, table_keys  # noqa: E402

PANELS = [("metric", None), ("activation_mib", "activation memory (MiB)"), ("step_s", "time per step (s)")]


def _float(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def read_tables(path: Path, keys: tuple[str, ...] = TABLE_KEYS) -> dict[tuple, list[dict]]:
    """Rows of ``tables.csv`` grouped by table (``keys``: :data:`make_tables.TABLE_KEYS`, or without the
    batch size for tables whose rows are batch sizes).

    Tables written before a key existed lack its column; it reads as empty.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tables: dict[tuple, list[dict]] = {}
    for row in rows:
        tables.setdefault(tuple(row.get(k, "") for k in keys), []).append(row)
    return tables


def _series_label(row: dict) -> str:
    return f"{row['mode']} {row['distribution']}" + settings_label(row)


def plot_table(key: tuple, rows: list[dict], out: Path) -> Path:
    """Write one three-panel PNG for the rows of one table; return its path."""
    task, data, model, settings, batch, precision, processes, metric = key
    setup = setup_suffix(precision, processes)
    settings = f", {settings}" if settings else ""
    # Rows from tables.csv (text); rows of tables written before the storage options lack them.
    exact = next((r for r in rows if r["probes"] == "0" and not r.get("storage") and not r.get("batchnorm_bits")
                  and not r.get("checkpointing")), None)
    series: dict[str, list[dict]] = {}
    levels = []  # SR storage, the planner, BatchNorm storage with exact convs: one value each, no r axis
    for row in rows:
        if row["probes"] != "0" and row.get("storage", "sketch") in ("", "sketch"):
            series.setdefault(_series_label(row), []).append(row)
        elif row is not exact:
            levels.append(row)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (field, ylabel) in zip(axes, PANELS):
        for label, members in series.items():
            # Runs without a value here (no step time recorded) leave no point.
            members = sorted((r for r in members if r[f"{field}_mean"]), key=lambda r: int(r["probes"]))
            x = [int(r["probes"]) for r in members]
            y = [_float(r[f"{field}_mean"]) for r in members]
            yerr = [_float(r[f"{field}_std"]) or 0.0 for r in members]
            ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=f"XConv {label}")
        for i, row in enumerate(levels):
            if _float(row[f"{field}_mean"]) is not None:
                ax.axhline(_float(row[f"{field}_mean"]), ls="--", lw=1, color=f"C{i + len(series)}",
                           label=row_label(row, False))
        if exact is not None and _float(exact[f"{field}_mean"]) is not None:
            mean, std = _float(exact[f"{field}_mean"]), _float(exact[f"{field}_std"]) or 0.0
            ax.axhline(mean, color="black", lw=1, label="exact")
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.12)
        if field != "metric":
            ax.set_ylim(bottom=0)  # memory and time read as fractions of exact
        ax.set_xscale("log", base=2)
        ax.set_xlabel("probes r")
        ax.set_ylabel(ylabel or metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, f"{task}: {model} on {data}{settings}, batch {batch}{setup}",
                 f"{task}_{data}_{model}{settings}_b{batch}{setup}_{metric}", out)


def _save(fig, title: str, stem: str, out: Path) -> Path:
    """Title and lay out ``fig``, write it as ``out/<stem>.png`` (``stem`` made safe as a file name), close it."""
    fig.suptitle(title)
    fig.tight_layout()
    path = out / (re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_") + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points ``(bytes, metric)`` that no other point beats or equals in both (fewer bytes and a
    better metric), sorted by bytes."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if best is None or (y > best if higher_is_better else y < best):
            front.append((x, y))
            best = y
    return front


def pareto_time(rows: list[dict]) -> tuple[str, str]:
    """``(column prefix, axis label)`` of the time panel: time per sample where every row has it (rows
    of different batch sizes compare by it), else time per step (tables written before that column)."""
    if all(_float(row.get("sample_ms_mean")) is not None for row in rows):
        return "sample_ms", "time per training sample (ms)"
    return "step_s", "time per step (s)"


def plot_pareto(key: tuple, rows: list[dict], out: Path) -> Path:
    """Write one two-panel PNG (metric and time per sample against activation MiB, :func:`pareto_time`)
    for one table; return its path."""
    task, data, model, settings, precision, processes, metric = key
    higher = rows[0].get("metric_mode", "max") != "min"
    time_field, time_label = pareto_time(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    points = []
    for i, row in enumerate(rows):
        x = _float(row["activation_mib_mean"])
        label = row_label(row, True)
        for ax, field in zip(axes, ("metric", time_field)):
            y = _float(row[f"{field}_mean"])
            if x is None or y is None:
                continue
            ax.errorbar([x], [y], yerr=[_float(row[f"{field}_std"]) or 0.0], fmt="o", capsize=3, color=f"C{i % 10}",
                        label=label if field == "metric" else None)
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if field == "metric":
                points.append((x, y))
    if len(points) > 1:
        front = pareto_front(points, higher)
        axes[0].plot(*zip(*front), color="black", lw=1, ls="--", label="Pareto front")
    right = 1.25 * max((x for x, _ in points), default=1.0)  # room for the labels
    for ax, ylabel in zip(axes, (f"{metric} ({'higher' if higher else 'lower'} is better)", time_label)):
        ax.set_xlabel("activation memory (MiB)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, right)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=6)
    settings = f", {settings}" if settings else ""
    setup = setup_suffix(precision, processes)
    return _save(fig, f"{task}: {model} on {data}{settings}{setup}", f"{task}_{data}_{model}{settings}{setup}_{metric}_pareto", out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table_dir", type=Path, metavar="TABLE_DIR", help="a --out folder of make_tables.py")
    parser.add_argument("--pareto", action="store_true",
                        help="metric and time per sample against activation memory, one point per row, rows of every batch size in one table")
    args = parser.parse_args(argv)
    csv_path = args.table_dir / "tables.csv"
    if not csv_path.is_file():
        print(f"error: TABLE_DIR: no tables.csv in {str(args.table_dir)!r} (run make_tables.py --out first)",
              file=sys.stderr)
        return 2
    if args.pareto:
        for key, rows in read_tables(csv_path, table_keys(batch_rows=True)).items():
            print(plot_pareto(key, rows, args.table_dir))
        return 0
    for key, rows in read_tables(csv_path).items():
        print(plot_table(key, rows, args.table_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
