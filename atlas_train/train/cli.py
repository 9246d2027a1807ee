"""`atlas-train`: train from composed YAML configs, or `atlas-train export` a run's checkpoint.

Exit codes follow the table in cli_errors.py: user errors (bad config key or value, missing, damaged or mismatched
checkpoint or data, an unusable out_dir, a full disk) print one line and exit 2, a diverged run exits 1, preemption
exits 75 and Ctrl-C 130 after checkpointing. The traceback goes to `<train.out_dir>/atlas-train.log`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atlas_train.cli_errors import run_cli
from atlas_train.config import ConfigError
from atlas_train.train.checkpoint import TAG_RE, CheckpointError
from atlas_train.train.nonfinite import NonFiniteLossError


def _user_errors() -> tuple[type[BaseException], ...]:
    from atlas_train.data import DataError
    from atlas_train.train.integrity import IntegrityError

    return (ConfigError, CheckpointError, DataError, IntegrityError)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atlas-train",
        description="Train an ATLAS-family model. `atlas-train export --help` for the export sub-command.",
        epilog="Config keys: the dataclasses they build, with a comment per key: model.* atlas_train/model/config.py, "
               "data.* atlas_train/data/config.py, parallel.* atlas_train/parallel/config.py, train.* "
               "atlas_train/train/config.py (README: Configuration). --print-config shows every key with its value.",
    )
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config (repeatable, merged in order)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in <train.out_dir>/checkpoints "
                        "(= train.resume=auto)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (always in the run's log)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully composed config (the files merged in order, the overrides on top, every "
                        "other key at its default) as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atlas-train export",
        description="Write a run's newest intact checkpoint (or a named one) as fp32 model.safetensors + config.yaml + "
                    "tokenizer.model + manifest.json, or "
                    "(--format hf) as a Hugging Face folder: AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR) "
                    "load it after `import atlas_train`.",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="the run dir (train.out_dir: its newest intact checkpoint) or one checkpoint, "
                        "RUN_DIR/checkpoints/step_N; with --format hf also an existing export dir, to convert it")
    p.add_argument("--out", required=True, metavar="DIR", help="output dir")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (always in the run's log)")
    p.add_argument("--format", choices=["native", "hf"], default="native",
                   help="native: what atlas-eval/atlas-generate read (default); hf: Hugging Face transformers")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir: list[Path] = []  # the log's folder, once known

    def body() -> int:
        if argv[:1] == ["export"]:
            if args.format == "hf":
                from atlas_train.hf.convert import export_hf as export
            else:
                from atlas_train.train.export import export

            checkpoint = Path(args.checkpoint)
            run_dir.append(checkpoint.parent.parent if TAG_RE.match(checkpoint.name) else checkpoint)
            out = export(args.checkpoint, args.out)
            print(f"exported {args.checkpoint} -> {out}")
            return 0
        from atlas_train.config import load_config

        overrides = list(args.overrides) + (["train.resume=auto"] if args.resume else [])
        config = load_config(args.config, overrides)
        if args.print_config:
            import yaml

            from atlas_train.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        from atlas_train.train.trainer import train

        run_dir.append(Path(config.train.out_dir))
        return train(config)

    if argv[:1] == ["export"]:
        args = _export_parser().parse_args(argv[1:])
    else:
        args = _train_parser().parse_args(argv)
        if not args.config and not args.print_config:
            _train_parser().error("at least one --config FILE is required")
    return run_cli("atlas-train", body, user_errors=_user_errors(), failures=(NonFiniteLossError,), debug=args.debug,
                   log_dir=lambda: run_dir[-1] if run_dir else None,
                   interrupted="interrupted: stopped at once; the checkpoints saved before are intact")


def entry() -> None:
    """The `atlas-train` command: main(), then a clean teardown of the process groups before the process exits
    (not inside main, which tests call several times in one process)."""
    from atlas_train.train.distributed import shutdown_distributed

    code = main()
    shutdown_distributed()
    sys.exit(code)


if __name__ == "__main__":
    entry()
