"""The benchmark suites run (smoke size, CPU) and write results in the documented schema."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args, timeout=900):
    r = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_train_smoke_writes_schema_and_plot(tmp_path):
    out = tmp_path / "smoke.json"
    run_bench("train", "--smoke", "--no-progress", "--out", str(out))
    result = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "date"):
        assert isinstance(result[key], str) and result[key], key
    names = [r["name"] for r in result["runs"]]
    assert names == ["reference", "reference+compile", "reference+sdpa", "guppy-fast"]
    ref = result["runs"][0]
    assert "skipped" not in ref and ref["target_eval_loss"] == ref["final_eval_loss"] and ref["seconds_to_target"] > 0
    on_gpu = not result["device"].startswith("CPU")
    for run in result["runs"]:
        for key in ("name", "seconds_to_target", "target_eval_loss", "final_eval_loss", "tokens_per_s", "mfu",
                    "peak_mem_mb"):
            assert key in run, (run["name"], key)
        if "skipped" in run:  # a run left out says why (torch.compile on a CPU), and claims no numbers
            assert isinstance(run["skipped"], str) and run["skipped"], run
            assert run["final_eval_loss"] is None and run["tokens_per_s"] is None, run
            continue
        # a run that ran has its numbers: finite, positive, the eval curve they come from, the reference's target
        assert positive(run["tokens_per_s"]) and positive(run["final_eval_loss"]), run
        assert run["eval_curve"] and run["final_eval_loss"] == run["eval_curve"][-1]["eval_loss"], run
        assert run["target_eval_loss"] == ref["final_eval_loss"], run
        if run["seconds_to_target"] is None:  # "not reached" must be true
            assert min(p["eval_loss"] for p in run["eval_curve"]) > run["target_eval_loss"], run
        else:
            assert positive(run["seconds_to_target"]), run
        # MFU needs a GPU's datasheet peak, peak memory the CUDA allocator: numbers on a GPU, None on a CPU
        assert (positive(run["mfu"]) and run["mfu"] < 1) if on_gpu else run["mfu"] is None, run
        assert positive(run["peak_mem_mb"]) if on_gpu else run["peak_mem_mb"] is None, run
    # the reference and reference+sdpa compute the same function from the same seed and data
    sdpa = result["runs"][2]
    assert abs(sdpa["final_eval_loss"] - ref["final_eval_loss"]) < 1e-3
    assert [p["step"] for p in ref["eval_curve"]] == sorted(p["step"] for p in ref["eval_curve"])
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_bench_step_cpu(tmp_path):
    out = tmp_path / "step.json"
    run_bench("step", "--device", "cpu", "--steps", "2", "--samples", "600", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["pad", "packed"]
    assert rows[1]["padding_fraction"] < rows[0]["padding_fraction"]
    assert all(r["ms_per_step"] > 0 and r["real_tokens_per_s"] > 0 for r in rows)
