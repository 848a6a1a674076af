"""python -m bench {host,step,train,kernels,reference-curve,recipe,gpu-check}: guppy's benchmark suites.

Results go to bench/results/ as JSON.
"""
import argparse
import sys

from guppy.errors import GuppyError, exit_interrupted, one_line, os_error_line


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="guppy-9m training step time and tokens/s, pad vs packed")
    s.add_argument("--device", default="auto")
    s.add_argument("--steps", type=int, help="timed steps per mode (default 10 on CPU, 100 on GPU)")
    s.add_argument("--data", help="prepared data folder (default: a fresh one from the shipped persona)")
    s.add_argument("--samples", type=int, default=6000, help="conversations to generate when --data is not given")
    s.add_argument("--modes", default="pad,packed")
    s.add_argument("--ops", default="reference")
    s.add_argument("--out", help="result JSON path (default bench/results/step-<device>-<date>.json)")
    s.add_argument("--no-save", action="store_true")
    s = sub.add_parser("host", help="the host side of guppy-9m-fast's loop on this CPU: batches, syncs, evals, "
                       "saves, builds")
    s.add_argument("--data", help="prepared data folder (default: 60,000 fresh conversations from the fish, timed)")
    s.add_argument("--steps", type=int, help="loop steps (default: the preset's, 1,000)")
    s.add_argument("--no-builds", action="store_true", help="skip the cold csrc build and Triton compiles (CI)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", metavar="DIR|FILE.json", help="a folder for host-<device>-<date>.json, or a .json path "
                   "(default bench/results/)")
    s = sub.add_parser("train", help="time to GuppyLM's held-out loss: reference, +compile, +sdpa, guppy-fast")
    s.add_argument("--device", default="auto")
    s.add_argument("--runs", default="reference,reference+compile,reference+sdpa,guppy-fast",
                   help="comma-separated; reference is added unless --target-from gives the target")
    s.add_argument("--target-from", metavar="FILE", help="take target_eval_loss (and its eval setting) from a "
                   "reference-curve or earlier bench-train JSON, so --runs may leave out reference")
    s.add_argument("--target-rtol", type=float, help="a run reaches the target at eval loss <= target * (1 + this) "
                   "(default 0.005: within 0.5 %%, about one standard error of its eval; 0 = strict)")
    s.add_argument("--data", help="prepared data folder (default: 60,000 fresh conversations from the fish)")
    s.add_argument("--max-steps", type=int, help="override every run's step count (quick looks, not results)")
    s.add_argument("--smoke", action="store_true", help="tiny model, few steps, on the CPU (CI)")
    s.add_argument("--compile-on-cpu", action="store_true", help="with --smoke, also run reference+compile")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", metavar="DIR|FILE.json", help="a folder for <device>-<date>.json, or a .json path "
                   "(default bench/results/; PNG beside it)")
    s = sub.add_parser("gpu-check", help="everything a GPU is needed for, in one run (<= 6 min on an H100)")
    s.add_argument("--out", metavar="DIR", help="folder for gpu-check.json, gpu-check.log and the suites' results "
                   "(default bench/results/gpu-check-<device>-<date>/)")
    s.add_argument("--only", metavar="STAGE,...", help="run only these stages (a rerun after a fix)")
    s.add_argument("--cpu-smoke", action="store_true", help="the same stages on the CPU, tiny (CI)")
    s.add_argument("--stage", help=argparse.SUPPRESS)   # the child process that runs one stage
    s.add_argument("--work", help=argparse.SUPPRESS)
    s = sub.add_parser("kernels", help="guppy's kernels vs eager, torch.compile, Liger, SDPA (GPU)")
    s.add_argument("--suite", default="layer_norm,cross_entropy,attention")
    s.add_argument("--quick", action="store_true", help="only the guppy-9m shapes")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="bf16 needs sm_80+; a T4 uses fp16")
    s.add_argument("--out", help="result JSON path (default bench/results/kernels-<device>-<date>.json)")
    s = sub.add_parser("reference-curve", help="GuppyLM's recipe to its end: eval loss vs conversations (the target)")
    s.add_argument("--preset", default="guppy-9m")
    s.add_argument("--device", default="auto")
    s.add_argument("--data", help="prepared data folder (default: 60,000 fresh conversations from the fish, seed 1337)")
    s.add_argument("--samples", type=int, default=60_000)
    s.add_argument("--eval-every", type=int, default=200)
    s.add_argument("--max-steps", type=int, help="stop early (a quick look, not the reference)")
    s.add_argument("--proxy", action="store_true", help="at the CPU proxy's size (bench recipe --size proxy)")
    s.add_argument("--work", help="folder for the data and the run (default: a temporary folder)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", help="result JSON (default bench/results/reference-curve-<preset>-<device>-<date>.json)")
    s = sub.add_parser("recipe", help="recipe variants of the fast path, each until it reaches the reference's loss")
    s.add_argument("--target-from", help="a `bench reference-curve` JSON: its final eval loss is the target")
    s.add_argument("--variants", help="comma-separated names from bench/recipe.py VARIANTS, or all (the default; "
                                      "--smoke: fast,muon-wsd)")
    s.add_argument("--size", default="full", choices=["full", "proxy"], help="proxy: the CPU proxy study's size")
    s.add_argument("--device", default="auto")
    s.add_argument("--data", help="prepared data folder (default: 60,000 fresh conversations from the fish, seed 1337)")
    s.add_argument("--eval-every", type=int, help="steps between evals on the whole held-out split (default 100)")
    s.add_argument("--run-to-cap", action="store_true", help="do not stop at the target: run every variant to its cap")
    s.add_argument("--keep", action="store_true", help="skip the variants --out already holds (continue a sweep)")
    s.add_argument("--smoke", action="store_true", help="tiny model, tiny data, on the CPU, its own target (CI)")
    s.add_argument("--work", help="folder for the data and the runs (default: a temporary folder)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", help="result JSON (default bench/results/recipe-<size>-<device>-<date>.json, PNG beside)")
    args = p.parse_args(argv)
    command = f"python -m bench {args.command}"
    try:
        import importlib
        importlib.import_module(f".{args.command.replace('-', '_')}", __package__).main(args)
    except KeyboardInterrupt:  # train, recipe and gpu-check have already written the runs that finished
        exit_interrupted(command)
    except GuppyError as e:  # exit 1, as the suites' own one-line refusals (SystemExit with a message)
        sys.exit(f"{command}: error: {one_line(e)}")
    except OSError as e:  # a path the user gave: missing, unreadable, unwritable, a full disk
        sys.exit(f"{command}: error: {one_line(os_error_line(e))}")


if __name__ == "__main__":
    main()
