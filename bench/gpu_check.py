"""One prepared GPU check: everything guppy needs a GPU for, in one run of at most 6 minutes on an H100.

    python -m bench gpu-check [--out DIR] [--only STAGE,...] [--cpu-smoke]          (make gpu-check OUT=DIR)

The lead's commands on this project's device tool (H100/H200, torch 2.11 + triton 3.6 preinstalled, no network), the
first with timeout_s=420 (the run stops starting stages at 5 min 40 s), the second with timeout_s=600 on the same
machine or a fresh one (time to quality, <= 9 min; its JSON is rewritten after every run, so a cut keeps what finished):
    make gpu-check OUT=$OUT
    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -u -m bench train --no-progress --out $OUT
If gpu-check's `step` figures project the reference run (10,000 pad steps) over ~130 s, split the second in two calls:
`--runs reference,reference+sdpa --out $OUT`, commit that JSON under bench/results/, then
`--runs reference+compile,guppy-fast --target-from bench/results/<that file> --out $OUT`.
Then the recipe sweep (issue 12; every variant of bench/recipe.py at full size, <= 8 min, timeout_s=600), against the
committed reference curve, on data prepared as that curve's was (the tool checks the fingerprint):
    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -m guppy prepare --out /tmp/d && \
        python3 -u -m bench recipe --data /tmp/d --out $OUT/recipe.json --no-progress \
        --target-from bench/results/reference-curve-guppy-9m-cpu-x86-64-2-cores-2026-11-26.json

Stages, each a child process (`python -m bench gpu-check --stage NAME`) with its own timeout, so a hang or a crash
in one is recorded and the next one runs. Budgets are timeouts, sized for an H100 from estimates (no GPU has run
this file yet; the JSON records each stage's seconds, so the next run can size them from measurements):
    phase  stage             budget s  what
    0      install               60    `pip install --no-deps --no-build-isolation -e .` when guppy is not importable
    1      environment           30    nvidia-smi, versions, nvcc/compute-sanitizer/ncu, kernel and container runtime
    1      csrc-build           150    nvcc build for the GPU's own arch + self-check (available())
    1      csrc-build-sm75      150    GUPPY_CSRC_ARCH=75: the T4 code as compute_75 PTX, JIT-compiled here + self-check
    1      data                  60    4,000 conversations for the step stage
    2      tests                150    GPU_TEST_FILES -k GPU_TEST_KEYWORD on CUDA tensors (CI runs it compiled on a CPU)
    2      csrc-sm75-parity      90    tests/test_csrc_attention.py with GUPPY_CSRC_ARCH=75
    2      memcheck              90    compute-sanitizer on bench/csrc_sanitize.py (packed, causal, dropout, fwd+bwd)
    2      racecheck            120    the same, shared-memory races
    2      synccheck             90    the same, barrier misuse
    2      export                60    tests/test_export.py, where it exists (onnx and onnxruntime are there)
    2      guppy-info            30    `python -m guppy info`
    3      graph                 45    guppy-9m-fast: 5 steps as a CUDA graph vs eager (losses, weights); ms per step
    3      kernels               75    bench kernels: guppy shape + one large shape per op, no torch.compile builds
    3      step                  45    bench step: guppy-9m ms/step and tokens/s, pad vs packed, reference vs auto
    3      host                  60    bench host: the host side of guppy-9m-fast's loop on this machine's CPUs
The stages of a phase run side by side (phase 3 alone on the GPU: it times things); a phase starts when the one
before it ends. A run stops starting stages at DEADLINE_S (5 min 40 s): one not started says so.

Output in DIR (default bench/results/gpu-check-<device>-<date>/), at most 8 files: gpu-check.json (device, versions,
and per stage: name, status pass/fail/skip, why, seconds, budget, figures, first error line), gpu-check.log (every
stage's whole output), kernels-*.json/png, step-*.json and host-*.json. The table printed last is what a remote
tail shows.

--cpu-smoke: the same stages on the CPU, tiny, in under 3 minutes (CI: tests/test_gpu_check.py). What only a GPU can
do is skipped with its reason, or replaced by its CPU twin: the host-emulator csrc build, the sanitizer script on the
emulator, the graph stage with the eager step standing in for the capture, the kernel cases selected but not timed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "GPU-CHECK "  # a child's line to the parent: MARK + {"figures": {...}}, {"skip": why} or {"fail": why}
DEADLINE_S = 340              # stop starting stages here: 6 minutes minus the parent's own start and the table
SMOKE_DEADLINE_S = 600        # smoke budgets are hang guards: a 2-core CI machine shared with other jobs is slow
MAX_FILES = 8
SIDE_BY_SIDE_PHASES = {1, 2}  # phase 3 times things: its stages run one at a time, alone on the GPU


@dataclass
class Stage:
    name: str
    phase: int
    budget_s: float
    smoke_budget_s: float
    env: dict = field(default_factory=dict)


STAGES = [
    Stage("install", 0, 60, 120),
    Stage("environment", 1, 30, 120),
    Stage("csrc-build", 1, 150, 300),
    Stage("csrc-build-sm75", 1, 150, 60, env={"GUPPY_CSRC_ARCH": "75"}),
    Stage("data", 1, 60, 120),
    Stage("tests", 2, 150, 300),
    Stage("csrc-sm75-parity", 2, 90, 60, env={"GUPPY_CSRC_ARCH": "75"}),
    Stage("memcheck", 2, 90, 300, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
    Stage("racecheck", 2, 120, 60),
    Stage("synccheck", 2, 90, 60),
    Stage("export", 2, 60, 120),
    Stage("guppy-info", 2, 30, 120),
    Stage("graph", 3, 45, 120),
    Stage("kernels", 3, 75, 120),
    Stage("step", 3, 45, 120),
    Stage("host", 3, 60, 180),
]
BY_NAME = {s.name: s for s in STAGES}


# ----------------------------------------------------------------------------------------------------------------------
# Reading what a stage printed
# ----------------------------------------------------------------------------------------------------------------------
_ERROR_PATTERNS = [
    re.compile(r"^=+ (Invalid|Race|Barrier|Error|ERROR|Program hit|Uninitialized|Warp|Misaligned|Out-of-range)"),
    re.compile(r"^(FAILED|ERROR) \S"),                                       # pytest -rfE summary
    re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:|$)"),   # the last line of a traceback
    re.compile(r"\berror\b:|\bfatal\b", re.IGNORECASE),                      # nvcc, ninja, the shell
]


def first_error(text: str) -> str | None:
    """The line that best says what went wrong: a sanitizer report, a failed test, an exception, a compiler error
    (in that order of preference); None when nothing looks like an error."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip() and not line.startswith(MARK)]
    for pattern in _ERROR_PATTERNS:
        for line in lines:
            if pattern.search(line.strip()):
                return line.strip()[:300]
    return None


