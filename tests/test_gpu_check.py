"""python -m bench gpu-check: the CPU smoke end to end (so the script cannot rot), and CPU twins of the logic that
only a GPU run exercises: timeouts and crashes of a stage, the deadline, the install step, the sanitizer command and
its report, pytest's counts, the container runtime, the graph-vs-eager comparison, the kernel case selection.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu_check as gc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_smoke_runs_every_stage_and_writes_json_log_and_table(tmp_path):
    """~2 min on a 2-core machine (30 s of CPU): every stage passes or says why it skipped."""
    r = subprocess.run([sys.executable, "-m", "bench", "gpu-check", "--cpu-smoke", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["cpu_smoke"] is True and result["summary"]["fail"] == 0
    assert sorted(s["name"] for s in result["stages"]) == sorted(s.name for s in gc.STAGES)
    for s in result["stages"]:
        assert set(s) >= {"name", "status", "why", "seconds", "cpu_s", "budget_s", "figures", "first_error"}
        assert s["status"] in ("pass", "skip") and (s["status"] == "pass") == (s["why"] is None), s
    by = {s["name"]: s for s in result["stages"]}
    assert by["environment"]["figures"]["nvidia_smi"] in ("absent", None) or "," in by["environment"]["figures"][
        "nvidia_smi"]
    assert result["torch"] == torch.__version__ and result["device"].startswith("CPU")
    assert by["tests"]["figures"]["passed"] >= 1 and by["tests"]["figures"]["failed"] == 0
    assert by["csrc-build"]["figures"]["available"] is True
    assert by["graph"]["figures"]["update_rel_diff"] == 0.0            # the eager step against itself
    assert "ran on the host emulator: ok" in by["memcheck"]["why"]
    assert by["kernels"]["figures"]["cases"] > 0
    step_files = [f for f in os.listdir(tmp_path) if f.startswith("step-")]
    assert len(step_files) == 1 and len(json.loads((tmp_path / step_files[0]).read_text())["rows"]) == 4
    assert len(os.listdir(tmp_path)) <= gc.MAX_FILES
    log = (tmp_path / "gpu-check.log").read_text()
    assert all(f"===== {s.name}: " in log for s in gc.STAGES)
    assert r.stdout.strip().splitlines()[-1].startswith("gpu-check on CPU")   # the table ends the output


def _stage(name, budget=30):
    return gc.Stage(name, 1, budget, budget)


def _python(code):
    return [sys.executable, "-c", code]


def _alive(pid, wait=5.0):
    """Is pid still running after up to `wait` s? A zombie (killed, not yet reaped by init) counts as ended."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.1)
    return True


