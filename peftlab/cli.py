"""``peftlab`` command line: a thin shell over the library.

    peftlab train   --model M --data FILE --method NAME --output DIR [--config run.yaml] [--set k=v ...]
    peftlab train   --continual tasks.yaml [--model M --method NAME --output DIR ...] [--set k=v ...]
    peftlab eval    --model M [--adapter DIR] --data FILE [FILE ...] [--task T] [--output DIR] [--limit N]
    peftlab demo    [--output DIR]
    peftlab methods [--verbose] [--count ARCH]
    peftlab merge   --model M --adapter DIR --output DIR
    peftlab export  --model M --adapter DIR --output DIR [--format peft]
    peftlab bench   speed|quality [options]   (GPU speed beside HF PEFT; accuracy leaderboard)

Settings are taken, later winning, from defaults, ``--config`` YAML, explicit flags and ``--set``.
``--set key=value`` sets a training setting when ``key`` is one, else a method option.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from .core.errors import PeftlabError


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise PeftlabError(f"--set expects key=value, got {pair!r}")
        values[key.strip()] = yaml.safe_load(raw) if raw else ""
    return values


def _read_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PeftlabError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PeftlabError(f"config {path} must be a mapping of settings")
    return data


# -------------------------------------------------------------------------------------------- train


_TRAIN_FLAGS = {  # flag -> (TrainArgs field, type)
    "--model": ("model", str), "--data": ("data", str), "--method": ("method", str), "--output": ("output", str),
    "--epochs": ("epochs", float), "--max-steps": ("max_steps", int), "--save-every": ("save_every", int),
    "--lr": ("lr", float), "--batch-size": ("batch_size", int), "--micro-batch-size": ("micro_batch_size", int),
    "--cutoff-len": ("cutoff_len", int), "--template": ("template", str), "--val-size": ("val_size", int),
    "--seed": ("seed", int),
}


def train_args(ns: argparse.Namespace):
    from .train.loop import TrainArgs

    settings = _read_config(ns.config)
    options = dict(settings.pop("method_options", None) or {})
    for flag, (name, _) in _TRAIN_FLAGS.items():
        value = getattr(ns, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            settings[name] = value
    if ns.resume:
        settings["resume"] = True
    known = TrainArgs.fields()
    for key, value in _parse_sets(ns.set).items():
        (settings if key in known else options)[key] = value
    unknown = sorted(set(settings) - known)
    if unknown:
        raise PeftlabError(f"unknown training setting(s) {', '.join(unknown)}; settings: {', '.join(sorted(known))}")
    missing = [k for k in ("model", "data", "output") if not settings.get(k)]
    if missing:
        raise PeftlabError(f"train needs {', '.join('--' + m for m in missing)} (flags or config)")
    return TrainArgs(**_numbers(settings, TrainArgs), method_options=options)


def _numbers(settings: dict[str, Any], cls) -> dict[str, Any]:
    """YAML 1.1 reads ``lr: 3e-4`` (no dot) as text: numeric settings given as text become numbers."""
    hints = typing.get_type_hints(cls)
    converted = dict(settings)
    for key, value in settings.items():
        kind = _numeric_kind(hints.get(key))
        if isinstance(value, str) and kind in (int, float):
            try:
                converted[key] = kind(float(value)) if kind is int else float(value)
            except ValueError:
                raise PeftlabError(f"training setting {key} must be a number, got {value!r}") from None
    return converted


def _numeric_kind(hint) -> type | None:
    """int or float for a setting annotated so (alone or optional), else None."""
    return next((kind for kind in (int, float) if hint is kind or kind in typing.get_args(hint)), None)


def cmd_train(ns: argparse.Namespace) -> int:
    if ns.continual:
        return cmd_train_continual(ns)
    from .train.loop import train

    args = train_args(ns)
    result = train(args)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports for all
        return 0
    print(f"trained {result.steps} steps, {result.tokens} tokens in {result.seconds:.0f}s "
          f"({result.tokens / max(result.seconds, 1e-9):.0f} tokens/s); final loss {result.final_loss:.4f}"
          + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""))
    print(f"adapter, metrics and loss plot in {result.output}")
    return 0


def cmd_train_continual(ns: argparse.Namespace) -> int:
    from .train.continual import load_config, run_continual

    if ns.data or ns.config or ns.resume:
        raise PeftlabError("--continual takes the data and settings from the tasks file: drop --data, --config "
                           "and --resume")
    flags = {name: value for flag, (name, _) in _TRAIN_FLAGS.items()
             if (value := getattr(ns, flag.lstrip("-").replace("-", "_"))) is not None}
    config = load_config(ns.continual, flags, _parse_sets(ns.set))
    result = run_continual(config)
    print(result.table())
    print(f"adapters, predictions and results in {config.base.output}")
    return 0


# --------------------------------------------------------------------------------------------- eval


def _load_with_adapter(model_name: str, adapter: str | None, merge: bool = False):
    import peftlab
    from peftlab.models import load_model

    model, tokenizer = load_model(model_name)
    if adapter:
        peftlab.load(model, adapter)
        if merge:
            peftlab.merge(model)
    return model, tokenizer


def cmd_eval(ns: argparse.Namespace) -> int:
    from .evaluate import evaluate, summary_table

    model, tokenizer = _load_with_adapter(ns.model, ns.adapter, ns.merge)
    results = {Path(path).stem: evaluate(model, tokenizer, path, ns.task, template=ns.template,
                                         batch_size=ns.batch_size, max_new_tokens=ns.max_new_tokens,
                                         limit=ns.limit, output_dir=ns.output)
               for path in ns.data}
    print(summary_table(results))
    return 0


# ------------------------------------------------------------------------------------------ methods


def cmd_methods(ns: argparse.Namespace) -> int:
    import peftlab

    config = None
    if ns.count:
        from .budget import architecture_config

        config = architecture_config(ns.count)
    for name in peftlab.methods():
        cls = peftlab.method_class(name)
        line = f"{name:<14} {cls.family:<20} mergeable={'yes' if cls.mergeable else 'no ':<3}  {cls.formula}"
        if config is not None:
            from .budget import trainable_count

            try:
                count = trainable_count(cls(), config)
                shown = "depends on weights" if count is None else f"{count:,}"
            except PeftlabError as exc:  # e.g. bitfit on a model without biases: say why, list the rest
                shown = f"n/a: {str(exc).split(';')[0]}"
            line += f"  [{ns.count}: {shown}]"
        print(line)
        if ns.verbose:
            print(f"    {cls.paper}")
            for f in cls.option_fields():
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                print(f"    {f.name:<22} = {default!r:<16} {f.metadata.get('doc', '')}")
    return 0


# ------------------------------------------------------------------------------------ merge, export


def cmd_merge(ns: argparse.Namespace) -> int:
    model, tokenizer = _load_with_adapter(ns.model, ns.adapter, merge=True)
    model.save_pretrained(ns.output)
    tokenizer.save_pretrained(ns.output)
    print(f"merged model written to {ns.output}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    import peftlab

    model, _ = _load_with_adapter(ns.model, ns.adapter)
    peftlab.export(model, ns.output, format=ns.format)
    print(f"{ns.format} adapter written to {ns.output}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(ns.output), steps=ns.steps)
    return 0


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning: train, "
                                     "evaluate and ship adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an adapter on instruction data")
    for flag, (name, kind) in _TRAIN_FLAGS.items():
        train.add_argument(flag, type=kind, default=None, help=f"training setting {name}")
    train.add_argument("--config", help="YAML file of training settings (method options under method_options)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a training setting or method option, e.g. --set r=16 --set warmup_steps=50")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    train.add_argument("--continual", metavar="TASKS_YAML", help="train over a sequence of tasks and score every "
                                                                "task after each (docs/continual.md)")
    train.set_defaults(run=cmd_train)

    ev = sub.add_parser("eval", help="generate answers and score them")
    ev.add_argument("--model", required=True)
    ev.add_argument("--adapter", help="adapter directory (peftlab or HF PEFT)")
    ev.add_argument("--merge", action="store_true", help="merge the adapter before evaluating")
    ev.add_argument("--data", required=True, nargs="+", help="test files; the task is inferred from each name")
    ev.add_argument("--task", help="task for all files (math, aqua, boolq, piqa, siqa, hellaswag, winogrande, "
                                   "arc-easy, arc-challenge, openbookqa)")
    ev.add_argument("--output", help="directory for predictions and summary.json")
    ev.add_argument("--limit", type=int, help="score only the first N records of each file")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=None)
    ev.add_argument("--template", default="alpaca")
    ev.set_defaults(run=cmd_eval)

    demo = sub.add_parser("demo", help="offline end-to-end demo on Gemma 3 270M (CPU, a few minutes)")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's setting)")
    demo.set_defaults(run=cmd_demo)

    methods = sub.add_parser("methods", help="list the registered methods")
    methods.add_argument("--verbose", "-v", action="store_true", help="show options and defaults")
    methods.add_argument("--count", metavar="ARCH", help="trainable parameters on an architecture's shapes, "
                                                         "e.g. llama-2-7b")
    methods.set_defaults(run=cmd_methods)

    merge = sub.add_parser("merge", help="fold an adapter into the base model and save the merged model")
    merge.add_argument("--model", required=True)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.set_defaults(run=cmd_merge)

    export = sub.add_parser("export", help="write an adapter in another library's format")
    export.add_argument("--model", required=True)
    export.add_argument("--adapter", required=True)
    export.add_argument("--output", required=True)
    export.add_argument("--format", default="peft", choices=["peft"])
    export.set_defaults(run=cmd_export)

    bench = sub.add_parser("bench", help="benchmarks: speed beside HF PEFT (GPU), quality leaderboard; "
                           "`peftlab bench speed --help` for their options")
    bench.add_argument("kind", choices=["speed", "quality"])
    bench.set_defaults(run=None)
    return parser


def run_bench(kind: str, argv: list[str]) -> int:
    """The benchmark modules parse their own options (and import torch only when they run)."""
    import importlib

    return importlib.import_module(f"peftlab.bench.{kind}").main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"] and argv[1:2] in (["speed"], ["quality"]):
        return run_bench(argv[1], argv[2:])
    ns = build_parser().parse_args(argv)
    try:
        return ns.run(ns)
    except PeftlabError as exc:
        print(f"peftlab {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftlab {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