def reports(text: str) -> tuple[dict, str | None, str | None]:
    """(figures, skip reason, fail reason) from a child's MARK lines; later figures override earlier ones."""
    figures, skip, fail = {}, None, None
    for line in text.splitlines():
        if line.startswith(MARK):
            msg = json.loads(line[len(MARK):])
            figures.update(msg.get("figures", {}))
            skip, fail = msg.get("skip", skip), msg.get("fail", fail)
    return figures, skip, fail


def sanitizer_summary(text: str) -> dict:
    """Errors compute-sanitizer reported: its 'ERROR SUMMARY: N errors' (memcheck, synccheck) or 'RACECHECK SUMMARY:
    N hazards displayed (E errors, W warnings)' line; None where neither was printed (it did not get that far)."""
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    if m:
        return {"errors": int(m.group(1)), "summary": m.group(0)}
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if m:
        return {"errors": int(m.group(2)), "warnings": int(m.group(3)), "summary": m.group(0)}
    return {"errors": None, "summary": None}


def junit_counts(path: str) -> dict:
    """passed/failed/errors/skipped and the first failing test ids from a pytest --junitxml file."""
    import xml.etree.ElementTree as ET
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in kinds:
            counts["failed"] += 1
            failing.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failing.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failing": failing[:20]}


def container_runtime(kernel_release: str, dmesg: str = "") -> str:
    """Which sandbox the machine runs in, from what it reports of its kernel: the project's machines showed
    '6.18.44-fc-v310-gpu' (Firecracker) and '4.4.0' (gVisor, whose dmesg also says so)."""
    if "gvisor" in dmesg.lower() or kernel_release.strip() == "4.4.0":
        return "gvisor"
    if re.search(r"(^|[-.])fc([-.]|$)", kernel_release):
        return "firecracker"
    if os.path.exists("/.dockerenv"):
        return "docker"
    return "unknown"


# ----------------------------------------------------------------------------------------------------------------------
# Running stages (the parent: imports neither torch nor guppy, so a broken install cannot take it down)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Running:
    stage: Stage
    proc: subprocess.Popen
    output_path: str
    started: float
    timeout: float
    cpu_s: float = 0.0


def reap(run: Running) -> bool:
    """True once the stage's process has ended; records its exit status and the CPU seconds of it and the children
    it waited for (wall seconds alone mislead on a shared machine)."""
    pid, status, usage = os.wait4(run.proc.pid, os.WNOHANG)
    if pid == 0:
        return False
    run.proc.returncode = os.waitstatus_to_exitcode(status)
    run.cpu_s = usage.ru_utime + usage.ru_stime
    return True


def stage_command(stage: Stage, out: str, work: str, smoke: bool) -> list[str]:
    cmd = [sys.executable, "-m", "bench", "gpu-check", "--stage", stage.name, "--out", out, "--work", work]
    return cmd + (["--cpu-smoke"] if smoke else [])


def stage_env(stage: Stage, smoke: bool) -> dict:
    env = {**os.environ, **stage.env, "PYTHONUNBUFFERED": "1"}
    if smoke:  # tiny CPU work: one thread each, or OpenMP's spinning workers stall a loaded 2-core machine (20x)
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_stage(stage: Stage, cmd: list[str], timeout: float, work: str, smoke: bool = False) -> Running:
    output_path = os.path.join(work, f"stage-{stage.name}.out")
    out = open(output_path, "w")
    env = stage_env(stage, smoke)
    # a session of its own: a timeout ends the stage and everything it started (pytest workers, nvcc, the sanitizer)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    out.close()
    return Running(stage, proc, output_path, time.monotonic(), timeout)


