"""Paper-style tables from run directories: one row per estimator, exact first, means over seeds.

Reads every ``summary.json`` below the given directories (a multirun folder, several, or single
runs), groups the runs into tables by task, data set, model, batch size (the one trained with,
``summary.json``'s ``batch_size``, which the equal-memory protocol chooses), precision (Lightning's
``trainer.precision``; named in the heading unless fp32), number of DDP processes (named
unless 1) and every other config value that differs between the runs read (``data.scale``,
``model.channels``, ``trainer.max_epochs``, ...; named in the heading), and within a table into
rows by the XConv settings (probes, mode, distribution, deflation, ReLU, include/exclude
patterns, min_pixels, storage and bits, max_compression, BatchNorm bits, max-pool offsets, the
planner's budget; labelled where not the default). Only the seed, output paths, loggers and
callbacks may differ between the runs of a row. Per row:

- the headline metric (``--metric``, default each run's own ``metric_name``) as mean ± sample
  standard deviation over the row's runs (seeds; the mean alone for a single run), and their number;
  runs without it (``+trainer.limit_val_batches=0``: ``metric`` null) count in the number only;
- activation memory: saved-for-backward bytes of one training step in MiB, and its ratio to the
  exact row of the same table (``probes=0``, no SR storage, no planner);
- peak memory in MiB (CUDA runs only; blank on CPU);
- time per training step in seconds (batch size / ``samples_per_s``, which counts the training
  steps' forward, backward and update only) and its ratio to the exact row;
- time per training sample in milliseconds (1000 / ``samples_per_s``) and its ratio to the exact
  row: what compares methods that train at different batch sizes (``--batch-rows``), where steps
  hold different numbers of samples;
- training wall-clock time in seconds (``train_time_s``: the whole fit, validation, data loading
  and callbacks included) and its ratio to the exact row;
- memory and time columns are blank where any run of the row lacks them (peak memory on the CPU,
  ``train_time_s`` in summaries written before it was recorded), not means of the other runs;
- **best** on the row (rows, if tied) of the table with the best metric mean: the highest or the
  lowest by the metric's direction, which the column's heading names. The direction is each run's
  ``metric_mode`` (its task config's ``task.metric.mode``: ``max``, or ``min`` for the GAN's FID);
  summaries written before it was recorded take their task config's; ``--metric-mode`` gives it for
  all runs, as for a ``--metric`` of the other direction (``--metric val/loss --metric-mode min``).

With ``--batch-rows`` the batch size separates rows instead of tables, for the paper's
equal-memory comparison (exact at batch B against XConv at batch 2B in one table; ratios are
then to the exact row of the smallest batch).

Ratios compare runs of the same sweep machine, but runs that shared a machine with other work
have noisy times; say so when publishing.

Usage:
    python scripts/make_tables.py multirun/classification/2026-11-30_10-00-00 [more dirs ...]
                                  [--metric test/acc] [--metric-mode max] [--batch-rows]
                                  [--out results/paper_mnist_table_cpu]

Writes ``tables.md`` and ``tables.csv`` into ``--out`` (created), or prints the markdown when
``--out`` is not given. Exits with status 2 and one line on stderr when no ``summary.json`` is
found, a run lacks the requested metric, or the runs of one table disagree on the direction.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import yaml
from benchlib import write_csv

MIB = 2**20
TASK_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "task"
# What separates tables, and within a table, rows.
TABLE_KEYS = ("task", "data", "model", "settings", "batch_size", "precision", "processes", "metric_name")
ROW_KEYS = ("probes", "mode", "distribution", "per_sample", "contraction", "deflation", "deflation_rank", "relu",
            "include", "exclude", "min_pixels", "storage", "bits", "max_compression", "batchnorm_bits", "maxpool", "budget", "checkpointing")
# Config values that may differ between the runs of one row: seeds, where a run wrote its
# files, how it logged; the XConv options and what TABLE_KEYS already name are compared there.
NOT_SETTINGS = {"seed", "data.seed", "ckpt_path", "output_dir", "checkpointing", "trainer.default_root_dir", "task_name",
                "data._target_", "data.image", "data.batch_size", "model._target_", "model.encoder_name",
                "task._target_", "trainer.precision", "trainer.devices", "trainer.num_nodes",
                "task.metric.name", "task.metric.mode",  # what is scored, not how it trains: metric_name, metric_mode
                "equal_memory"}  # the equal-memory protocol chose the batch size, which TABLE_KEYS name
NOT_SETTINGS_PREFIXES = ("xconv.", "callbacks.", "logger.", "hydra.", "task.net.", "equal_memory.")  # task.net is ${model}


def _target(node) -> str:
    """The short class name a config node builds (``experiments.data.DigitsDataModule`` -> ``DigitsDataModule``)."""
    return str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]


def _patterns(value) -> str:
    """``xconv.include`` / ``exclude`` (None, a pattern or a list of them) as one string; "" for None."""
    if not value:
        return ""
    return value if isinstance(value, str) else ",".join(value)


@functools.cache
def task_metric_mode(task: str) -> str:
    """The direction of ``task``'s headline metric, ``task.metric.mode`` of ``configs/task/<task>.yaml``:
    for summaries written before they recorded their ``metric_mode``.

    Raises:
        KeyError: there is no such task config (a task since renamed).
    """
    path = TASK_CONFIGS / f"{task}.yaml"
    if not path.is_file():
        raise KeyError(f"--metric-mode: runs of task {task!r} record no metric_mode, and there is no {path} "
                       "to read it from")
    return yaml.safe_load(path.read_text())["task"]["metric"]["mode"]


def load_runs(directories: list[Path], metric: str | None, metric_mode: str | None = None) -> list[dict]:
    """One flat record per ``summary.json`` below ``directories``, with the fields the tables need;
    ``metric_mode`` (``"max"`` or ``"min"``) replaces each run's own.

    Raises:
        FileNotFoundError: a directory does not exist.
        KeyError: a run has no ``metric`` among its final metrics (without ``metric``, a run
            lacking its own headline metric, as one that validated nothing, counts with none);
            an older run's task has no config to take the direction from (without ``metric_mode``).
    """
    runs = []
    for directory in directories:
        if not directory.is_dir():
            raise FileNotFoundError(f"RUN_DIR: no directory {str(directory)!r}")
        for path in sorted(directory.rglob("summary.json")):
            summary = json.loads(path.read_text())
            config, xconv = summary["config"], summary["config"]["xconv"]
            name = metric or summary["metric_name"]
            # A run that validated nothing (+trainer.limit_val_batches=0) has no headline metric: a blank cell.
            if name not in summary["metrics"] and metric is not None:
                raise KeyError(f"--metric: {path} has no {name!r}; it has {sorted(summary['metrics'])}")
            # The batch trained with (the equal-memory protocol's choice; summaries from before it was
            # recorded: the config's); the deep image prior's data modules have none: one image per step.
            batch = summary.get("batch_size") or config["data"].get("batch_size", 1)
            storage = xconv.get("storage", "sketch")  # summaries from before storage options: the sketch
            planned = xconv.get("budget") is not None
            # Which convs are converted, and how, matters only where their gradients are estimated.
            estimated = bool(summary["probes"]) or storage == "quantized" or planned
            sketch = bool(summary["probes"]) and storage == "sketch" and not planned
            runs.append({
                "task": summary["task"],
                # One image per run (deep image prior): each image is its own table, not a seed.
                "data": _target(config["data"]) + (f"({config['data']['image']})" if config["data"].get("image") else ""),
                "model": _target(config["model"]) + (f"({config['model']['encoder_name']})"
                                                     if "encoder_name" in config["model"] else ""),
                "batch_size": batch,
                # Summaries from before these were recorded: fp32, one process.
                "precision": summary.get("precision", "32-true"),
                "processes": summary.get("world_size", 1),
                "metric_name": name,
                "metric": summary["metrics"].get(name),
                "metric_mode": metric_mode or summary.get("metric_mode") or task_metric_mode(summary["task"]),
                "probes": summary["probes"] if sketch else 0,
                "mode": xconv["mode"] if sketch else "exact",
                "distribution": xconv["distribution"] if sketch else "",
                # Options recorded since the xconv config group became xconv.ConvertOptions' schema.
                "per_sample": bool(xconv.get("per_sample")) if sketch else False,
                "contraction": xconv.get("contraction", "auto") if sketch else "",
                "deflation": (xconv.get("deflation") or "") if sketch else "",
                "deflation_rank": (xconv.get("deflation_rank") or "") if sketch else "",
                "relu": xconv.get("relu", "bit"),
                "include": _patterns(xconv.get("include")) if estimated else "",
                "exclude": _patterns(xconv.get("exclude")) if estimated else "",
                "min_pixels": (xconv.get("min_pixels") or "") if estimated else "",
                "storage": "planned" if planned else storage if estimated else "",
                "bits": (xconv.get("bits") or "") if (sketch or storage == "quantized") and not planned else "",
                "max_compression": (xconv.get("max_compression") or "") if sketch else "",
                "batchnorm_bits": xconv.get("batchnorm_bits") or "",
                "maxpool": bool(xconv.get("maxpool")),
                "budget": xconv.get("budget") or "",
                # Activation checkpointing (an exact-gradient baseline): a row beside exact, not a table apart.
                "checkpointing": _patterns(summary.get("checkpointing")),
                "activation_mib": summary["activation_bytes"] / MIB,
                "peak_mib": summary["peak_memory_bytes"] / MIB if summary["peak_memory_bytes"] else None,
                "step_s": batch / summary["samples_per_s"] if batch and summary["samples_per_s"] else None,
                "sample_ms": 1000 / summary["samples_per_s"] if summary["samples_per_s"] else None,
                "train_s": summary.get("train_time_s"),
                "seed": summary["seed"],
                "path": str(path.parent),
                "config": dict(_flatten(config)),
            })
    _name_settings(runs)
    return runs


def _flatten(node: dict, prefix: str = ""):
    """``("data.scale", "4")`` pairs of a nested config, values as text (lists as JSON, so they compare by value)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)


