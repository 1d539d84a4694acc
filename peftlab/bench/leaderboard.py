"""Result files of ``peftlab bench quality``: merging shards, ranking methods, the report and the plot.

A result file is ``{"command": ..., "commands": [...], "rows": [...]}``, one row per training run
(track, method, impl, seed, lr) plus each track's base-model row (method ``base``). Shards written by
parallel processes merge into one file; a row for the same run in a later file replaces the earlier
one, except that a failed run never replaces a finished one. Rows of one track must share one budget
(epochs, data, evaluation limits): numbers from different budgets are not comparable, so merging
them is an error.

Ranking: per (track, method, impl) the learning rate with the best mean average accuracy over seeds
is kept. The learning rate is chosen on the same held-out sets that are reported (there is no
separate validation set), which flatters every method by a similar amount.
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_atomically, write_json

# Options naming files and folders of one process (its shard, claims, the results it skips or merges):
# parallel workers differ only in these, so the report lists their common command once.
PROCESS_OPTIONS = ("--output", "--claim-dir", "--skip-done", "--merge")
ROW_KEYS = ("track", "method", "impl", "seed", "lr", "trainable_params", "peak_gib", "wall_s", "accuracy", "avg")
BASE = "base"


class ResultsError(PeftlabError, ValueError):
    """Result rows that cannot be combined or read."""


def succeeded(row: dict[str, Any]) -> bool:
    return not row.get("error") and row.get("avg") is not None


def row_key(row: dict[str, Any]) -> tuple:
    lr = row["lr"]
    return row["track"], row["method"], row["impl"], None if lr is None else float(lr), row["seed"]


def merge_rows(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of all groups, one per run; later groups win unless their row failed and the earlier did not."""
    merged: dict[tuple, dict[str, Any]] = {}
    for rows in groups:
        for row in rows:
            missing = [k for k in ROW_KEYS if k not in row]
            if missing:
                raise ResultsError(f"row {row.get('method')!r} lacks {', '.join(missing)}")
            key = row_key(row)
            earlier = merged.get(key)
            if earlier is not None and succeeded(earlier) and not succeeded(row):
                continue
            merged[key] = row
    rows = list(merged.values())
    check_budgets(rows)
    return rows


def check_budgets(rows: list[dict[str, Any]]) -> None:
    """Every row of a track must come from the same budget."""
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        budget = row.get("budget") or {}
        seen = first.setdefault(row["track"], budget)
        if budget != seen:
            differing = sorted(k for k in set(seen) | set(budget) if seen.get(k) != budget.get(k))
            detail = ", ".join(f"{k}: {seen.get(k)!r} vs {budget.get(k)!r}" for k in differing)
            raise ResultsError(f"{row['track']} rows come from different budgets ({detail}); "
                               f"compare runs of one budget only")