def stop(run: Running):
    """SIGTERM to the stage's process group, SIGKILL 5 s later if it has not ended (reaped by `reap`)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(run.proc.pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + 5
        while time.monotonic() < end:
            if reap(run):
                return
            time.sleep(0.1)


def finish(run: Running, timed_out: bool) -> tuple[dict, str]:
    """The stage's record and its whole output."""
    with open(run.output_path, errors="replace") as f:
        text = f.read()
    seconds = round(time.monotonic() - run.started, 1)
    figures, skip, fail = {}, None, None
    try:
        figures, skip, fail = reports(text)
    except json.JSONDecodeError as e:
        figures = {"report_error": f"unreadable {MARK.strip()} line: {e.msg}"}
    rc = run.proc.returncode
    record = {"name": run.stage.name, "status": "pass", "why": None, "seconds": seconds,
              "cpu_s": round(run.cpu_s, 1), "budget_s": round(run.timeout, 1), "figures": figures,
              "first_error": None}
    if timed_out:
        record.update(status="fail", why=f"timed out after {run.timeout:.0f} s (its budget)")
    elif rc is not None and rc < 0:
        record.update(status="fail", why=f"killed by signal {signal.Signals(-rc).name}")
    elif rc:
        record.update(status="fail", why=fail or first_error(text) or f"exit code {rc}")
    elif skip:
        record.update(status="skip", why=skip)
    if record["status"] == "fail":
        record["first_error"] = first_error(text) or record["why"]
    return record, text


def run_phase(stages: list[Stage], out: str, work: str, smoke: bool, deadline: float, on_done, command=None) -> None:
    """Start every stage of a phase, each with min(its budget, time left); call on_done(record, output) as each
    ends. `command(stage)` gives the argv (default: this module's child entry point)."""
    running = []
    for stage in stages:
        left = deadline - time.monotonic()
        if left < 5:
            on_done({"name": stage.name, "status": "skip", "why": "not started: the run's time budget was spent",
                     "seconds": 0.0, "cpu_s": 0.0, "budget_s": 0.0, "figures": {}, "first_error": None}, "")
            continue
        budget = stage.smoke_budget_s if smoke else stage.budget_s
        cmd = command(stage) if command else stage_command(stage, out, work, smoke)
        running.append(start_stage(stage, cmd, min(budget, left), work, smoke))
    while running:
        time.sleep(0.2)
        for run in list(running):
            done = reap(run)
            timed_out = not done and time.monotonic() - run.started > run.timeout
            if timed_out:
                stop(run)
            if done or timed_out:
                running.remove(run)
                on_done(*finish(run, timed_out))


def print_table(result: dict):
    print(f"\n{'stage':18s} {'status':6s} {'wall s':>6s} {'cpu s':>6s}  note")
    for r in result["stages"]:
        note = r["why"] or _headline(r["figures"])
        print(f"{r['name']:18s} {r['status']:6s} {r['seconds']:6.1f} {r['cpu_s']:6.1f}  {(note or '')[:100]}")
    s = result["summary"]
    print(f"gpu-check on {result.get('device') or '?'}: {s['pass']} pass, {s['fail']} fail, {s['skip']} skip in "
          f"{result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU; files in {result['out']}")


def _headline(figures: dict) -> str:
    keys = ("headline", "passed", "failed", "skipped", "errors", "summary")
    parts = [f"{k} {figures[k]}" if k != "headline" else str(figures[k]) for k in keys
             if figures.get(k) is not None]
    return ", ".join(parts)


def default_out() -> str:
    name = "cpu"
    try:  # the device name without importing torch in the parent: nvidia-smi, when there is one
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            name = r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return os.path.join(ROOT, "bench", "results", f"gpu-check-{slug}-{datetime.date.today().isoformat()}")


