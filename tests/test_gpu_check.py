"""benchmarks/gpu_check.sh (issue 24): its dry run's first section leaves a summary.json with the
numbers, the real mode stops at once with one instruction when the data or CUDA is missing, and
the perf helpers behind it (epoch times, FLOPs, nested results) say what they should."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from selfsup.perf import count_flops, epoch_times, issue_and_device

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
COPY = "mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/"


def _run(args, tmp_path, **env):
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), **env}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_machine_section_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--cpu-dry-run", "--only", "1", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    machine = summary["machine"]
    assert machine["matmul_tflops"] > 0 and machine["copy_gbps"] > 0
    assert "read" in machine["copy"] and "written" in machine["copy"]  # the byte count says what it counts
    assert summary["run"]["dry_run"] == 1 and summary["run"]["torch"].startswith(torch.__version__)
    assert [s["status"] for s in summary["sections"].values()] == ["ok"]
    assert "matmul ceiling" in (out / "gpu_check.log").read_text()
    assert len(list(out.iterdir())) <= 8


def test_real_mode_without_data_stops_at_once_with_the_instruction(tmp_path):
    proc = _run(["--out", str(tmp_path / "out")], tmp_path, DATA=str(tmp_path / "missing.tar.gz"))
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and COPY in lines[0] and "carry .data" in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing ran


def test_real_mode_without_cuda_stops_with_one_line(tmp_path):
    data = tmp_path / "cifar10-jpeg.tar.gz"
    data.write_bytes(b"")
    proc = _run(["--out", str(tmp_path / "out")], tmp_path, DATA=str(data), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-dry-run" in lines[0], lines


def test_epoch_times_steady_state_and_first_epoch_excess(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"epoch": e, "step": 97 * e, "seconds": s, "images_per_s": 49664 / s}
            for e, s in zip(range(1, 5), (40.0, 10.0, 12.0, 11.0))]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    e = epoch_times(metrics)
    assert e["steps_per_epoch"] == 97 and e["epochs"] == 4 and e["steady_epochs"] == "2-4"
    assert e["steady_s_per_epoch"] == 11.0 and e["steady_sd"] == 1.0 and e["first_epoch_excess_s"] == 29.0
    assert e["train_seconds"] == 73.0


def test_count_flops_counts_forward_and_backward_and_cpu_has_no_device_time():
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8)
    # forward 2*5*8*4; backward: the weight's gradient only (x needs none), as much again
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * 5 * 8 * 4)
    issue, device = issue_and_device(lambda: layer(x), torch.device("cpu"), iters=3)
    assert issue > 0 and device is None


def test_run_py_results_nest_slash_keys_and_stay_valid_json(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmarks_run", REPO / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    path = tmp_path / "r.json"
    results = run.Results(str(path))
    results.put("steps/batch 64", {"simclr": {"ratio": 1.5}})
    results.put("steps/batch 512", {"simclr": {"ratio": 1.2}})
    assert json.loads(path.read_text()) == {"steps": {"batch 64": {"simclr": {"ratio": 1.5}},
                                                      "batch 512": {"simclr": {"ratio": 1.2}}}}