def canonical_command(command: str) -> str:
    """``command`` with the values of ``PROCESS_OPTIONS`` replaced by ``<...>``."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    kept, skipping = [], False
    for word in words:
        if skipping and not word.startswith("--"):
            continue
        skipping = word in PROCESS_OPTIONS
        kept += [word, "<...>"] if skipping else [word]
    return shlex.join(kept).replace("'<...>'", "<...>")


def read_results(paths: list[str | Path]) -> dict[str, Any]:
    """The merged content of result files (later files win, as in ``merge_rows``)."""
    commands, groups = [], []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ResultsError(f"cannot read results {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ResultsError(f"{path} is not a quality result file (no 'rows' list)")
        for command in data.get("commands", [data.get("command")]):
            if command and canonical_command(command) not in commands:
                commands.append(canonical_command(command))
        groups.append(data["rows"])
    return {"commands": commands, "rows": merge_rows(*groups)}


def write_results(path: Path, command: str, commands: list[str], rows: list[dict[str, Any]]) -> None:
    ordered = sorted(rows, key=lambda r: (r["track"], r["method"] != BASE, r["method"], r["impl"],
                                          r["lr"] or 0.0, r["seed"]))
    commands = list(dict.fromkeys(canonical_command(c) for c in commands))
    write_json(path, {"command": canonical_command(command), "commands": commands, "rows": ordered})


# --------------------------------------------------------------------------------------------------
# Ranking


@dataclass
class Entry:
    """One (track, method, impl, lr): the mean over its seeds."""

    track: str
    method: str
    impl: str
    lr: float | None
    seeds: list[int]
    avg: float
    spread: float | None  # standard deviation over seeds (None with one seed)
    accuracy: dict[str, float]
    trainable_params: int
    peak_gib: float | None
    wall_s: float
    per_seed: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.method if self.impl == "peftlab" else f"{self.method} (PEFT)"


def lr_entries(rows: list[dict[str, Any]]) -> list[Entry]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if succeeded(row):
            groups[row_key(row)[:4]].append(row)
    entries = []
    for (track, method, impl, lr), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        avgs = [r["avg"] for r in runs]
        sets = sorted({s for r in runs for s in r["accuracy"]})
        peaks = [r["peak_gib"] for r in runs if r["peak_gib"] is not None]
        entries.append(Entry(track, method, impl, lr, [r["seed"] for r in runs], statistics.fmean(avgs),
                             statistics.stdev(avgs) if len(avgs) > 1 else None,
                             {s: statistics.fmean(r["accuracy"][s] for r in runs if s in r["accuracy"]) for s in sets},
                             runs[0]["trainable_params"], max(peaks) if peaks else None,
                             statistics.fmean(r["wall_s"] for r in runs), avgs))
    return entries


def leaderboard(rows: list[dict[str, Any]], track: str | None = None) -> list[Entry]:
    """Best learning rate per (track, method, impl), best average first."""
    best: dict[tuple, Entry] = {}
    for entry in lr_entries(rows):
        if track is not None and entry.track != track:
            continue
        key = entry.track, entry.method, entry.impl
        if key not in best or _better(entry, best[key]):
            best[key] = entry
    return sorted(best.values(), key=lambda e: (e.track, -e.avg, e.trainable_params, e.label))


def _better(entry: Entry, other: Entry) -> bool:
    # More seeds first: a learning rate rerun with a second seed stays the chosen one.
    return (entry.avg, len(entry.seeds)) > (other.avg, len(other.seeds))


def top_entries(rows: list[dict[str, Any]], k: int, track: str) -> list[Entry]:
    """The k best (method, impl) pairs of ``track`` at their best learning rate, base excluded."""
    return [e for e in leaderboard(rows, track) if e.method != BASE][:k]


# --------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _lr(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _setting(value: Any) -> str:
    return "/".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _avg_cell(entry: Entry) -> str:
    return f"{entry.avg:.1f} ± {entry.spread:.1f}" if entry.spread is not None else f"{entry.avg:.1f}"


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = ["# Quality benchmark", ""]
    lines += [f"- `{c}`" for c in result.get("commands", [])] + [""]
    for track in sorted({r["track"] for r in rows}):
        lines += _track_section(track, [r for r in rows if r["track"] == track])
    failed = [r for r in rows if not succeeded(r)]
    if failed:
        lines += ["## Runs without a result", "", "| track | method | impl | lr | seed | error |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(failed, key=row_key_text):
            error = str(r.get("error") or "no accuracy").replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {r['track']} | {r['method']} | {r['impl']} | {_lr(r['lr'])} | {r['seed']} | {error} |")
        lines.append("")
    return "\n".join(lines)


def row_key_text(row: dict[str, Any]) -> tuple:
    return row["track"], row["method"], row["impl"], row["lr"] or 0.0, row["seed"]


def _track_section(track: str, rows: list[dict[str, Any]]) -> list[str]:
    board = leaderboard(rows, track)
    budget = next((r.get("budget") for r in rows if r.get("budget")), {})
    found = {s for e in board for s in e.accuracy}
    sets = [s for s in budget.get("sets", []) if s in found] + sorted(found - set(budget.get("sets", [])))
    lines = [f"## {track} track", "", "Budget: " + ", ".join(f"{k} {_setting(v)}" for k, v in budget.items()), ""]
    lines += ["Best learning rate per method (chosen on these held-out sets), best average first; "
              "± is the standard deviation over seeds.", ""]
    head = ["#", "method", "impl", "lr", "seeds", "trainable", "avg %", *sets, "peak GiB", "wall s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, e in enumerate(board, start=1):
        cells = [str(rank), e.method, e.impl, _lr(e.lr), ",".join(map(str, e.seeds)), f"{e.trainable_params:,}",
                 _avg_cell(e), *[_fmt(e.accuracy.get(s)) for s in sets], _fmt(e.peak_gib, 2), _fmt(e.wall_s, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _parity_table(board) + _lr_table(rows)
    return lines


def _parity_table(board: list[Entry]) -> list[str]:
    by_pair = {(e.method, e.impl): e for e in board}
    methods = sorted({m for m, impl in by_pair if impl == "peft" and (m, "peftlab") in by_pair})
    if not methods:
        return []
    lines = ["peftlab beside HF PEFT (same harness, data, budget; each at its best learning rate):", "",
             "| method | trainable peftlab | trainable PEFT | avg peftlab | avg PEFT | difference "
             "| wall peftlab / PEFT |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        ours, theirs = by_pair[(m, "peftlab")], by_pair[(m, "peft")]
        lines.append(f"| {m} | {ours.trainable_params:,} | {theirs.trainable_params:,} | {ours.avg:.1f} | "
                     f"{theirs.avg:.1f} | {ours.avg - theirs.avg:+.1f} | {ours.wall_s / theirs.wall_s:.2f} |")
    return lines + [""]


def _lr_table(rows: list[dict[str, Any]]) -> list[str]:
    entries = [e for e in lr_entries(rows) if e.method != BASE]
    lrs = sorted({e.lr for e in entries})
    counts = defaultdict(int)
    for e in entries:
        counts[(e.method, e.impl)] += 1
    if not any(c > 1 for c in counts.values()):
        return []
    lines = ["Average accuracy at each learning rate tried (mean over seeds):", "",
             "| method | impl | " + " | ".join(_lr(lr) for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    table = {(e.method, e.impl, e.lr): e.avg for e in entries}
    for method, impl in sorted(counts):
        cells = [_fmt(table.get((method, impl, lr))) if (method, impl, lr) in table else "" for lr in lrs]
        lines.append(f"| {method} | {impl} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(rows: list[dict[str, Any]], target: Path) -> bool:
    """Average accuracy against trainable parameters (log scale), one panel per track; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tracks = sorted({r["track"] for r in rows if succeeded(r)})
    if not tracks:
        return False
    fig, axes = plt.subplots(1, len(tracks), figsize=(7.5 * len(tracks), 5.5), squeeze=False)
    for ax, track in zip(axes[0], tracks):
        _plot_track(ax, track, leaderboard(rows, track))
    fig.tight_layout()
    write_atomically(target, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def _plot_track(ax, track: str, board: list[Entry]) -> None:
    for impl, marker, color in (("peftlab", "o", "tab:blue"), ("peft", "s", "tab:orange")):
        points = [e for e in board if e.impl == impl and e.method != BASE and e.trainable_params > 0]
        if not points:
            continue
        ax.scatter([e.trainable_params for e in points], [e.avg for e in points], marker=marker, color=color,
                   label="peftlab" if impl == "peftlab" else "HF PEFT", zorder=3)
        for e in points:
            ax.annotate(e.method, (e.trainable_params, e.avg), fontsize=7, xytext=(3, 3), textcoords="offset points")
    base = next((e for e in board if e.method == BASE), None)
    if base is not None:
        ax.axhline(base.avg, color="gray", linestyle="--", label=f"base {base.avg:.1f}%")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("average accuracy %")
    ax.set_title(f"{track} track: best learning rate per method")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


def write_report(result: dict[str, Any], stem: Path, command: str) -> list[Path]:
    """<stem>.json, <stem>.md and (with matplotlib) <stem>.png; returns the files written."""
    stem = Path(stem)
    json_path = stem.with_suffix(".json")
    write_results(json_path, command, result["commands"], result["rows"])
    md_path = stem.with_suffix(".md")
    write_atomically(md_path, lambda tmp: tmp.write_text(markdown(result)))
    written = [json_path, md_path]
    png_path = stem.with_suffix(".png")
    if plot(result["rows"], png_path):
        written.append(png_path)
    return written
