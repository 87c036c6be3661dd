#!/usr/bin/env python3
"""Generate the README's benchmark table from the JSON files in ``benchmarks/results``.

Reads every ``*.json`` under the results folder (recursively, so the GPU script's
``gpu-latest/`` is included), recognises each writer's format, and renders one Markdown table
with the columns op | device | shape | ours | reference | ratio | target. The table replaces
whatever lies between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` in the
README; running it twice gives the same README.

Formats understood (a file in none of them is listed as skipped on stderr):

* ``<device>_blur.json`` (benchmarks/bench_blur.py): ratios, targets and medians;
* ``cfmd_<device>.json``, ``snadnet_<device>.json`` (bench_cfmd.py, bench_snadnet.py):
  reference vs fused training step, time and saved-for-backward memory;
* ``<device>_separable_norm.json`` (bench_separable_norm.py, script mode): one row per
  shape, region count and mode vs the reference, plus the geometric mean vs F.instance_norm;
* ``<device>_modulated_deform_conv.json`` (bench_modulated_deform_conv.py): the latest run,
  ours vs the reference and torchvision, time and peak memory;
* ``cpu_data.json`` (bench_data.py): DataLoader throughput, warm vs cold face-analysis cache;
* ``<device>_metrics.json`` (bench_metrics.py): metric time vs its reference;
* files with a ``measurement`` key and no ``benchmark`` key (training curves and the like)
  are not comparisons and are left out;
* pytest-benchmark's ``--benchmark-json`` output (e.g. the GPU script's
  ``bench_cuda.json``): cases of one test that differ only in their implementation parameter
  (``impl``/``backend_name``/``backend``) are paired, the fused or ``ours`` one against each
  other one.

Usage::

    python scripts/bench_table.py                 # update README.md in place
    python scripts/bench_table.py --print         # print the table only
    python scripts/bench_table.py --check         # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
COLUMNS = ("op", "device", "shape", "ours", "reference", "ratio", "target")

Row = dict


# ------------------------------------------------------------------------------- formatting


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_bytes(count: float | None) -> str:
    if not count:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def fmt_ratio(value: float | None, unit: str = "x") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.3g}{unit}"


def _cpu_device(data: dict, threads_key: str | None = None) -> str:
    name = data.get("device") or data.get("device_name") or "cpu"
    if isinstance(name, dict):
        name = name.get("name", "cpu")
    threads = data.get(threads_key) if threads_key else None
    return f"cpu ({name}{f', {threads} thr' if threads else ''})"


def _device(kind: str, data: dict, threads_key: str | None = None) -> str:
    if kind == "cpu":
        return _cpu_device(data, threads_key)
    name = data.get("device") or data.get("device_name") or kind
    return f"{kind} ({name})" if name != kind else kind


def _row(op, device, shape, ours, reference, ratio, target="-") -> Row:
    return dict(zip(COLUMNS, (op, device, shape, ours, reference, ratio, target)))


# ------------------------------------------------------------------------------- adapters


def _blur(data: dict, path: Path) -> list[Row]:
    kind = data.get("device_kind", "cpu")
    device = _device(kind, data, "cpu_threads")
    results, ratios = data.get("results", {}), data.get("ratios", {})
    targets = data.get("targets", {})
    setup = data.get("setup", {})
    batch = "x".join(str(v) for v in setup.get("batch", [])) or "?"
    ksize = setup.get("kernel_size", "?")
    cases = [
        ("trajectory_kernels vs Python walk", f"{ksize}x{ksize} kernel, 2000 steps",
         "trajectory_fused", "trajectory_python", "trajectory_vs_python"),
        ("blur_synthesize vs grouped conv2d", f"{batch}, K={ksize}, mask",
         "blur_fused", "blur_grouped_conv", "blur_vs_grouped_conv"),
        ("blur_synthesize vs cv2.filter2D loop", f"{batch}, K={ksize}, mask",
         "blur_fused", "blur_cv2", "blur_vs_cv2"),
        ("BlurSynthesizer vs reference", f"{batch}, default config",
         "synthesizer_fused", "synthesizer_reference", "synthesizer_vs_reference"),
    ]
    rows = []
    for op, shape, ours, ref, ratio in cases:
        if ours not in results or ref not in results:
            continue
        target = targets.get(ratio, {}).get("target")
        rows.append(_row(op, device, shape, fmt_time(results[ours]["median_s"]),
                         fmt_time(results[ref]["median_s"]), fmt_ratio(ratios.get(ratio)),
                         f">= {target:g}x" if target else "-"))
    return rows


def _training_step(label: str, size_keys: Callable[[dict], str]):
    def adapter(data: dict, path: Path) -> list[Row]:
        kind = data.get("device_kind", "cpu")
        device = _device(kind, data, "cpu_threads")
        results = data.get("results", {})
        ref, fused = results.get("reference"), results.get("fused")
        cfg = ref or fused or {}
        shape = size_keys(cfg) + (" (reduced)" if data.get("reduced_size") else "")
        if ref and fused and not ref.get("out_of_memory") and not fused.get("out_of_memory"):
            rows = [_row(f"{label}", device, shape, fmt_time(fused["median_s"]),
                         fmt_time(ref["median_s"]), fmt_ratio(ref["median_s"]
                                                              / fused["median_s"]))]
            saved_f, saved_r = (fused.get("saved_for_backward_bytes"),
                                ref.get("saved_for_backward_bytes"))
            if saved_f and saved_r:
                rows.append(_row(f"{label}, saved-for-backward memory", device, shape,
                                 fmt_bytes(saved_f), fmt_bytes(saved_r),
                                 fmt_ratio(saved_f / saved_r)))
            return rows
        only = ref if ref else fused
        if not only or only.get("out_of_memory"):
            return []
        return [_row(f"{label}", device, shape,
                     fmt_time(only.get("median_s")) if fused else "not measured",
                     fmt_time(only.get("median_s")) if ref else "not measured", "-")]
    return adapter


def _separable_norm(data: dict, path: Path) -> list[Row]:
    kind = data.get("device_type", "cpu")
    name = str(data.get("device", kind)).split(" (")[0]
    device = (f"cpu ({name}, {data.get('torch_threads')} thr)" if kind == "cpu"
              else f"{kind} ({name})")
    rows, vs_in = [], {}
    for case in data.get("results", []):
        impls = case.get("impls", {})
        fused, ref = impls.get("fused"), impls.get("reference")
        shape = "x".join(map(str, case["shape"])) + f", R={case['regions']}, {data.get('dtype')}"
        if fused and ref:
            rows.append(_row(f"separable_norm {case['mode']}", device, shape,
                             fmt_time(fused["median_ms"] / 1e3), fmt_time(ref["median_ms"] / 1e3),
                             fmt_ratio(ref["median_ms"] / fused["median_ms"])))
        if "speedup_vs_instance_norm" in case:
            vs_in.setdefault(case["mode"], []).append(case["speedup_vs_instance_norm"])
    for mode, values in vs_in.items():
        rows.append(_row(f"separable_norm {mode} vs F.instance_norm + affine (yardstick)",
                         device, f"geomean of {len(values)} cases", "-", "-",
                         fmt_ratio(statistics.geometric_mean(values))))
    return rows


def _deform(data: dict, path: Path) -> list[Row]:
    runs = data.get("runs") or []
    if not runs:
        return []
    run = max(runs, key=lambda r: r.get("timestamp", ""))
    cases = run.get("cases", [])
    rows = []
    for case in cases:
        if case["impl"] != "ours":
            continue
        kind = case["device"]
        device = (f"cpu ({run.get('device_name', 'cpu')}, {run['config'].get('threads')} thr)"
                  if kind == "cpu" else f"{kind} ({run.get('device_name', kind)})")
        shape = (f"{case['batch']}x{case['channels']}x{case['size']}x{case['size']}, 3x3"
                 + (" (reduced)" if run.get("reduced_problem") else ""))
        for peer in ("reference", "torchvision"):
            other = next((c for c in cases if c["impl"] == peer and all(
                c[k] == case[k] for k in ("device", "channels", "size", "mode", "batch"))), None)
            if other is None:
                continue
            peer_name = "reference" if peer == "reference" else "torchvision"
            rows.append(_row(f"modulated_deform_conv2d {case['mode']} vs {peer_name}", device,
                             shape, fmt_time(case["median_s"]), fmt_time(other["median_s"]),
                             fmt_ratio(other["median_s"] / case["median_s"])))
            if case.get("peak_extra_bytes") and other.get("peak_extra_bytes"):
                rows.append(_row(f"modulated_deform_conv2d {case['mode']} peak memory vs "
                                 f"{peer_name}", device, shape,
                                 fmt_bytes(case["peak_extra_bytes"]),
                                 fmt_bytes(other["peak_extra_bytes"]),
                                 fmt_ratio(case["peak_extra_bytes"]
                                           / other["peak_extra_bytes"])))
    return rows


def _data(data: dict, path: Path) -> list[Row]:
    dev = data.get("device", {})
    device = f"cpu ({dev.get('name', 'cpu')}, {dev.get('logical_cpus', '?')} cpus)"
    rows = []
    for mode, r in data.get("results", {}).items():
        shape = (f"{r.get('crop', '?')} px crops, batch {r.get('batch_size', '?')}, "
                 f"{r.get('num_workers', '?')} workers")
        rows.append(_row(f"DataLoader {mode} (warm vs cold analysis cache)", device, shape,
                         f"{r['warm_cache_samples_per_s']:.3g} samples/s",
                         f"{r['cold_cache_samples_per_s']:.3g} samples/s",
                         fmt_ratio(r.get("warm_over_cold"))))
    return rows


def _metrics(data: dict, path: Path) -> list[Row]:
    device = _device(data.get("device_type", "cpu"), data, "threads")
    rows = []
    for name, r in data.get("results", {}).items():
        shape = f"{data.get('image_size', '?')} px, batch {r.get('batch', '?')}"
        ours = fmt_time(r["ms_per_item"] / 1e3) + " / img"
        if "reference_ms_per_item" in r:
            rows.append(_row(f"metric {name} vs {r.get('reference', 'reference')}", device,
                             shape, ours, fmt_time(r["reference_ms_per_item"] / 1e3) + " / img",
                             fmt_ratio(r.get("speedup_vs_reference"))))
        else:
            rows.append(_row(f"metric {name}", device, shape, ours, "-", "-"))
    return rows


_IMPL_KEYS = ("impl", "backend_name", "backend", "impl_name")
_OURS = ("fused", "ours")
#: pytest test function -> the summary file family that reports the same cases; such
#: pytest-benchmark rows are left out when that summary exists for the device.
_TEST_FAMILIES = {
    "test_trajectory_kernels": "blur", "test_blur_synthesize": "blur",
    "test_blur_synthesizer": "blur", "test_cfmd_train_iteration": "cfmd",
    "test_generator_train_step": "snadnet", "test_separable_norm": "separable_norm",
    "test_modulated_deform_conv": "modulated_deform_conv",
    "test_dataloader_throughput": "data",
}


def _pytest_benchmark(data: dict, path: Path) -> list[Row]:
    machine = data.get("machine_info", {})
    cpu = (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "cpu"
    by_case: dict[tuple, dict[str, dict]] = {}
    for bench in data.get("benchmarks", []):
        params = dict(bench.get("params") or {})
        key = next((k for k in _IMPL_KEYS if k in params), None)
        if key is None:
            continue
        impl = str(params.pop(key))
        base = bench.get("name", "").split("[")[0]
        ident = (base, tuple(sorted((k, str(v)) for k, v in params.items())))
        by_case.setdefault(ident, {})[impl] = bench
    rows = []
    for (base, params), impls in sorted(by_case.items()):
        ours_name = next((n for n in _OURS if n in impls), None)
        if ours_name is None:
            continue
        ours = impls[ours_name]["stats"]["median"]
        params_d = dict(params)
        kind = params_d.pop("device", "cpu")
        device = kind if kind != "cpu" else f"cpu ({cpu})"
        gpu = impls[ours_name].get("extra_info", {}).get("device_name")
        if gpu:
            device = f"{kind} ({gpu})"
        shape = ", ".join(f"{k}={v}" for k, v in params_d.items()) or "-"
        for other_name, other in sorted(impls.items()):
            if other_name.startswith(_OURS):  # ours itself and its variants (dtype, options)
                continue
            ref = other["stats"]["median"]
            row = _row(f"{base.removeprefix('test_')} vs {other_name}", device, shape,
                       fmt_time(ours), fmt_time(ref), fmt_ratio(ref / ours))
            row["_covered_by"] = (_TEST_FAMILIES.get(base), kind)
            rows.append(row)
    return rows


def detect(data, path: Path) -> tuple[str, Callable] | None:
    """The adapter for one results file, or None."""
    if not isinstance(data, dict):
        return None
    if "measurement" in data and "benchmark" not in data:
        return "measurement", None  # e.g. a training curve: no op against a reference
    if set(data) == {"meta", "results"} and "command" in data["meta"]:
        return "evaluation", None  # `facedeblur eval` tables: quality, not speed
    if {"checkpoint", "faces", "rows"} <= set(data):
        return "demo", None  # `facedeblur demo` metrics: quality, not speed
    if "benchmarks" in data and "machine_info" in data:
        return "pytest-benchmark", _pytest_benchmark
    bench = str(data.get("benchmark", ""))
    if bench.startswith("blur synthesis"):
        return "blur", _blur
    if bench.startswith("CFMD-GAN training iteration"):
        return "cfmd", _training_step(
            "CFMD-GAN train iteration (D+G)",
            lambda c: f"B={c.get('batch', '?')}, {c.get('size', '?')} px, "
                      f"{c.get('blocks_per_stage', '?')} blocks/stage")
    if bench.startswith("SNADNet generator training step"):
        return "snadnet", _training_step(
            "SNADNet generator train step",
            lambda c: f"B={c.get('batch', '?')}, {c.get('size', '?')} px, "
                      f"width {c.get('width', '?')}")
    if bench == "separable_norm":
        return "separable_norm", _separable_norm
    if bench == "modulated_deform_conv2d":
        return "modulated_deform_conv", _deform
    if bench.startswith("DataLoader throughput"):
        return "data", _data
    if bench == "metrics":
        return "metrics", _metrics
    return None


# ------------------------------------------------------------------------------- table


def collect(results_dir: Path) -> tuple[list[Row], list[str], list[str]]:
    """Rows from every results file, the files used and the files skipped (with reasons)."""
    rows, used, skipped = [], [], []
    for path in sorted(results_dir.rglob("*.json")):
        try:
            rel = path.resolve().relative_to(REPO_ROOT)
        except ValueError:
            rel = path
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            skipped.append(f"{rel}: unreadable ({exc})")
            continue
        found = detect(data, path)
        if found is None:
            skipped.append(f"{rel}: unknown format")
            continue
        family, adapter = found
        if adapter is None:
            if family == "evaluation":
                what = f"facedeblur eval: {data['meta']['command']}"
            elif family == "demo":
                what = f"facedeblur demo with {data['checkpoint']}"
            else:
                what = data["measurement"]
            skipped.append(f"{rel}: a measurement ({what}), not a comparison")
            continue
        produced = adapter(data, path)
        if produced:
            for row in produced:
                row.setdefault("_family", (family, row["device"].split(" ")[0]))
            rows.extend(produced)
            used.append(str(rel))
        else:
            skipped.append(f"{rel}: no comparable cases")
    # pytest-benchmark cases that a summary file already reports for the device
    summaries = {r["_family"] for r in rows if "_covered_by" not in r}
    rows = [r for r in rows if r.get("_covered_by") not in summaries]
    return rows, used, skipped


def render(rows: list[Row], used: list[str]) -> str:
    """The Markdown between the markers (without them)."""
    def key(row):
        return (0 if row["device"].startswith("cuda") else 1, row["op"], row["shape"])

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in sorted(rows, key=key):
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in COLUMNS)
                     + " |")
    note = ("Generated by `python scripts/bench_table.py` from "
            + ", ".join(f"`{u}`" for u in used)
            + ". ratio = reference time / ours (for memory and throughput rows: ours / "
            "reference). CPU numbers come from a shared, loaded 2-core machine; each file "
            "records its command, device and versions.")
    return "\n".join(["", note, "", *lines, ""])


def update_readme(readme: Path, table: str) -> str:
    """README text with ``table`` between the markers (appended as a new section when the
    markers are missing)."""
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _old, tail = rest.split(END, 1)
        return f"{head}{START}\n{table.strip()}\n{END}{tail}"
    return (text.rstrip() + "\n\n## Benchmarks\n\n" + f"{START}\n{table.strip()}\n{END}\n")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the table, change nothing")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 when the README table is not up to date")
    args = parser.parse_args(argv)
    rows, used, skipped = collect(args.results)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    table = render(rows, used)
    if args.print:
        print(table)
        return 0
    current = args.readme.read_text()
    updated = update_readme(args.readme, table)
    if args.check:
        if updated != current:
            print(f"{args.readme} is out of date: run python scripts/bench_table.py",
                  file=sys.stderr)
            return 1
        return 0
    if updated != current:
        _atomic_write(args.readme, updated)
    print(f"{len(rows)} rows from {len(used)} file(s) -> {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
