"""Output helpers of the benchmarks: JSON lines that survive a kill, markdown and text tables.

Measuring (inputs, timing, FLOPs, errors, the row schema) lives in `experiments.harness`.
"""

from __future__ import annotations

from tensorattn import workdir


def append_jsonl(path: str | None, row: dict) -> None:
    """Appends `row` as one fsynced line (`tensorattn.workdir.append_jsonl`); no-op without a
    path."""
    if path:
        workdir.append_jsonl(path, row)


def format_cell(v) -> str:
    """A table cell: floats to 3 significant digits, None as "-"."""
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """`rows` as a markdown table over `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], columns: list[str], out=print) -> None:
    """Prints `rows` as a fixed-width table over `columns`."""
    cells = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        out("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def config_fields(text: str) -> dict:
    """Kernel config fields written "name=value+name=value" (ints, or true/false) as a dict,
    e.g. "bwd_block_rows=64+bwd_fuse_k1=false"; ValueError for other text."""
    fields = {}
    for item in text.split("+"):
        name, sep, value = item.partition("=")
        low = value.lower()
        if not sep or not name or not (low in ("true", "false") or value.isdigit()):
            raise ValueError(f"{text!r}: expected name=value items (int, true/false) joined by +")
        fields[name] = low == "true" if low in ("true", "false") else int(value)
    return fields
