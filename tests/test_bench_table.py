"""scripts/bench_table.py: the README benchmark table from benchmarks/results."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def bench_table():
    spec = importlib.util.spec_from_file_location("bench_table",
                                                  REPO_ROOT / "scripts" / "bench_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_committed_results_file_is_understood(bench_table):
    rows, used, skipped = bench_table.collect(RESULTS)
    assert all("a measurement" in s for s in skipped), skipped
    assert len(used) + len(skipped) == len(list(RESULTS.rglob("*.json")))
    assert rows and all(set(bench_table.COLUMNS) <= set(r) for r in rows)
    ops = " ".join(r["op"] for r in rows)
    for name in ("blur_synthesize", "trajectory_kernels", "separable_norm"):
        assert name in ops


def test_readme_update_is_idempotent(bench_table, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((REPO_ROOT / "README.md").read_text())
    argv = ["--results", str(RESULTS), "--readme", str(readme)]
    assert bench_table.main(argv) == 0
    first = readme.read_text()
    assert bench_table.main(argv) == 0
    assert readme.read_text() == first
    assert bench_table.main([*argv, "--check"]) == 0
    inside = first.split(bench_table.START, 1)[1].split(bench_table.END, 1)[0]
    table = [line for line in inside.splitlines() if line.startswith("|")]
    assert table[0] == "| op | device | shape | ours | reference | ratio | target |"
    assert len(table) > 10 and all(line.count("|") == 8 for line in table)
    # what is outside the markers is kept
    before = (REPO_ROOT / "README.md").read_text().split(bench_table.START)[0]
    assert first.startswith(before)
    # a stale table is detected
    readme.write_text(first.replace(table[3], "| stale | - | - | - | - | - | - |"))
    assert bench_table.main([*argv, "--check"]) == 1


def test_markers_are_added_when_missing(bench_table, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n")
    assert bench_table.main(["--results", str(RESULTS), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# project\n") and bench_table.START in text
    assert text.rstrip().endswith(bench_table.END)


def test_pytest_benchmark_json_pairs_implementations(bench_table, tmp_path):
    def case(impl, median):
        return {"name": f"test_op[cuda-{impl}-64]", "params": {"device": "cuda", "impl": impl,
                                                                "size": 64},
                "stats": {"median": median}, "extra_info": {"device_name": "H100"}}

    data = {"machine_info": {"cpu": {"brand_raw": "x"}}, "benchmarks": [
        case("fused", 0.001), case("reference", 0.004), case("torchvision", 0.002)]}
    (tmp_path / "bench_cuda.json").write_text(json.dumps(data))
    (tmp_path / "other.json").write_text(json.dumps({"something": 1}))
    rows, used, skipped = bench_table.collect(tmp_path)
    assert [r["op"] for r in rows] == ["op vs reference", "op vs torchvision"]
    assert [r["ratio"] for r in rows] == ["4x", "2x"]
    assert rows[0]["device"] == "cuda (H100)" and rows[0]["shape"] == "size=64"
    assert len(skipped) == 1 and "unknown format" in skipped[0]


def test_pytest_benchmark_cases_covered_by_a_summary_file_are_not_repeated(bench_table,
                                                                            tmp_path):
    def case(name, impl, median):
        return {"name": f"{name}[cuda-{impl}]", "params": {"device": "cuda", "impl": impl},
                "stats": {"median": median}}

    data = {"machine_info": {}, "benchmarks": [
        case("test_blur_synthesize", "fused", 0.01), case("test_blur_synthesize", "cv2", 0.1),
        case("test_blur_synthesize", "fused_noise", 0.02), case("test_new_op", "fused", 0.01),
        case("test_new_op", "reference", 0.03)]}
    (tmp_path / "bench_cuda.json").write_text(json.dumps(data))
    rows, _, _ = bench_table.collect(tmp_path)
    # without a summary: every pairing, but never ours against its own variants
    assert sorted(r["op"] for r in rows) == ["blur_synthesize vs cv2", "new_op vs reference"]
    summary = json.loads((RESULTS / "cpu_blur.json").read_text())
    summary.update(device_kind="cuda", device="H100")
    (tmp_path / "cuda_blur.json").write_text(json.dumps(summary))
    rows, _, _ = bench_table.collect(tmp_path)
    ops = [r["op"] for r in rows]
    assert "blur_synthesize vs cv2" not in ops and "new_op vs reference" in ops
    assert "blur_synthesize vs grouped conv2d" in ops