def run_all(args) -> int:
    t0 = time.monotonic()
    smoke = bool(args.cpu_smoke)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = [s for s in only or [] if s not in BY_NAME]
    if unknown:
        raise SystemExit(f"python -m bench gpu-check: --only: unknown stage(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(BY_NAME)}")
    out = os.path.abspath(args.out or default_out())
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"python -m bench gpu-check: --out {out}: {e.strerror}") from None
    work = tempfile.mkdtemp(prefix="guppy-gpu-check-")
    stages = [s for s in STAGES if only is None or s.name in only or s.name == "install"]
    deadline = t0 + (SMOKE_DEADLINE_S if smoke else DEADLINE_S)
    result = {"benchmark": "gpu-check", "cpu_smoke": smoke, "date": datetime.date.today().isoformat(),
              "host": platform.node(), "out": out, "work": work, "stages": [],
              "summary": {"pass": 0, "fail": 0, "skip": 0}, "wall_s": 0.0, "cpu_s": 0.0}
    log = open(os.path.join(out, "gpu-check.log"), "w")
    print(f"gpu-check{' (CPU smoke)' if smoke else ''}: {len(stages)} stages, output in {out}", flush=True)

    def on_done(record, text):
        result["stages"].append(record)
        result["summary"][record["status"]] += 1
        result["wall_s"] = round(time.monotonic() - t0, 1)
        result["cpu_s"] = round(result["cpu_s"] + record["cpu_s"], 1)
        if record["name"] == "environment":  # the conditions every figure is measured under, at the top
            for key in ("device", "torch", "triton", "cuda", "numpy", "python", "compute_capability", "runtime"):
                if key in record["figures"]:
                    result[key] = record["figures"][key]
        log.write(f"===== {record['name']}: {record['status']} in {record['seconds']} s"
                  f"{' (' + record['why'] + ')' if record['why'] else ''} =====\n{text}\n")
        log.flush()
        with open(os.path.join(out, "gpu-check.json"), "w") as f:  # after every stage: a cut run keeps the rest
            json.dump(result, f, indent=2)
        print(f"[{result['wall_s']:6.1f} s] {record['name']}: {record['status']} ({record['seconds']} s)"
              + (f": {record['why']}" if record["why"] else ""), flush=True)

    for phase in sorted({s.phase for s in stages}):
        in_phase = [s for s in stages if s.phase == phase]
        for group in [in_phase] if phase in SIDE_BY_SIDE_PHASES else [[s] for s in in_phase]:
            run_phase(group, out, work, smoke, deadline, on_done)
    log.close()
    files = sorted(os.listdir(out))
    result["out_files"] = files
    if len(files) > MAX_FILES:
        result["summary"]["fail"] += 1
        result["stages"].append({"name": "output", "status": "fail", "seconds": 0.0, "cpu_s": 0.0, "budget_s": 0.0,
                                 "figures": {}, "why": f"{len(files)} files in {out}, more than {MAX_FILES}",
                                 "first_error": None})
    with open(os.path.join(out, "gpu-check.json"), "w") as f:
        json.dump(result, f, indent=2)
    for r in result["stages"]:  # the failures' own words, just above the table
        if r["status"] == "fail" and r.get("first_error"):
            print(f"{r['name']}: {r['first_error']}")
    print_table(result)
    return 1 if result["summary"]["fail"] else 0


# ----------------------------------------------------------------------------------------------------------------------
# The stages (each runs in its own child process)
# ----------------------------------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, out, work, smoke):
        self.out, self.work, self.smoke = out, work, smoke

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"


def report(**figures):
    print(MARK + json.dumps({"figures": figures}, default=str), flush=True)


class Skip(Exception):
    pass


def need_cuda(ctx):
    import torch
    if not ctx.smoke and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device (torch.cuda.is_available() is False)")