def test_a_hanging_crashing_or_failing_stage_is_recorded_and_the_others_still_run(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    commands = {
        # a hang, with a child of its own (as pytest workers or nvcc would be): both must end at the timeout
        "hangs": _python(f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
                         f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"),
        "crashes": _python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"),
        "fails": _python(f"print('working'); print('{gc.MARK}' + '{{\"fail\": \"boom: one line\"}}'); "
                         "raise SystemExit(1)"),
        "passes": _python(f"print('{gc.MARK}' + '{{\"figures\": {{\"x\": 1}}}}')"),
    }
    stages = [_stage("hangs", budget=2), _stage("crashes"), _stage("fails"), _stage("passes")]
    records = []
    t = time.monotonic()
    gc.run_phase(stages, str(tmp_path), str(tmp_path), False, time.monotonic() + 60,
                 lambda rec, text: records.append(rec), command=lambda s: commands[s.name])
    assert time.monotonic() - t < 20
    by = {r["name"]: r for r in records}
    assert by["hangs"]["status"] == "fail" and by["hangs"]["why"].startswith("timed out after 2 s")
    assert not _alive(int(pid_file.read_text()))       # the stage's own child went with it
    assert by["crashes"]["status"] == "fail" and by["crashes"]["why"] == "killed by signal SIGSEGV"
    assert by["fails"]["status"] == "fail" and by["fails"]["why"] == "boom: one line"
    assert by["passes"]["status"] == "pass" and by["passes"]["figures"] == {"x": 1}
    assert all(r["cpu_s"] >= 0 for r in records)


def test_no_stage_starts_after_the_deadline_and_none_runs_past_it(tmp_path):
    records = []
    gc.run_phase([_stage("late")], str(tmp_path), str(tmp_path), False, time.monotonic() + 2,
                 lambda rec, text: records.append(rec), command=lambda s: _python("pass"))
    assert records[0]["status"] == "skip" and "not started" in records[0]["why"]
    records.clear()
    t = time.monotonic()
    gc.run_phase([_stage("slow", budget=60)], str(tmp_path), str(tmp_path), False, time.monotonic() + 7,
                 lambda rec, text: records.append(rec), command=lambda s: _python("import time; time.sleep(60)"))
    assert records[0]["status"] == "fail" and records[0]["budget_s"] <= 7 and time.monotonic() - t < 15


def test_only_rejects_unknown_stages_in_one_line_before_making_anything(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bench", "gpu-check", "--only", "tests,nonsense", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"python -m bench gpu-check: --only: unknown stage(s) nonsense; choose from {', '.join(gc.BY_NAME)}"]
    assert not out.exists()


def test_first_error_prefers_sanitizer_reports_then_failed_tests_then_exceptions():
    sanitizer = ("========= COMPUTE-SANITIZER\nsome progress\n========= Invalid __global__ read of size 2 bytes\n"
                 "=========     at attn_fwd(GuppyAttnParams)+0x1a0\nRuntimeError: CUDA error\n")
    assert gc.first_error(sanitizer) == "========= Invalid __global__ read of size 2 bytes"
    pytest_out = ("tests/test_x.py ..F\nE   AssertionError: 3 != 4\n"
                  "FAILED tests/test_x.py::test_y[cuda-fp16] - AssertionError: 3 != 4\n1 failed, 2 passed\n")
    assert gc.first_error(pytest_out).startswith("FAILED tests/test_x.py::test_y[cuda-fp16]")
    traceback = ('Traceback (most recent call last):\n  File "x.py", line 1\n'
                 'torch.OutOfMemoryError: CUDA out of memory\n')
    assert gc.first_error(traceback) == "torch.OutOfMemoryError: CUDA out of memory"
    assert gc.first_error("attention.cu(12): error: identifier \"x\" is undefined\n").startswith("attention.cu(12)")
    assert gc.first_error("all good\n" + gc.MARK + '{"figures": {"error": 1}}\n') is None


def test_sanitizer_command_and_its_summary():
    cmd = gc.sanitizer_command("racecheck", "/usr/local/cuda/bin/compute-sanitizer", python="python3")
    assert cmd[:8] == ["/usr/local/cuda/bin/compute-sanitizer", "--tool", "racecheck", "--kernel-name", "kns=attn_",
                       "--error-exitcode", "1", "python3"]
    assert cmd[8].endswith(os.path.join("bench", "csrc_sanitize.py")) and cmd[9:] == ["--device", "cuda"]
    assert gc.sanitizer_summary("...\n========= ERROR SUMMARY: 0 errors\n")["errors"] == 0
    assert gc.sanitizer_summary("========= ERROR SUMMARY: 3 errors\n")["errors"] == 3
    race = gc.sanitizer_summary("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n")
    assert (race["errors"], race["warnings"]) == (1, 1)
    assert gc.sanitizer_summary("========= Error: Device not supported\n")["errors"] is None


def test_stage_environments():
    assert gc.stage_env(gc.BY_NAME["csrc-build-sm75"], False)["GUPPY_CSRC_ARCH"] == "75"
    assert gc.stage_env(gc.BY_NAME["csrc-sm75-parity"], False)["GUPPY_CSRC_ARCH"] == "75"
    assert gc.stage_env(gc.BY_NAME["memcheck"], False)["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    assert "GUPPY_CSRC_ARCH" not in gc.stage_env(gc.BY_NAME["csrc-build"], False)
    assert gc.stage_env(gc.BY_NAME["tests"], True)["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", "1")


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="ok"/>'
                   '<testcase classname="tests.test_a" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="tests.test_b" name="gpu"><skipped message="needs a GPU"/></testcase>'
                   '<testcase classname="tests.test_b" name="err"><error message="fixture"/></testcase>'
                   '</testsuite></testsuites>')
    assert gc.junit_counts(str(xml)) == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                                         "failing": ["tests.test_a::bad", "tests.test_b::err"]}


def test_container_runtime_from_what_the_project_machines_reported():
    assert gc.container_runtime("6.18.44-fc-v310-gpu") == "firecracker"
    assert gc.container_runtime("4.4.0") == "gvisor"
    assert gc.container_runtime("5.15.0-91-generic", "[    0.000000] Starting gVisor...") == "gvisor"
    assert gc.container_runtime("5.15.0-91-generic") in ("unknown", "docker")


def test_install_runs_pip_only_when_guppy_is_not_importable(monkeypatch):
    calls = []

    def run(cmd):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    with pytest.raises(gc.Skip, match="importable"):
        gc.stage_install(None, probe=lambda: (True, "/x/guppy/__init__.py"), run=run)
    assert calls == []
    answers = iter([(False, "ModuleNotFoundError: No module named 'guppy.kernels'"), (True, "/repo/guppy")])
    gc.stage_install(None, probe=lambda: next(answers), run=run)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT]]
    with pytest.raises(SystemExit, match="pip install failed"):
        gc.stage_install(None, probe=lambda: (False, "no"), run=lambda cmd: subprocess.CompletedProcess(cmd, 1))


