"""Turning a run's record into what people read: a JSON file, PNG plots, and a markdown table
written into README.md between markers (so a rerun replaces it instead of appending)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def write_json(record: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__dict__"):
        return vars(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.3g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_between_markers(text: str, name: str, body: str) -> str:
    """Replace what stands between `<!-- name:start -->` and `<!-- name:end -->` (appending the
    marked block at the end when the markers are missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_readme(name: str, body: str, readme: Path = README) -> None:
    readme.write_text(replace_between_markers(readme.read_text(), name, body))


def plot_lines(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list, list | None]]):
    """One line per series: name -> (x, y mean, y spread or None), spread drawn as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, (x, y, spread) in series.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
        if spread is not None:
            lo = [a - b for a, b in zip(y, spread, strict=True)]
            hi = [a + b for a, b in zip(y, spread, strict=True)]
            ax.fill_between(x, lo, hi, alpha=0.15)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
