"""Small, generic output helpers for benchmarks: CSV, markdown tables, line plots, run info.

Every benchmark writes the same three artefacts under its --out directory:
`NAME.csv` (all columns), `NAME.md` (a table plus notes) and `NAME.png` (a plot).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def _fmt(value: Any, floatfmt: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def columns_of(rows: Sequence[Row]) -> list[str]:
    """Union of the rows' keys, in first-seen order."""
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def write_csv(path: str, rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    cols = list(columns or columns_of(rows))
    ensure_dir(os.path.dirname(path) or ".")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    return path


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None,
                   floatfmt: str = ".3g") -> str:
    cols = list(columns or columns_of(rows))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, ""), floatfmt) for c in cols) + " |")
    return "\n".join(lines)


def write_markdown(path: str, rows: Sequence[Row], columns: Sequence[str] | None = None,
                   title: str | None = None, notes: Iterable[str] = (),
                   meta: Mapping[str, Any] | None = None, floatfmt: str = ".3g") -> str:
    parts = [f"# {title}\n"] if title else []
    if meta:
        parts.append("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n")
    parts.append(markdown_table(rows, columns, floatfmt) + "\n")
    notes = list(notes)
    if notes:
        parts.append("\n".join(notes) + "\n")
    ensure_dir(os.path.dirname(path) or ".")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def plot_lines(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str, ylabel: str, title: str = "", logx: bool = False,
               logy: bool = False, styles: Mapping[str, str] | None = None) -> str | None:
    """One line per series name -> (xs, ys). Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), (styles or {}).get(name, "o-"), label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    ensure_dir(os.path.dirname(path) or ".")
    save_png(fig, path)
    plt.close(fig)
    return path


def save_png(fig, path: str) -> None:
    """`fig` as a PNG of at most 256 colours (Pillow, which matplotlib requires): line
    plots look the same at a third of the size (the 4-GPU capstone's gpu.png: 767 KB, 346
    KB), which keeps committed results under the device's carry limit."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(256)
    small.save(path, format="PNG", optimize=True)


def json_line(row: Row) -> str:
    return json.dumps(dict(row), separators=(", ", ": "))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_description() -> str:
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, nproc {ncpu}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def commit_id() -> str:
    """$PDSERVE_COMMIT when set (a copy of the tree without .git), else git's short HEAD
    with "+dirty" when tracked files differ from it."""
    if os.environ.get("PDSERVE_COMMIT"):
        return os.environ["PDSERVE_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "none") + ("+dirty" if dirty else "")


def print_rows(rows: list[Row], columns: Sequence[str], as_json: bool,
               floatfmt: str = ".4g") -> None:
    """The run's table on stdout, then one JSON line per row when asked."""
    print(markdown_table(rows, columns, floatfmt=floatfmt))
    if as_json:
        for r in rows:
            print(json_line(r))


def run_metadata(device: str = "cpu") -> dict[str, str]:
    """Where and when a result was taken: date, commit (see commit_id), host, torch, device."""
    meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "commit": commit_id()}
    try:
        import torch
        meta["torch"] = torch.__version__
        if device.startswith("cuda") and torch.cuda.is_available():
            meta["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        else:
            meta["device"] = f"cpu ({os.cpu_count()} cores)"
    except ImportError:
        meta["device"] = device
    return meta