@pytest.fixture
def one_thread():
    """Tiny CPU work in one thread: OpenMP's spinning workers stall a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_graph_comparison_catches_a_step_that_differs(one_thread):
    """The graph stage's comparison, fed a 'graph' step that clips gradients harder than the eager one."""
    from guppy.train import train_step

    def different(model, opt, scaler):
        return lambda b: train_step(model, b, opt, scaler, 1e-3, torch.device("cpu"), None)

    same = gc.graph_vs_eager("cpu", smoke=True, steps=3)
    assert same["update_rel_diff"] == 0.0 and same["bitwise_equal_weights"]
    r = gc.graph_vs_eager("cpu", smoke=True, steps=3, make_graph_step=different)
    assert r["update_rel_diff"] > gc.GRAPH_TOLERANCE["update_rel_diff"] and not r["bitwise_equal_weights"]
    assert r["loss_graph"][0] == r["loss_eager"][0]       # same start: the first loss is taken before any update


def test_kernel_cases_are_the_guppy_shape_and_the_largest_per_op():
    cases = gc.select_kernel_cases(torch.float16)
    shapes = {(c.suite, c.shape.replace(" packed", "")) for c in cases}
    assert shapes == {("layer_norm", "4096x384"), ("layer_norm", "8192x4096"), ("cross_entropy", "4096x4096"),
                      ("cross_entropy", "8192x32000"), ("attention", "B32 H6 T128 D64"),
                      ("attention", "B2 H6 T2048 D64")}
    assert not {c.impl for c in cases} & set(gc.KERNEL_SKIPPED_IMPLS)
    assert {"ours", "ours-triton", "ours-csrc"} <= {c.impl for c in cases}


def test_make_gpu_check_passes_out_and_runs_without_a_venv():
    r = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/o", "PY=/nonexistent/python"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "-m bench gpu-check --out \"/tmp/o\"" in r.stdout and "python3" in r.stdout


# ----------------------------------------------------------------------------------------------------------------------
# The test environment: Triton < 3.7's interpreter and NumPy >= 2.4 (finding 7)
# ----------------------------------------------------------------------------------------------------------------------
def test_interpreter_numpy_note_names_the_broken_combination_only():
    from conftest import interpreter_numpy_note
    note = interpreter_numpy_note("3.6.0", "2.4.1")
    assert note.startswith("note: Triton 3.6.0's interpreter fails with NumPy 2.4.1") and "numpy<2.4" in note
    assert "\n" not in note
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.1"), ("3.9.0", "2.5.2"),
                                          ("3.6.0+git1a2b", "2.0.2")):
        assert interpreter_numpy_note(triton_version, numpy_version) is None