def _name_settings(runs: list[dict]) -> None:
    """Set each run's ``settings``: ``"data.scale=4 model.channels=[64, 64]"`` for every config value
    (outside :data:`NOT_SETTINGS`) that differs between the runs of its task, data set and model;
    ``""`` when none does. (Values that differ only between tasks are already a table apart.)

    A key that some runs lack (a config option added later) separates them only where the runs
    that have it disagree.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["data"], run["model"]), []).append(run)
    for group in groups.values():
        values: dict[str, set] = {}
        for run in group:
            for key, value in run["config"].items():
                if key not in NOT_SETTINGS and not key.startswith(NOT_SETTINGS_PREFIXES):
                    values.setdefault(key, set()).add(value)
        varying = sorted(k for k, seen in values.items() if len(seen) > 1)
        for run in group:
            config = run.pop("config")
            run["settings"] = " ".join(f"{k}={config[k]}" for k in varying if k in config)


# A row's means over its runs (mean and std columns, in this order), and those with a ratio to the exact row.
MEAN_FIELDS = ("metric", "activation_mib", "peak_mib", "step_s", "sample_ms", "train_s")
RATIO_FIELDS = ("activation_mib", "step_s", "sample_ms", "train_s")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None  # one run: no spread


def _sortable(value) -> tuple:
    """Numbers before text, numbers by value (batch 32 before 128), None first."""
    if value is None:
        return (0, 0, "")
    return (1, value, "") if isinstance(value, (int, float)) else (2, 0, str(value))


def is_exact(row: dict) -> bool:
    """Whether a row's runs trained as plain torch (what ratios are taken against): exact gradients,
    nothing stored in low bits, no activation checkpointing."""
    return row["probes"] == 0 and not row["storage"] and not row["batchnorm_bits"] and not row["checkpointing"]


def _row_order(row: dict) -> tuple:
    return (not is_exact(row), row["storage"], str(row["budget"]), str(row["bits"]), row["probes"], row["mode"],
            row["distribution"], row["per_sample"], row["contraction"], row["deflation"],
            str(row["deflation_rank"]), row["relu"] != "exact", row["include"], row["exclude"], str(row["min_pixels"]),
            str(row["max_compression"]), str(row["batchnorm_bits"]), row["maxpool"], row["checkpointing"])


def table_keys(batch_rows: bool) -> tuple[str, ...]:
    """The fields that separate tables: :data:`TABLE_KEYS`, without the batch size if it separates rows."""
    return tuple(k for k in TABLE_KEYS if not (batch_rows and k == "batch_size"))


def summarize(runs: list[dict], batch_rows: bool = False) -> list[dict]:
    """One row per (table, estimator): mean and std over its runs, ratios to the table's exact row.

    Ratios are None where the table has no exact (``probes=0``) runs. With ``batch_rows`` the
    batch size is part of the estimator (a row) and the exact row is the one of smallest batch.
    Each table's best row is marked (:func:`_mark_best`; ValueError where its runs disagree on the direction).
    """
    tables = table_keys(batch_rows)
    keys = TABLE_KEYS + ROW_KEYS
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in keys), []).append(run)
    rows = []
    for key, members in groups.items():
        row = dict(zip(keys, key))
        row["runs"] = len(members)
        row["seeds"] = " ".join(str(s) for s in sorted(m["seed"] for m in members))
        for field in MEAN_FIELDS:
            values = [m[field] for m in members]
            if field != "metric" and None in values:  # a mean of some runs would read as the row's
                values = []
            row[f"{field}_mean"], row[f"{field}_std"] = _mean_std(values)
        rows.append(row)
    for row in rows:
        # The exact run of the same table (of the smallest batch), with the same ReLU where there is one.
        exact = min((r for r in rows if is_exact(r) and all(r[k] == row[k] for k in tables)),
                    key=lambda r: (r["batch_size"] or 0, r["relu"] != row["relu"]), default=None)
        for field in RATIO_FIELDS:
            base = exact and exact[f"{field}_mean"]
            row[f"{field}_vs_exact"] = row[f"{field}_mean"] / base if base and row[f"{field}_mean"] else None
    _mark_best(rows, runs, tables)
    return sorted(rows, key=lambda r: (tuple(_sortable(r[k]) for k in tables), _row_order(r), _sortable(r["batch_size"])))


def _mark_best(rows: list[dict], runs: list[dict], tables: tuple[str, ...]) -> None:
    """Set each row's ``metric_mode`` (its table's) and ``best``: whether its metric mean is the best of its
    table's (ties: each), the highest for ``max``, the lowest for ``min``; False where it has none.

    Raises:
        ValueError: the runs of one table disagree on the direction (give ``--metric-mode``).
    """
    modes: dict[tuple, set[str]] = {}
    for run in runs:
        modes.setdefault(tuple(run[k] for k in tables), set()).add(run["metric_mode"])
    for table, found in modes.items():
        if len(found) > 1:
            raise ValueError(f"--metric-mode: the runs of table {' '.join(map(str, table))} disagree on metric_mode "
                             f"({', '.join(sorted(found))}); give --metric-mode")
        (mode,) = found
        members = [r for r in rows if tuple(r[k] for k in tables) == table]
        means = [r["metric_mean"] for r in members if r["metric_mean"] is not None]
        best = (max if mode == "max" else min)(means, default=None)
        for row in members:
            row["metric_mode"], row["best"] = mode, best is not None and row["metric_mean"] == best


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _spread(mean: float | None, std: float | None) -> str:
    return _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std)}"


def settings_label(row: dict) -> str:
    """What sets a row's runs apart beyond r, mode and distribution: deflation, and options that are not the defaults.

    Rows read back from an older ``tables.csv`` may lack the options added since: they had the defaults.
    """
    label = f" deflation={row['deflation']} k={row.get('deflation_rank') or 1}" if row.get("deflation") else ""
    if row.get("relu", "bit") != "bit":
        label += f" relu={row['relu']}"
    if row.get("per_sample") not in (None, "", False, "False"):
        label += " per_sample"
    if row.get("contraction") not in (None, "", "auto"):
        label += f" contraction={row['contraction']}"
    for key in ("include", "exclude", "min_pixels", "max_compression"):
        if row.get(key) not in ("", None):
            label += f" {key}={row[key]}"
    if row.get("batchnorm_bits"):
        label += f" BN {row['batchnorm_bits']}-bit"
    if row.get("maxpool") not in (None, "", False, "False"):
        label += " pool offsets"
    if row.get("checkpointing"):
        label += f" checkpointing={row['checkpointing']}"
    return label


def setup_suffix(precision: str, processes) -> str:
    """``", bf16-mixed, 2 processes"`` for a table heading: the precision unless fp32, the DDP
    processes unless one (``processes`` an int, or a string as read back from ``tables.csv``)."""
    suffix = "" if precision == "32-true" else f", {precision}"
    return suffix + ("" if str(processes) == "1" else f", {processes} processes")


def row_label(row: dict, batch_rows: bool) -> str:
    if row.get("storage") == "planned":
        label = f"planner {row['budget']}x"
    elif row.get("storage") == "quantized":
        label = f"SR {row['bits']}-bit"
    elif str(row["probes"]) == "0":  # an int here, text in rows read back from tables.csv
        label = "exact"
    else:
        label = f"r={row['probes']} {row['mode']} {row['distribution']}" + (f" {row['bits']}-bit" if row.get("bits") else "")
    return label + settings_label(row) + (f", batch {row['batch_size']}" if batch_rows else "")


def markdown(rows: list[dict], batch_rows: bool = False) -> str:
    """The tables in markdown, one section per (task, data, model, settings, batch size unless ``batch_rows``,
    precision, processes, metric); the last column marks each table's best row by its metric's direction."""
    tables = table_keys(batch_rows)
    out = []
    for key in dict.fromkeys(tuple(r[k] for k in tables) for r in rows):
        named = dict(zip(tables, key))
        batch = "" if batch_rows else f", batch {named['batch_size']}"
        setup = setup_suffix(named["precision"], named["processes"])
        task, data, model, metric = named["task"], named["data"], named["model"], named["metric_name"]
        settings = f", {named['settings']}" if named["settings"] else ""
        members = [r for r in rows if tuple(r[k] for k in tables) == key]
        better = "higher" if members[0]["metric_mode"] == "max" else "lower"
        out += [f"### {task}: {model} on {data}{settings}{batch}{setup}", "",
                f"| estimator | {metric} (mean ± std) | runs | activation MiB | vs exact | peak MiB "
                f"| s/step | vs exact | ms/sample | vs exact | train s | vs exact | best ({better} is better) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in members:
            out.append(
                f"| {row_label(r, batch_rows)} | {_spread(r['metric_mean'], r['metric_std'])} | {r['runs']} "
                f"| {_fmt(r['activation_mib_mean'], 1)} | {_fmt(r['activation_mib_vs_exact'], 2)} "
                f"| {_fmt(r['peak_mib_mean'], 1)} | {_fmt(r['step_s_mean'], 4)} | {_fmt(r['step_s_vs_exact'], 2)} "
                f"| {_fmt(r['sample_ms_mean'], 2)} | {_fmt(r['sample_ms_vs_exact'], 2)} "
                f"| {_fmt(r['train_s_mean'], 1)} | {_fmt(r['train_s_vs_exact'], 2)} "
                f"| {'**best**' if r['best'] else ''} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--metric", default=None, help="final metric to tabulate (default: each run's metric_name)")
    parser.add_argument("--metric-mode", choices=("max", "min"), default=None,
                        help="whether higher (max) or lower (min) --metric is better (default: each run's metric_mode)")
    parser.add_argument("--out", type=Path, default=None, help="folder for tables.md and tables.csv")
    parser.add_argument("--batch-rows", action="store_true",
                        help="batch sizes as rows of one table (equal-memory comparison), not separate tables")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.run_dirs, args.metric, args.metric_mode)
    except (FileNotFoundError, KeyError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: RUN_DIR: no summary.json below {' '.join(map(str, args.run_dirs))}", file=sys.stderr)
        return 2
    try:
        rows = summarize(runs, args.batch_rows)
    except ValueError as err:  # the runs of one table disagree on the metric's direction
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    for row in rows:
        seeds = row["seeds"].split()
        if len(set(seeds)) < len(seeds):
            print(f"warning: {row_label(row, args.batch_rows)}{', ' + row['settings'] if row['settings'] else ''}: "
                  f"seeds {row['seeds']}: the same settings and seed ran more than once; averaged as if new seeds",
                  file=sys.stderr)
    text = markdown(rows, args.batch_rows)
    if args.out is None:
        print(text)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tables.md").write_text(text)
    write_csv(rows, args.out / "tables.csv")
    print(f"{len(runs)} runs, {len(rows)} rows -> {args.out / 'tables.md'}, {args.out / 'tables.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
