"""``facedeblur train TASK``: train a model (cfmd, snadnet) from a config file plus overrides.

Examples::

    facedeblur train cfmd --config my.yaml train.batch_size=4 optim.lr=2e-4
    facedeblur train cfmd --config my.yaml --resume auto          # continue the last run
    torchrun --nproc_per_node 4 -m facedeblur_ext train cfmd --config my.yaml   # DDP
    facedeblur train snadnet --data-root faces/ -o runs/snadnet   # stage I, then stage II
    facedeblur train snadnet --data-root faces/ -o runs/snadnet stage=deblur \
        stages.deblur.train.epochs=50                             # stage II only

A task trained in stages (SNADNet) runs one trainer per stage, in order, each writing to
``<output_dir>/<stage>/``; ``--resume auto`` continues every stage from its own checkpoint.

A run folder that already holds a run (checkpoints or logs) is not trained into again from
scratch: continue it with ``--resume``, pick another ``-o``, or replace it with ``--overwrite``.
A folder has one writer: a second command into a folder in use is refused, naming the PID of
the one writing it (see ``facedeblur_ext.training.lock``).
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from facedeblur_ext.training import TASKS

    parser.add_argument("task", help=f"what to train: {', '.join(sorted(TASKS))}")
    parser.add_argument("--config", "-c", default=None,
                        help="YAML or TOML file, or a packaged config name (e.g. "
                             "cfmd_kernel_blur), merged over the task's packaged defaults")
    parser.add_argument("--output-dir", "-o", default=None, help="run folder (output_dir)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="data.root: the folder of training images, for tasks whose config "
                             "has that key (snadnet)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", default=None, metavar="CKPT|auto",
                       help="continue from a checkpoint, or 'auto' for <output_dir>/"
                            "checkpoints/last.pt when it exists")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh in a run folder that holds a run, deleting its "
                            "checkpoints, logs and samples first (without it, such a folder "
                            "is refused)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged configuration and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.batch_size=4 optim.lr=2e-4; one "
                             "adding an unknown key to a trainer table (train, val, optim, "
                             "...) is refused")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Overrides may come before or after the options."""
    return parser.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> int:
    import yaml

    from facedeblur_ext.training import get_task, load_config
    from facedeblur_ext.training.distributed import shutdown_distributed
    from facedeblur_ext.training.trainer import Trainer

    config = load_config(args.task, args.config, args.overrides)
    if args.output_dir is not None:
        config["output_dir"] = args.output_dir  # set directly: a path is not parsed as YAML
    if args.data_root is not None:
        data = config.get("data")
        if not isinstance(data, dict) or "root" not in data:
            raise ValueError(f"--data-root: the {args.task} config has no data.root; set its "
                             "data paths with overrides (see --print-config)")
        data["root"] = args.data_root  # set directly: a path is not parsed as YAML
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False))
        return 0
    task = get_task(config["task"])
    finished = False
    try:
        for run_config, resume in task.runs(config, args.resume):
            result = Trainer(run_config, task=task, resume=resume,
                             overwrite=args.overwrite).fit()
            if result["stopped_by_signal"]:
                if result["checkpoint"] is not None:  # (rank 0 writes it)
                    print(f"stopped at step {result['step']}; checkpoint "
                          f"{result['checkpoint']} (resume with --resume {result['checkpoint']})")
                finished = True  # every rank stopped at the same step
                sig = result["stopped_by_signal"]
                return 128 + sig if sig > 0 else 1
            if result["checkpoint"] is not None:
                print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")
                if result["last_val"]:
                    print("validation: " + describe_metrics(result["last_val"]))
        finished = True
        return 0
    finally:
        # Under torchrun: every rank leaves the process group before the interpreter exits.
        # After an error only this rank's side is closed (the others may never arrive).
        shutdown_distributed(wait=finished)


def describe_metrics(values: dict) -> str:
    """``PSNR 28.10 dB, SSIM 0.8123, miou 0.7012`` for the metrics of a validation result."""
    parts = []
    for key, value in values.items():
        if key in ("step", "epoch"):
            continue
        if key == "psnr":
            parts.append(f"PSNR {value:.2f} dB")
        elif key == "ssim":
            parts.append(f"SSIM {value:.4f}")
        else:
            parts.append(f"{key} {value:.4g}")
    return ", ".join(parts)
