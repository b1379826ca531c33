"""`patch-adapter train stage1|stage2` and `patch-adapter data check`: thin front ends.

They parse flags, resolve the config (defaults < config file < flags) and call
`train` or `check_dataset`; no training logic lives here.
"""

from __future__ import annotations

import json


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the Dual Context Adapter (stage1) or the Reference Patch Adapter (stage2)",
        description="Train one adapter on image-caption data. Runs on one CPU or GPU as is, and on many "
        "processes/GPUs/machines through `accelerate launch -m patch_adapter.cli train ...`.",
    )
    p.add_argument("stage", choices=["stage1", "stage2"], help="stage1: DCA at native size; stage2: RPA on patches")
    p.add_argument("--model", default=None, help="backbone: tiny, a diffusers folder, a single file or a hub id")
    p.add_argument("--data", default=None, help="imagefolder (metadata.jsonl or .txt captions), .tar shard(s)")
    p.add_argument("--output", default=None, help="folder for weights, config.yaml, train_log.jsonl, checkpoints")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint-N folder")
    p.add_argument("--config", default=None, help="YAML/TOML/JSON file with any other setting (flags override it)")
    p.add_argument(
        "--dca",
        default=None,
        help="stage2: a trained dca.safetensors, exported with the RPA in one file (off while training, "
        "as in the pipeline's patches)",
    )
    p.set_defaults(func=run_train)


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect training data")
    sub = p.add_subparsers(dest="data_command", required=True)
    c = sub.add_parser("check", help="counts, sizes, missing captions, images too small for stage 2")
    c.add_argument("path", help="imagefolder, .tar shard or folder of shards")
    c.add_argument("--native", type=int, default=1024, help="backbone's native size in px (tiny: 128)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=run_data_check)


def run_train(args) -> int:
    from accelerate import PartialState

    from .config import resolve_config
    from .trainer import train

    overrides = {
        "model": args.model,
        "data": args.data,
        "output": args.output,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "resume": args.resume,
        "dca": args.dca,
    }
    config = resolve_config(args.stage, args.config, overrides)
    result = train(config)
    if PartialState().is_main_process:  # one line, not one per process under accelerate launch
        print(f"trained {result.steps} steps; weights: {result.weights}")
    return 0


def run_data_check(args) -> int:
    from .data import check_dataset

    report = check_dataset(args.path, native=args.native)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0
