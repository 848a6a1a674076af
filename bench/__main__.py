"""python -m bench {step,train,kernels}: guppy's benchmark suites. Results go to bench/results/ as JSON."""
import argparse


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench")
    sub = p.add_subparsers(dest="suite", required=True)
    s = sub.add_parser("step", help="guppy-9m training step time and tokens/s, pad vs packed")
    s.add_argument("--device", default="auto")
    s.add_argument("--steps", type=int, help="timed steps per mode (default 10 on CPU, 100 on GPU)")
    s.add_argument("--data", help="prepared data folder (default: a fresh one from the shipped persona)")
    s.add_argument("--samples", type=int, default=6000, help="conversations to generate when --data is not given")
    s.add_argument("--modes", default="pad,packed")
    s.add_argument("--ops", default="reference")
    s.add_argument("--out", help="result JSON path (default bench/results/step-<device>-<date>.json)")
    s.add_argument("--no-save", action="store_true")
    s = sub.add_parser("train", help="time to GuppyLM's held-out loss: reference, +compile, +sdpa, guppy-fast")
    s.add_argument("--device", default="auto")
    s.add_argument("--runs", default="reference,reference+compile,reference+sdpa,guppy-fast")
    s.add_argument("--data", help="prepared data folder (default: 60,000 fresh conversations from the fish)")
    s.add_argument("--max-steps", type=int, help="override every run's step count (quick looks, not results)")
    s.add_argument("--smoke", action="store_true", help="tiny model, few steps, on the CPU (CI)")
    s.add_argument("--compile-on-cpu", action="store_true", help="with --smoke, also run reference+compile")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", help="result JSON path (default bench/results/<device>-<date>.json; PNG beside it)")
    args = p.parse_args(argv)
    if args.suite == "step":
        from . import step
        step.main(args)
    elif args.suite == "train":
        from . import train
        train.main(args)


if __name__ == "__main__":
    main()
