"""`atlas-train`: train from composed YAML configs, or `atlas-train export` a run's checkpoint.

User errors (bad config key or value, missing or mismatched checkpoint or data, a diverged run) print one line and
exit 2 (1 for a diverged run); preemption exits with EXIT_PREEMPTED (75) after checkpointing.
"""

from __future__ import annotations

import argparse
import sys

from atlas_train.config import ConfigError
from atlas_train.train.checkpoint import CheckpointError
from atlas_train.train.nonfinite import NonFiniteLossError


def _user_errors() -> tuple[type[BaseException], ...]:
    from atlas_train.data import DataError

    return (ConfigError, CheckpointError, DataError, FileNotFoundError)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atlas-train",
        description="Train an ATLAS-family model. `atlas-train export --help` for the export sub-command.",
        epilog="Config keys: the dataclasses they build, with a comment per key: model.* atlas_train/model/config.py, "
               "data.* atlas_train/data/config.py, parallel.* atlas_train/parallel/config.py, train.* "
               "atlas_train/train/config.py (README: Configuration). --print-config shows every key with its value.",
    )
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable, merged in order)")
    p.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/checkpoints/latest (= train.resume=auto)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully composed config (the files merged in order, the overrides on top, every "
                        "other key at its default) as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atlas-train export",
        description="Write a run's latest checkpoint as fp32 model.safetensors + config.yaml + tokenizer.model, or "
                    "(--format hf) as a Hugging Face folder: AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR) "
                    "load it after `import atlas_train`.",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="the run dir (train.out_dir); with --format hf also an existing export dir, to convert it")
    p.add_argument("--out", required=True, metavar="DIR", help="output dir")
    p.add_argument("--format", choices=["native", "hf"], default="native",
                   help="native: what atlas-eval/atlas-generate read (default); hf: Hugging Face transformers")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export"]:
            args = _export_parser().parse_args(argv[1:])
            if args.format == "hf":
                from atlas_train.hf.convert import export_hf as export
            else:
                from atlas_train.train.export import export

            out = export(args.checkpoint, args.out)
            print(f"exported {args.checkpoint} -> {out}")
            return 0
        args = _train_parser().parse_args(argv)
        if not args.config and not args.print_config:
            _train_parser().error("at least one --config FILE is required")
        from atlas_train.config import load_config

        overrides = list(args.overrides) + (["train.resume=auto"] if args.resume else [])
        config = load_config(args.config, overrides)
        if args.print_config:
            import yaml

            from atlas_train.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        from atlas_train.train.trainer import train

        return train(config)
    except NonFiniteLossError as err:
        print(f"atlas-train: {err}", file=sys.stderr)
        return 1
    except _user_errors() as err:
        print(f"atlas-train: error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `atlas-train` command: main(), then a clean teardown of the process groups before the process exits
    (not inside main, which tests call several times in one process)."""
    from atlas_train.train.distributed import shutdown_distributed

    code = main()
    shutdown_distributed()
    sys.exit(code)


if __name__ == "__main__":
    entry()
