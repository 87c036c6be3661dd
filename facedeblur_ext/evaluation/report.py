"""Write evaluation results: JSON, Markdown tables, PNG plots and example image grids.

:func:`write_report` takes the dicts of :mod:`facedeblur_ext.evaluation.protocols` and writes
into one folder:

* ``results.json``: everything except the example pixels (settings, metric provenance, per
  table and row the means, counts and time per image);
* ``results.md``: the same as Markdown tables (``n/a`` columns name their reason);
* ``<protocol>_bars.png``: per-row bars of each available metric;
* ``<protocol>_<table>.png``: PSNR and SSIM against kernel size or frame count;
* ``<protocol>_examples.png``: sharp | blurry | every row, for a few inputs;
* ``<protocol>_<name>.png`` / ``.gif``: a protocol's own pictures (the u-sweep grids and
  animations).

All files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .scoring import DEFAULT_METRICS, METRIC_INFO, METRICS

__all__ = ["format_table", "image_grid", "markdown_report", "save_png", "write_report"]


# ---------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> None:
    # The package's one atomic writer (files follow the umask, temporaries cleaned up).
    from facedeblur_ext.data.io import atomic_write_bytes

    atomic_write_bytes(path, data)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an [H, W, 3] uint8 image as PNG, atomically."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    path = Path(path)
    _atomic_write(path, buffer.getvalue())
    return path


def _save_figure(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _atomic_write(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------- tables


def _fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return METRIC_INFO[metric][2].format(value)


def format_table(rows: list[dict], cells: dict, available: dict, *,
                 columns=DEFAULT_METRICS, time_column: bool = True) -> str:
    """A Markdown table: one line per row, the metric columns and the time per image.

    Args:
        rows: the protocol's ``rows`` (name, ms_per_image, note).
        cells: row name -> summary (``Accumulator.summary``).
        available: metric -> computed here.
        columns: the metric columns, in order.
    """
    columns = [m for m in METRICS if m in columns]
    head = ["Method"] + [METRIC_INFO[m][0] for m in columns]
    if time_column:
        head.append("ms / image")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        name = row["name"]
        cell = cells.get(name)
        if cell is None:
            values = ["n/a"] * len(columns)
        else:
            values = [_fmt(m, cell.get(m)) if available.get(m) else "n/a" for m in columns]
            if "identity" in columns and available.get("identity") \
                    and cell.get("identity_count") is not None \
                    and cell.get("identity_count") < cell.get("images", 0):
                values[columns.index("identity")] += f" ({cell['identity_count']})"
        line = [name, *values]
        if time_column:
            ms = row.get("ms_per_image")
            line.append("-" if ms is None or cell is None else f"{ms:.1f}")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _stacked_table(rows: list[dict], table: dict, available: dict, columns) -> str:
    """Paper 003 Table 4's layout: one line per (method, group) with the group (e.g. the
    number of GT frames) and its number of pairs, then the metric columns."""
    columns = [m for m in METRICS if m in columns]
    head = ["Method", table["group_label"], "# of pairs",
            *(METRIC_INFO[m][0] for m in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for group in table["groups"]:
            cell = table["cells"].get(group, {}).get(row["name"])
            if cell is None:
                continue
            values = [_fmt(m, cell.get(m)) if available.get(m) else "n/a" for m in columns]
            lines.append("| " + " | ".join([row["name"], str(group), str(cell.get("images", 0)),
                                            *values]) + " |")
    return "\n".join(lines)


def _matrix_table(rows: list[dict], table: dict, available: dict) -> str:
    """Rows x groups, each cell "PSNR / SSIM" (LPIPS added when available)."""
    shown = [m for m in ("psnr", "ssim", "lpips") if available.get(m)]
    head = ["Method"] + [f"{table['group_label']} {g}" for g in table["groups"]]
    lines = [" / ".join(METRIC_INFO[m][0] for m in shown) + ":", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        line = [row["name"]]
        for group in table["groups"]:
            cell = table["cells"].get(group, {}).get(row["name"])
            line.append("n/a" if cell is None else
                        " / ".join(_fmt(m, cell.get(m)) for m in shown))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _na_notes(available: dict, reasons: dict, columns) -> list[str]:
    return [f"- {METRIC_INFO[m][0]}: n/a ({reasons.get(m, 'unavailable')})"
            for m in columns if not available.get(m)]


def _columns(meta: dict) -> list[str]:
    """The requested metric columns (all of the defaults for older metadata)."""
    info = meta["metrics"]
    requested = [m for m in METRICS if isinstance(info.get(m), dict) and info[m].get("requested")]
    return requested or list(DEFAULT_METRICS)


def _weights_line(meta: dict) -> str | None:
    weights = meta["metrics"].get("weights")
    if not isinstance(weights, dict):
        return None
    parts = []
    for metric, entry in weights.items():
        files = entry.get("files", [])
        if files and not any(f.get("missing") for f in files):
            pkgs = sorted({f"{f['package']} {f.get('version', '?')}" for f in files})
            parts.append(f"{metric}: {', '.join(pkgs)}")
    return ("Metric weights: " + "; ".join(parts) + ".") if parts else None


def markdown_report(results: list[dict], meta: dict) -> str:
    """The Markdown text of ``results.md``."""
    available = {m: v["available"] for m, v in meta["metrics"].items() if m in METRICS}
    reasons = {m: v.get("reason", "") for m, v in meta["metrics"].items() if m in METRICS}
    out = ["# facedeblur evaluation", ""]
    out.append(f"Command: `{meta['command']}`  ")
    out.append(f"Device: {meta['device']}; torch {meta['torch']}; seed {meta['seed']}.  ")
    out.append("Images are quantized to 8 bits before scoring. SSIM: Gaussian window "
               "(sigma 1.5). SFace ID distance: 1 - cosine; a count in parentheses is the number "
               "of pairs with a face on the sharp image, when not all. Time: the method only, "
               "per restored image.")
    columns = _columns(meta)
    weights = _weights_line(meta)
    if weights:
        out += ["", weights]
    notes = _na_notes(available, reasons, columns)
    if notes:
        out += ["", "Unavailable metrics:", *notes]
    for result in results:
        out += ["", f"## {result['title']}", ""]
        settings = ", ".join(f"{k}: {v}" for k, v in result["settings"].items())
        out += [f"Settings: {settings}", ""]
        for table in result["tables"]:
            out += [f"### {table['title']}", ""]
            if table.get("layout") == "stacked":
                out += [_stacked_table(result["rows"], table, available, columns), ""]
            elif table["group_label"] is None or len(table["groups"]) <= 2:
                for group in table["groups"]:
                    if table["group_label"] is not None:
                        out += [f"**{table['group_label']}: {group}**", ""]
                    out += [format_table(result["rows"], table["cells"].get(group, {}),
                                         available, columns=columns), ""]
            else:
                out += [_matrix_table(result["rows"], table, available), ""]
        described = [r for r in result["rows"] if r.get("description") or r.get("note")]
        if described:
            out += ["Rows:", ""]
            for r in described:
                text = r.get("description", "")
                if r.get("note"):
                    text = f"{text}; {r['note']}" if text else r["note"]
                out.append(f"- {r['name']}: {text}")
            out.append("")
        for name in result.get("figures", []):
            out.append(f"![{name}]({name})")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _bars(result: dict, available: dict, path: Path) -> Path | None:
    """Per-row bars of each available metric; one colour per group of the first table."""
    if not result["tables"]:
        return None
    table = result["tables"][0]
    metrics = [m for m in ("psnr", "ssim", "lpips", "identity", "fid") if available.get(m)]
    rows = [r["name"] for r in result["rows"]
            if any(r["name"] in table["cells"].get(g, {}) for g in table["groups"])]
    if not metrics or not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 0.5 * len(rows) + 1.6),
                             squeeze=False)
    groups = table["groups"]
    height = 0.8 / len(groups)
    for ax, metric in zip(axes[0], metrics):
        for gi, group in enumerate(groups):
            vals = [table["cells"].get(group, {}).get(r, {}).get(metric) for r in rows]
            ys = np.arange(len(rows)) + (gi - (len(groups) - 1) / 2) * height
            ax.barh(ys, [np.nan if v is None else v for v in vals], height=height,
                    label=group if len(groups) > 1 else None)
        ax.set_yticks(np.arange(len(rows)))
        ax.set_yticklabels(rows if ax is axes[0][0] else [""] * len(rows))
        ax.invert_yaxis()
        title, higher, _ = METRIC_INFO[metric]
        ax.set_title(f"{title} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    if len(groups) > 1:
        axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _number(text: str) -> float | None:
    """A group label as a number (kernel size, frame count, moment u), else None."""
    try:
        return float(text)
    except ValueError:
        return None


def _curves(result: dict, table: dict, available: dict, path: Path) -> Path | None:
    """PSNR, SSIM and LPIPS against a numeric group (kernel size, frame count, moment u)."""
    groups = [g for g in table["groups"] if _number(g) is not None]
    metrics = [m for m in ("psnr", "ssim", "lpips") if available.get(m)]
    if len(groups) < 2 or not metrics:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    xs = [_number(g) for g in groups]
    for ax, metric in zip(axes[0], metrics):
        for row in result["rows"]:
            ys = [table["cells"].get(g, {}).get(row["name"], {}).get(metric) for g in groups]
            if all(v is None for v in ys):
                continue
            ax.plot(xs, [np.nan if v is None else v for v in ys], marker="o", label=row["name"])
        ax.set_xlabel(table["group_label"])
        ax.set_ylabel(METRIC_INFO[metric][0])
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['title']}: {table['title']}", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def image_grid(rows: list[list[np.ndarray]], column_titles: list[str],
               row_titles: list[str] | None = None, *, tile: int | None = None,
               pad: int = 4) -> np.ndarray:
    """Tile images ([H, W, 3] uint8) into one labelled grid.

    Args:
        rows: one list of images per grid row (same length as ``column_titles``).
        column_titles: text above each column.
        row_titles: optional text at the left of each row.
        tile: side each image is resized to (default the largest image side).
        pad: spacing in pixels.

    Returns:
        [H, W, 3] uint8 grid on a white background.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("no images for the grid")
    tile = tile or max(max(img.shape[:2]) for row in rows for img in row)
    font = ImageFont.load_default()
    label_h = 14
    left = 0
    if row_titles:
        left = min(160, 7 * max(len(t) for t in row_titles) + 2 * pad)
    ncols = len(column_titles)
    width = left + ncols * (tile + pad) + pad
    height = label_h + pad + len(rows) * (tile + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles):
        x = left + pad + c * (tile + pad)
        text = title if len(title) * 6 <= tile + pad else title[: max(1, (tile + pad) // 6 - 1)]
        draw.text((x, 2), text, fill="black", font=font)
    for r, row in enumerate(rows):
        y = label_h + pad + r * (tile + pad)
        if row_titles:
            draw.text((pad, y + tile // 2 - 6), row_titles[r][: left // 7], fill="black",
                      font=font)
        for c, img in enumerate(row):
            pil = Image.fromarray(img)
            if pil.size != (tile, tile):
                scale = tile / max(pil.size)
                pil = pil.resize((max(1, round(pil.size[0] * scale)),
                                  max(1, round(pil.size[1] * scale))), Image.BICUBIC)
            canvas.paste(pil, (left + pad + c * (tile + pad), y))
    return np.asarray(canvas)


def _examples_grid(result: dict, path: Path) -> Path | None:
    examples = result.get("examples") or []
    if not examples:
        return None
    # A row that returns its input (the "blurry input" row) would repeat the blurry column.
    names = [r["name"] for r in result["rows"] if r["name"] in examples[0]["outputs"]
             and not all(np.array_equal(ex["outputs"][r["name"]], ex["blurry"])
                         for ex in examples)]
    titles = ["sharp", "blurry", *names]
    rows = [[ex["sharp"], ex["blurry"], *[ex["outputs"][n] for n in names]] for ex in examples]
    row_titles = [ex.get("caption", ex["name"]) for ex in examples]
    return save_png(image_grid(rows, titles, row_titles), path)


# ---------------------------------------------------------------------------- entry point


def _jsonable(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in ("examples", "pictures")}
    for key in ("examples", "pictures"):
        out[key] = [{k: v for k, v in ex.items()
                     if not isinstance(v, (np.ndarray, dict, list))}
                    for ex in result.get(key, [])]
    return out


def _pictures(result: dict, out_dir: Path) -> list[str]:
    """Write a result's ``pictures`` (``grid``: an image, ``gif``: a list of frames) as
    ``<protocol>_<name>.png`` and ``.gif``; returns the file names."""
    from facedeblur_ext.data.io import write_gif

    made = []
    for picture in result.get("pictures", []):
        stem = f"{result['protocol']}_{picture['name']}"
        if picture.get("grid") is not None:
            made.append(save_png(picture["grid"], out_dir / f"{stem}.png").name)
        if picture.get("gif"):
            write_gif(out_dir / f"{stem}.gif", picture["gif"], picture.get("fps", 4.0),
                      bounce=True)
            made.append(f"{stem}.gif")
    return made


def write_report(results: list[dict], meta: dict, out_dir: str | os.PathLike) -> dict:
    """Write all outputs; returns ``{"json": path, "markdown": path, "figures": [...]}``.

    Args:
        results: protocol result dicts.
        meta: run information: ``command``, ``device``, ``torch``, ``seed`` and ``metrics``
            (``MetricSuite.describe()``).
        out_dir: output folder (created).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    available = {m: v["available"] for m, v in meta["metrics"].items() if m in METRICS}
    figures = []
    for result in results:
        made = []
        protocol = result["protocol"]
        path = _bars(result, available, out_dir / f"{protocol}_bars.png")
        if path:
            made.append(path.name)
        for table in result["tables"]:
            if table["group_label"] and len(table["groups"]) > 2:
                path = _curves(result, table, available,
                               out_dir / f"{protocol}_{table['name']}.png")
                if path:
                    made.append(path.name)
        path = _examples_grid(result, out_dir / f"{protocol}_examples.png")
        if path:
            made.append(path.name)
        made += _pictures(result, out_dir)
        result["figures"] = made
        figures += made
    payload = {"meta": meta, "results": [_jsonable(r) for r in results]}
    json_path = out_dir / "results.json"
    _atomic_write(json_path, (json.dumps(payload, indent=2, default=str) + "\n").encode())
    md_path = out_dir / "results.md"
    _atomic_write(md_path, markdown_report(results, meta).encode())
    return {"json": json_path, "markdown": md_path, "figures": [out_dir / f for f in figures]}