def test_test_extras_keep_numpy_below_2_4():
    import ast
    from packaging.requirements import Requirement
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    numpy_reqs = [Requirement(r) for r in extras["test"] if Requirement(r).name == "numpy"]
    assert numpy_reqs and all(not req.specifier.contains("2.4.0") and req.specifier.contains("2.3.5")
                              for req in numpy_reqs)


# ----------------------------------------------------------------------------------------------------------------------
# The GPU branches of the stages, run here with fakes for what only a GPU machine has
# ----------------------------------------------------------------------------------------------------------------------
def _fake_tool(tmp_path, name, script):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def _reported(capsys):
    figures, skip, fail = gc.reports(capsys.readouterr().out)
    return figures


def test_environment_reads_nvidia_smi(tmp_path, monkeypatch, capsys):
    _fake_tool(tmp_path, "nvidia-smi", 'case "$*" in *query-gpu*) echo "580.159.04, 1980 MHz, 1980 MHz, 2619 MHz, '
                                       '120.50 W, 35";; *) echo "| NVIDIA H100 80GB HBM3 |";; esac\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gc.stage_environment(gc.Ctx(str(tmp_path), str(tmp_path), smoke=True))
    figures = _reported(capsys)
    assert figures["nvidia_smi"] == "580.159.04, 1980 MHz, 1980 MHz, 2619 MHz, 120.50 W, 35"
    assert figures["torch"] == torch.__version__ and figures["kernel"] and figures["runtime"]


@pytest.mark.parametrize("report,rc,fails_with", [
    ("========= COMPUTE-SANITIZER\\ncsrc_sanitize: 4 cases ok on cuda\\n========= ERROR SUMMARY: 0 errors", 0, None),
    ("========= Invalid __shared__ read of size 4 bytes\\n=========     at attn_bwd_dkv+0x90\\n"
     "========= ERROR SUMMARY: 1 error", 1, "memcheck: ========= Invalid __shared__ read of size 4 bytes"),
    ("========= Error: Device not supported", 1, "memcheck: ========= Error: Device not supported"),
])
def test_sanitizer_stage_passes_only_on_a_clean_summary(tmp_path, monkeypatch, capsys, report, rc, fails_with):
    import guppy.targets
    fake = _fake_tool(tmp_path, "compute-sanitizer", f'printf "{report}\\n"; exit {rc}\n')
    monkeypatch.setattr(guppy.targets, "find_cuda_tool", lambda name: fake if name == "compute-sanitizer" else None)
    monkeypatch.setattr(gc, "need_cuda", lambda ctx: None)
    ctx = gc.Ctx(str(tmp_path), str(tmp_path), smoke=False)
    if fails_with is None:
        gc.stage_sanitizer(ctx, "memcheck")
        assert _reported(capsys)["errors"] == 0
    else:
        with pytest.raises(SystemExit) as e:
            gc.stage_sanitizer(ctx, "memcheck")
        assert str(e.value.code) == fails_with


def test_kernels_stage_writes_its_result_from_measured_rows(tmp_path, monkeypatch, capsys):
    """Everything of the kernels stage but do_bench: recorded rows in place of measurements, one of ours failing."""
    import bench.common
    import bench.kernels

    def measure(case, copy_gbs):
        row = {"suite": case.suite, "shape": case.shape, "impl": case.impl, "fwd_ms": [0.1, 0.09, 0.11],
               "bwd_ms": [0.2, 0.19, 0.21], "fwd_bwd_ms": [0.3, 0.29, 0.31], "peak_mem_mb": 1.0}
        if case.bytes_fwd:
            row.update(fwd_bwd_gbs=1500.0, fraction_of_copy_bw=0.5)
        if case.flops_fwd:
            row.update(fwd_tflops=100.0, fwd_bwd_tflops=120.0)
        if case.impl == "sdpa-cudnn":
            return {"suite": case.suite, "shape": case.shape, "impl": case.impl, "error": "RuntimeError: no cuDNN"}
        return row

    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
           "date": "2026-11-26"}
    monkeypatch.setattr(gc, "need_cuda", lambda ctx: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(bench.kernels, "copy_bandwidth_gbs", lambda: 3000.0)
    monkeypatch.setattr(bench.kernels, "measure", measure)
    monkeypatch.setattr(bench.common, "environment", lambda *a, **k: dict(env))
    gc.stage_kernels(gc.Ctx(str(tmp_path), str(tmp_path), smoke=False))
    result = json.loads((tmp_path / "kernels-nvidia-h100-80gb-hbm3-2026-11-26.json").read_text())
    assert result["dtype"] == "bfloat16" and len(result["rows"]) == len(gc.select_kernel_cases(torch.bfloat16))
    figures = _reported(capsys)
    assert figures["copy_gbs"] == 3000.0 and figures["ours_fwd_bwd_ms"]["layer_norm 4096x384 ours"] == 0.3

    monkeypatch.setattr(bench.kernels, "measure", lambda case, gbs: {**measure(case, gbs), "error": "boom"}
                        if case.impl == "ours" else measure(case, gbs))
    with pytest.raises(SystemExit, match="layer_norm 4096x384 ours: boom"):
        gc.stage_kernels(gc.Ctx(str(tmp_path), str(tmp_path), smoke=False))


def test_graph_timing_reports_ms_per_step_of_both(one_thread):
    r = gc.graph_vs_eager("cpu", smoke=True, steps=2, timed_steps=2)
    assert r["eager_ms"] > 0 and r["graph_ms"] > 0


def test_pytest_command_on_a_gpu_uses_workers_and_leaves_the_emulator_cases_out():
    cmd = gc.pytest_command(["tests/test_attention.py"], "/w/t.xml", "not cpu", workers=8)
    assert cmd[:4] == [sys.executable, "-m", "pytest", "tests/test_attention.py"]
    assert "--junitxml=/w/t.xml" in cmd and cmd[cmd.index("-k") + 1] == "not cpu" and cmd[cmd.index("-n") + 1] == "8"
    assert "-x" not in cmd                                     # every test runs: the counts are the result



# ----------------------------------------------------------------------------------------------------------------------
# The tests stage's selection, run with the kernels compiled as on a GPU (finding 3 of issue 18)
# ----------------------------------------------------------------------------------------------------------------------
def test_tests_stage_runs_the_one_gpu_test_selection(tmp_path, monkeypatch):
    """The stage runs gpu_tests_command's selection: the one the notebook's parity cell and the next test run."""
    calls = []
    monkeypatch.setattr(gc, "need_cuda", lambda ctx: None)
    gc.stage_tests(gc.Ctx(str(tmp_path), str(tmp_path), smoke=False), run=lambda *args: calls.append(args))
    (files, junit, keyword, workers), = calls
    assert gc.pytest_command(files, junit, keyword, workers) == gc.gpu_tests_command(junit, workers)
    assert keyword == gc.GPU_TEST_KEYWORD == "not cpu"
    assert files == [os.path.join("tests", f) for f in gc.GPU_TEST_FILES]


def test_gpu_test_selection_passes_with_the_kernels_compiled(tmp_path):
    """On a GPU the kernels are compiled, so a test of gpu-check's selection that hands a kernel a CPU tensor fails
    there ("got a CPU tensor"). GUPPY_TEST_COMPILED=1 (tests/conftest.py) runs the stage's own command here as it runs
    there: the interpreter off, what needs CUDA skipped. 20-40 s on 2 shared cores."""
    import xml.etree.ElementTree as ET
    junit = tmp_path / "tests.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GUPPY_TEST_COMPILED="1", OMP_NUM_THREADS="1")
    r = subprocess.run(gc.gpu_tests_command(str(junit)), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 5 and junit.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    counts = gc.junit_counts(str(junit))
    assert (counts["failed"], counts["errors"], r.returncode) == (0, 0, 0), \
        f"{counts['failed']} failed, {counts['errors']} errors: {counts['failing']}\n{r.stdout[-4000:]}"
    skipped = [s.get("message", "") for s in ET.parse(junit).getroot().iter("skipped")]
    assert counts["passed"] > 0 and any("GUPPY_TEST_COMPILED=1 without a GPU" in s for s in skipped), counts