def sh(cmd, timeout=None, **kw) -> subprocess.CompletedProcess:
    """Run a command, its output echoed into this stage's output (so the log has it) and returned."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    sys.stdout.write(r.stdout + r.stderr)
    sys.stdout.flush()
    return r


def tool_version(path) -> str | None:
    if not path:
        return None
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unusable ({e})"
    lines = [line.strip() for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    return next((line for line in lines if re.search(r"release|version", line, re.I)), lines[-1] if lines else None)


def import_probe() -> tuple[bool, str]:
    """Can a fresh interpreter import the installed package (kernels and csrc included)? Run outside the repository
    root, where ./guppy alone would import without its kernels."""
    r = subprocess.run([sys.executable, "-c", "import guppy.kernels, guppy.csrc, guppy; print(guppy.__file__)"],
                       capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=120)
    return r.returncode == 0, (r.stdout.strip() or (r.stderr.strip().splitlines() or ["?"])[-1])


INSTALL = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT]


def stage_install(ctx, probe=import_probe, run=sh):
    ok, where = probe()
    if ok:
        raise Skip(f"guppy is importable ({where})")
    print(f"guppy is not importable ({where}): {' '.join(INSTALL)}")
    r = run(INSTALL)
    if r.returncode:
        raise SystemExit(f"pip install failed (exit code {r.returncode})")
    ok, where = probe()
    if not ok:
        raise SystemExit(f"guppy still not importable after pip install: {where}")
    report(installed=where)


def stage_environment(ctx):
    import numpy
    import torch
    from guppy.targets import find_cuda_tool
    figures = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "numpy": numpy.__version__, "kernel": platform.release()}
    for mod in ("triton", "onnx", "onnxruntime"):
        try:
            figures[mod] = __import__(mod).__version__
        except ImportError:
            figures[mod] = None
    dmesg = ""
    if shutil.which("dmesg"):
        try:
            dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout[:20000]
        except (OSError, subprocess.TimeoutExpired):
            pass
    figures["runtime"] = container_runtime(platform.release(), dmesg)
    for tool in ("nvcc", "compute-sanitizer", "ncu"):
        figures[tool] = tool_version(find_cuda_tool(tool))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        figures.update(device=p.name, compute_capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                       memory_gib=round(p.total_memory / 2 ** 30, 1), gpus=torch.cuda.device_count())
    else:
        figures["device"] = "CPU (no CUDA device)"
    if shutil.which("nvidia-smi"):
        sh(["nvidia-smi"], timeout=20)
        q = sh(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,"
                "temperature.gpu", "--format=csv,noheader"], timeout=20)
        figures["nvidia_smi"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    else:
        figures["nvidia_smi"] = "absent"
    figures["headline"] = f"{figures['device']}, torch {figures['torch']}, triton {figures['triton']}, " \
                          f"{figures['runtime']}"
    report(**figures)
    need_cuda(ctx)


def stage_csrc_build(ctx):
    import torch
    from guppy import csrc
    arch = os.environ.get("GUPPY_CSRC_ARCH")
    if arch and ctx.smoke:
        raise Skip(f"GPU only: GUPPY_CSRC_ARCH={arch} picks the nvcc target; the CPU build has none")
    need_cuda(ctx)
    target = "host emulator" if ctx.smoke else f"sm_{arch or ''.join(map(str, torch.cuda.get_device_capability()))}"
    t = time.perf_counter()
    csrc.build(ctx.device)
    build_s = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    ok, reason = csrc.available(ctx.device)
    report(target=target + (" (PTX, JIT-compiled by the driver)" if arch else ""), build_s=build_s,
           self_check_s=round(time.perf_counter() - t, 1), available=ok, reason=reason or None,
           headline=f"{target}: built in {build_s} s, self-check {'ok' if ok else 'FAILED'}")
    if not ok:
        raise SystemExit(f"guppy.csrc not available: {reason}")


def stage_data(ctx):
    from guppy.data import prepare
    samples = 300 if ctx.smoke else 4000
    prepare(os.path.join(ctx.work, "data"), samples=samples, seed=1337, log=print)
    report(samples=samples, headline=f"{samples} conversations prepared")


GPU_TEST_FILES = ["test_layer_norm.py", "test_attention.py", "test_gemm_softmax.py", "test_cross_entropy.py",
                  "test_csrc_attention.py", "test_ops.py", "test_fast_path.py", "test_model.py", "test_convergence.py"]
# On a GPU: every case on CUDA tensors, with the kernels compiled. "not cpu" leaves out what runs on the CPU whatever
# the machine (csrc's host-emulator cases, the interpreter-only tests, `cpu_only` ones: tests/conftest.py), which CI
# runs. The notebook's "GPU parity tests" run this selection too, and CI runs it with the kernels compiled on the CPU
# (GUPPY_TEST_COMPILED=1, tests/test_gpu_check.py), where a CPU tensor handed to a kernel fails as it would here.
GPU_TEST_KEYWORD = "not cpu"


def gpu_test_files() -> list[str]:
    """GPU_TEST_FILES that are in this tree, relative to the repository root."""
    return [os.path.join("tests", f) for f in GPU_TEST_FILES if os.path.exists(os.path.join(ROOT, "tests", f))]


def gpu_tests_command(junit, workers=0) -> list[str]:
    """The tests stage's pytest command (run it from the repository root)."""
    return pytest_command(gpu_test_files(), junit, GPU_TEST_KEYWORD, workers)


def pytest_command(files, junit, keyword, workers=0) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if keyword:
        cmd += ["-k", keyword]
    if workers:
        cmd += ["-n", str(workers)]
    return cmd


def run_pytest(files, junit, keyword, workers=0, what="tests"):
    r = subprocess.run(pytest_command(files, junit, keyword, workers), cwd=ROOT)
    counts = junit_counts(junit) if os.path.exists(junit) else {}
    report(**counts, deselected=keyword)
    if r.returncode == 5:
        raise SystemExit(f"{what}: pytest collected no tests (exit code 5)")
    if r.returncode:
        raise SystemExit(f"{what}: {counts.get('failed', '?')} failed, {counts.get('errors', '?')} errors; first: "
                         f"{(counts.get('failing') or ['see the log'])[0]}")


def _xdist_workers() -> int:
    import importlib.util
    return min(8, os.cpu_count() or 1) if importlib.util.find_spec("xdist") else 0


def stage_tests(ctx, run=run_pytest):
    need_cuda(ctx)
    # CPU smoke: a few real cases and the GPU ones collected and skipped
    keyword = "int32_targets or gpu or cuda" if ctx.smoke else GPU_TEST_KEYWORD
    run(gpu_test_files(), os.path.join(ctx.work, "tests.xml"), keyword, 0 if ctx.smoke else _xdist_workers())


def stage_csrc_sm75_parity(ctx):
    if ctx.smoke:
        raise Skip("GPU only: GUPPY_CSRC_ARCH=75 runs the T4 kernels as PTX on a newer GPU")
    need_cuda(ctx)
    run_pytest([os.path.join("tests", "test_csrc_attention.py")], os.path.join(ctx.work, "sm75.xml"), "not cpu",
               what="csrc parity with GUPPY_CSRC_ARCH=75")


SANITIZE_SCRIPT = os.path.join(ROOT, "bench", "csrc_sanitize.py")


def sanitizer_command(tool: str, sanitizer: str, python=sys.executable) -> list[str]:
    """compute-sanitizer on the small csrc fwd+bwd, instrumenting guppy's kernels only (attn_fwd, attn_bwd_*): the
    rest of torch would cost minutes under racecheck and is not ours to check."""
    return [sanitizer, "--tool", tool, "--kernel-name", "kns=attn_", "--error-exitcode", "1", python,
            SANITIZE_SCRIPT, "--device", "cuda"]


def stage_sanitizer(ctx, tool):
    if ctx.smoke:
        if tool != "memcheck":
            raise Skip("CPU smoke: compute-sanitizer needs a GPU (memcheck's twin ran the script on the emulator)")
        r = sh([sys.executable, SANITIZE_SCRIPT, "--device", "cpu", "--cases", "1"])
        if r.returncode:
            raise SystemExit(first_error(r.stdout + r.stderr) or f"csrc_sanitize.py: exit code {r.returncode}")
        raise Skip("CPU smoke: compute-sanitizer needs a GPU; its script ran on the host emulator: ok")
    from guppy.targets import find_cuda_tool
    need_cuda(ctx)
    sanitizer = find_cuda_tool("compute-sanitizer")
    if sanitizer is None:
        raise SystemExit("compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)")
    r = sh(sanitizer_command(tool, sanitizer))
    summary = sanitizer_summary(r.stdout + r.stderr)
    report(**summary, headline=summary["summary"])
    if r.returncode or summary["errors"]:
        raise SystemExit(f"{tool}: {first_error(r.stdout + r.stderr) or summary['summary'] or r.returncode}")
    if summary["errors"] is None:
        raise SystemExit(f"{tool}: compute-sanitizer printed no summary")


def stage_export(ctx):
    path = os.path.join("tests", "test_export.py")
    if not os.path.exists(os.path.join(ROOT, path)):
        raise Skip(f"{path} is not in this tree")
    if ctx.smoke:  # CI runs the file itself; here only that it collects
        r = sh([sys.executable, "-m", "pytest", path, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT)
        if r.returncode:
            raise SystemExit(first_error(r.stdout) or f"pytest --collect-only: exit code {r.returncode}")
        raise Skip("CPU smoke: collected only (CI runs it; the GPU machine has onnx and onnxruntime)")
    run_pytest([path], os.path.join(ctx.work, "export.xml"), None, what="export")


def stage_guppy_info(ctx):
    r = sh([sys.executable, "-m", "guppy", "info"], cwd=ROOT)
    if r.returncode:
        raise SystemExit(first_error(r.stdout + r.stderr) or f"guppy info: exit code {r.returncode}")
    report(headline=" | ".join(r.stdout.strip().splitlines()[:2]))


# --- graph: guppy-9m-fast, the captured step against the eager one -------------------------------------------------
def synthetic_split(n_conversations, vocab, seed=0):
    """Token arrays shaped like guppy's data (conversations of 12-60 tokens), without a tokenizer."""
    import numpy as np
    from guppy.data import Split
    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 61, n_conversations)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(3, vocab, offsets[-1]).astype(np.int64)
    return Split(tokens, offsets, (lengths // 2).astype(np.int64))


def update_difference(start, a, b) -> float:
    """max over parameters of |a - b| / |b - start|: how far apart two runs' weights are, relative to how far the
    steps moved them (an absolute difference means nothing when a few AdamW steps move each weight by ~lr)."""
    worst = 0.0
    for p0, pa, pb in zip(start, a, b):
        moved = (pb.float() - p0.float()).norm().item()
        worst = max(worst, (pa.float() - pb.float()).norm().item() / max(moved, 1e-30))
    return worst


def graph_vs_eager(device, smoke, steps=5, timed_steps=None, make_graph_step=None, fp16=False):
    """Two identical guppy-9m-fast models (dropout off: a replay and an eager step draw different randomness) take the
    same `steps` batches, one through CudaGraphStep (3 eager warm-up steps, then capture, then replays), one through
    train_step. Returns losses, the relative weight difference, and (GPU) ms per step of each.
    fp16: the T4's path on any GPU (fp16 autocast and a GradScaler, whose unscale/clip/step/update are captured);
    on the CPU, fp32 with an enabled GradScaler."""
    import torch
    from guppy.config import ModelConfig, preset
    from guppy.data import Batcher
    from guppy.graphs import CudaGraphStep
    from guppy.model import GuppyLM
    from guppy.train import autocast_dtype, make_optimizer, set_lr, train_step

    dev = torch.device(device)
    model_cfg, cfg = preset("guppy-9m-fast")
    model_cfg.dropout = 0.0
    if smoke:
        model_cfg = ModelConfig(**{**model_cfg.to_dict(), "d_model": 32, "n_layers": 1, "n_heads": 2,
                                   "ffn_hidden": 64, "max_seq_len": 32, "ops": "reference"})
        cfg.batch_size = 2
    timed_steps = (0 if smoke else 30) if timed_steps is None else timed_steps
    split = synthetic_split(400 if smoke else 4000, model_cfg.vocab_size)
    batcher = Batcher(split, cfg.batch_size, model_cfg.max_seq_len, "packed", seed=0)
    batches = [batcher.next_batch().to(dev) for _ in range(steps + timed_steps)]
    graphs = dev.type == "cuda"
    amp = torch.float16 if fp16 and graphs else autocast_dtype(dev)

    def make():
        torch.manual_seed(0)
        model = GuppyLM(model_cfg).to(dev)
        opt = make_optimizer(model, cfg, dev, cuda_graphs=True)  # lr tensors, as a graph reads them
        set_lr(opt, cfg.lr)
        return model, opt, torch.amp.GradScaler(dev.type, enabled=fp16 or amp == torch.float16)

    (m_e, opt_e, sc_e), (m_g, opt_g, sc_g) = make(), make()
    start = [p.detach().clone() for p in m_e.parameters()]
    def eager(b):
        return train_step(m_e, b, opt_e, sc_e, cfg.grad_clip, dev, amp)

    def graph_step(model, opt, scaler):
        step = CudaGraphStep(model, opt, scaler, cfg.grad_clip, amp)
        # the CPU twin: no capture exists there, so the step's body (what the graph records) runs eagerly
        return step if graphs else step._body

    graph = (make_graph_step or graph_step)(m_g, opt_g, sc_g)
    loss_e = [float(eager(b)) for b in batches[:steps]]
    loss_g = [float(graph(b)) for b in batches[:steps]]
    out = {"loss_eager": loss_e, "loss_graph": loss_g,
           "loss_max_rel_diff": max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(loss_g, loss_e)),
           "update_rel_diff": update_difference(start, list(m_g.parameters()), list(m_e.parameters())),
           "bitwise_equal_weights": all(torch.equal(a, b) for a, b in zip(m_g.parameters(), m_e.parameters()))}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if timed_steps:
        for name, fn in (("eager_ms", eager), ("graph_ms", graph)):
            sync()
            t = time.perf_counter()
            for b in batches[steps:]:
                fn(b)
            sync()
            out[name] = round((time.perf_counter() - t) * 1e3 / timed_steps, 3)
    return out


GRAPH_TOLERANCE = {"loss_max_rel_diff": 1e-3, "update_rel_diff": 5e-2}   # bitwise equality is reported too


def stage_graph(ctx):
    need_cuda(ctx)
    r = graph_vs_eager(ctx.device, ctx.smoke)
    # the T4's path (fp16 + GradScaler, the scaled finish inside the graph) on this GPU too: no T4 runs gpu-check
    r16 = graph_vs_eager(ctx.device, ctx.smoke, fp16=True)
    r.update({f"fp16_{k}": v for k, v in r16.items()})
    head = (f"loss rel diff {r['loss_max_rel_diff']:.2g} (fp16 {r16['loss_max_rel_diff']:.2g}), weight update rel "
            f"diff {r['update_rel_diff']:.2g} (fp16 {r16['update_rel_diff']:.2g})")
    if "graph_ms" in r:
        head += f"; eager {r['eager_ms']} ms/step, graph {r['graph_ms']} ms/step (fp16 {r16['graph_ms']})"
    report(**r, tolerance=GRAPH_TOLERANCE, headline=head)
    bad = [k for k, tol in GRAPH_TOLERANCE.items() if not (r[k] <= tol and r16[k] <= tol)]
    if bad:
        raise SystemExit(f"CUDA graph step differs from the eager step: {head} (tolerance {GRAPH_TOLERANCE})")


# --- kernels and step: the benchmark suites, short ------------------------------------------------------------------
KERNEL_SKIPPED_IMPLS = ("compile", "flex-document-mask")   # torch.compile builds cost more than this stage's budget


def select_kernel_cases(dtype):
    """bench kernels' cases at the guppy shape (the first) and the largest shape (the last) of each op, without the
    implementations that need a torch.compile build."""
    from bench.kernels import SUITES
    cases = []
    for suite_fn in SUITES.values():
        suite = [c for c in suite_fn(dtype, False) if c.impl not in KERNEL_SKIPPED_IMPLS]
        bases = list(dict.fromkeys(c.shape.replace(" packed", "") for c in suite))
        keep = {bases[0], bases[-1]}
        cases += [c for c in suite if c.shape.replace(" packed", "") in keep]
    return cases


def stage_kernels(ctx):
    import torch
    need_cuda(ctx)
    if ctx.smoke:
        cases = select_kernel_cases(torch.float16)
        report(cases=len(cases), shapes=sorted({f"{c.suite} {c.shape}" for c in cases}))
        raise Skip(f"CPU smoke: timing needs a GPU; {len(cases)} cases selected")
    from bench.common import environment, result_path, write_result
    from bench.kernels import copy_bandwidth_gbs, measure, plot
    dtype = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    copy_gbs = copy_bandwidth_gbs()
    result = {**environment("cuda"), "benchmark": "kernels (gpu-check: guppy shape + largest, no torch.compile)",
              "dtype": str(dtype).replace("torch.", ""), "copy_bandwidth_gbs": round(copy_gbs, 1), "rows": []}
    errors = []
    for case in select_kernel_cases(dtype):
        row = measure(case, copy_gbs)
        result["rows"].append(row)
        perf = row.get("error") or (f"{row['fwd_bwd_ms'][0]:.3f} ms fwd+bwd, " + (
            f"{row['fwd_bwd_gbs']:.0f} GB/s" if "fwd_bwd_gbs" in row else f"{row['fwd_bwd_tflops']:.1f} TFLOPS"))
        print(f"{case.suite:14s} {case.shape:24s} {case.impl:20s} {perf}")
        if "error" in row and case.impl.startswith("ours"):
            errors.append(f"{case.suite} {case.shape} {case.impl}: {row['error']}")
    write_result(result, result_path(ctx.out, result, "kernels-"), plot)
    ours = {f"{r['suite']} {r['shape']} {r['impl']}": r["fwd_bwd_ms"][0] for r in result["rows"]
            if r["impl"].startswith("ours") and "fwd_bwd_ms" in r}
    report(copy_gbs=round(copy_gbs, 1), cases=len(result["rows"]), ours_fwd_bwd_ms=ours,
           headline=f"copy {copy_gbs:.0f} GB/s, {len(result['rows'])} cases, {len(errors)} of ours failed")
    if errors:
        raise SystemExit(errors[0])


def stage_step(ctx):
    """bench step's measurement (bench/step.py time_mode) for pad and packed rows, reference and auto ops. The CPU
    smoke takes 2-row batches and one timed step: guppy-9m's 32-row steps take seconds each on a CPU."""
    import torch
    from bench.common import environment, result_path, write_result
    from bench.step import time_mode
    from guppy.data import load_split, prepare
    need_cuda(ctx)
    data = os.path.join(ctx.work, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        prepare(data, samples=300 if ctx.smoke else 4000, seed=1337, log=print)
    split, dev = load_split(data, "train"), torch.device(ctx.device)
    steps, warmup, batch_size = (1, 1, 2) if ctx.smoke else (30, 20, None)
    result = {**environment(dev), "benchmark": "guppy-9m training step (gpu-check)", "rows": []}
    for mode in ("pad", "packed"):
        for ops in ("reference", "auto"):
            row = time_mode(split, mode, dev, steps, warmup, ops, batch_size)
            result["rows"].append(row)
            print(f"{mode:8s} {ops:10s} {row['ms_per_step']:9.2f} ms/step {row['real_tokens_per_s']:12,.0f} real tok/s")
    write_result(result, result_path(ctx.out, result, "step-"))
    ms = {f"{r['mode']} {r['ops']}": r["ms_per_step"] for r in result["rows"]}
    figures = {"ms_per_step": ms, "batch_size": result["rows"][0]["batch_size"],
               "real_tokens_per_s": {f"{r['mode']} {r['ops']}": r["real_tokens_per_s"] for r in result["rows"]}}
    if not ctx.smoke:  # a projection, labelled so: GuppyLM's 10,000 steps at this step time, evals excluded
        figures["projected_reference_run_s"] = round(ms["pad reference"] * 10, 1)
    report(**figures, headline=", ".join(f"{k} {v} ms" for k, v in ms.items()))


def stage_host(ctx):
    """python -m bench host on this machine's CPUs (no GPU needed: it times the host side of guppy-9m-fast's loop
    with the arithmetic taken out), on the data stage's conversations, builds left to the csrc stages."""
    import argparse
    from bench import host
    data = os.path.join(ctx.work, "data")
    result = host.main(argparse.Namespace(data=data if os.path.exists(os.path.join(data, "meta.json")) else None,
                                          steps=60 if ctx.smoke else None, no_builds=True, no_progress=True,
                                          out=ctx.out))
    keys = ("batch_ms", "host_ms_per_step", "syncs_per_step", "ops_outside_graph_per_step", "eval_s", "save_s",
            "cpu_count")
    report(**{k: result[k] for k in keys}, headline=f"{result['host_ms_per_step']} ms/step host side, batch "
           f"{result['batch_ms']} ms, {result['syncs_per_step']} syncs/step on {result['cpu_count']} CPUs")


STAGE_FUNCTIONS = {
    "install": stage_install, "environment": stage_environment, "csrc-build": stage_csrc_build,
    "csrc-build-sm75": stage_csrc_build, "data": stage_data, "tests": stage_tests,
    "csrc-sm75-parity": stage_csrc_sm75_parity, "memcheck": lambda c: stage_sanitizer(c, "memcheck"),
    "racecheck": lambda c: stage_sanitizer(c, "racecheck"), "synccheck": lambda c: stage_sanitizer(c, "synccheck"),
    "export": stage_export, "guppy-info": stage_guppy_info, "graph": stage_graph, "kernels": stage_kernels,
    "step": stage_step, "host": stage_host,
}


def run_stage(args) -> int:
    """The child: run one stage; a Skip or a one-line SystemExit becomes a report, anything else a traceback."""
    ctx = Ctx(args.out, args.work, bool(args.cpu_smoke))
    try:
        STAGE_FUNCTIONS[args.stage](ctx)
    except Skip as why:
        print(MARK + json.dumps({"skip": str(why)}), flush=True)
    except SystemExit as e:
        if e.code in (None, 0):
            return 0
        print(MARK + json.dumps({"fail": str(e.code)}), flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 - any crash is this stage's result, with its traceback in the log
        import traceback
        traceback.print_exc()
        print(MARK + json.dumps({"fail": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]}),
              flush=True)
        return 1
    return 0


def main(args):
    if args.stage:
        sys.exit(run_stage(args))
    sys.exit(run_all(args))
