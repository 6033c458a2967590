"""The `litert-pipeline` command. Imports TensorFlow only in commands that need it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.entry import exit_on_error
from pipeline.errors import EXIT_CONFIG, EXIT_OK, ConfigError, InputError, naming_file

if TYPE_CHECKING:  # the commands import what they need when they run (MLflow and TensorFlow are slow)
    from pipeline.config import PipelineConfig
    from pipeline.repro import Reproduced


def _jobs(text: str) -> int:
    """`-j N`: 1 to 64 workers."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: '{text}'") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is not in 1..64")
    return value


def cmd_compose(args: argparse.Namespace) -> int:
    from pipeline import repro

    repro.write_composed(args.overrides, args.conf, args.output)
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Compose params.yaml, then `dvc repro` under one MLflow parent run."""
    from pipeline import parallel, repro

    if args.jobs > 1 and args.targets:
        raise ConfigError("-j builds whatever is out of date: it cannot be combined with --target", key="--jobs")
    if args.targets:
        cfg, stale = repro.compose_checked(args.overrides, args.conf), None
    else:  # dvc status asked before MLflow (its import alone takes 2.4-4.7 s); the workers reuse it
        cfg, stale = repro.compose_with_status(args.overrides, args.conf)
    workers = not args.targets and parallel.through_workers(cfg, args.jobs)
    if stale is not None:
        if not stale and repro.nothing_to_upload():
            print("Nothing to build: every stage is up to date (dvc status); no MLflow run opened.")
            return _summarized(cfg, repro.Reproduced(EXIT_OK))
    if args.targets:
        invocation, shared = repro.start(cfg, args.name, kind="repro"), parallel.Shared(None, None)
    else:  # the shared stages (datasets, example models) build while MLflow opens the parent run
        invocation, shared = parallel.start_sharing(cfg, args.name, "repro", stale, workers, verbose=args.verbose)
    with repro.ended_on_failure(invocation):
        result = parallel.build_rest(cfg, args.jobs, workers, stale, shared, *args.targets, verbose=args.verbose)
        repro.upload_deferred(invocation)
    repro.finish(invocation, succeeded=result.code == 0)  # with the report stages' comparison of the variants
    return _summarized(cfg, result)


def _summarized(cfg: PipelineConfig, result: Reproduced) -> int:
    """dvc.yaml's artifacts with this run's verdicts, and the summary; returns the run's code."""
    from pipeline import repro

    stale, graph = set(), {}
    if result.code != EXIT_OK:  # what failed left its builds' earlier models in place: not this run's verdicts
        try:
            stale, graph = result.state()
        except InputError as exc:
            print(f"warning: {exc.one_line()}: the verdicts below may be of earlier runs", file=sys.stderr)
    verdicts = repro.build_verdicts(cfg, stale, graph)  # hashes every delivered model: once
    repro.declare_artifacts(cfg, verdicts)
    print(repro.summary(cfg, verdicts))
    return result.code


def cmd_report(args: argparse.Namespace) -> int:
    """Compare each model's variants: Markdown, CSV, Pareto plots and the `dvc plots` data."""
    from pathlib import Path

    from pipeline import config, report
    from pipeline.errors import ConfigError, InputError

    cfg = config.load(args.params)
    models = args.models or list(cfg.model)
    for model in models:
        if model not in cfg.model:
            raise ConfigError(f"unknown model '{model}' (known: {', '.join(cfg.model)})", file=args.params, key="--model")
    builds = {m: [b.variant for b in cfg.build.values() if b.model == m] for m in models}
    written = report.write(report.collect(Path(args.reports), builds), Path(args.out))
    if not written:
        raise InputError("no validation report of these models: run the pipeline first", file=args.reports)
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline import sweep

    if args.dvc:
        return sweep.run_dvc_sweep(args.overrides, conf_dir=args.conf, name=args.name, jobs=args.jobs)
    return sweep.run_hydra_sweep(args.overrides, conf_dir=args.conf, name=args.name)


def cmd_nightly(args: argparse.Namespace) -> int:
    from pipeline import nightly

    return nightly.run_nightly(args.overrides, args.conf, args.name, verbose=args.verbose, jobs=args.jobs)


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline import config, tracking

    alias = tracking.promote(config.load().tracking, args.name, args.version, args.alias)
    print(f"{args.name}: alias {alias} -> version {args.version}")
    return EXIT_OK


def cmd_versions(args: argparse.Namespace) -> int:
    from pipeline import config, registry, tracking

    if not config.REGISTRY_NAME.fullmatch(args.name):  # a usage error, not the tracking server's
        raise ConfigError("not a registered model name (letters, digits, _, . and -, e.g. vision.digits)",
                          file="command line", key="name")
    versions = tracking.list_versions(config.load().tracking, args.name)
    print(json.dumps(versions, indent=2) if args.json else registry.format_versions(args.name, versions))
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    """Upload what stages queued while MLflow was unreachable (or deferred for a `track` stage
    that did not run: a plain `dvc repro` that failed), under one parent run."""
    from dataclasses import replace

    from pipeline import config, tracking

    tracking.move_deferred_to_pending()
    if not tracking.pending():
        print("nothing to upload")
        return EXIT_OK
    tracking_config = replace(config.load().tracking, required=True)  # syncing is the point: fail loudly
    parent = tracking.start_parent_run(tracking_config, args.name, {"kind": "sync"})
    count = tracking.sync(tracking_config, parent)
    tracking.end_parent_run(tracking_config, parent, succeeded=True)
    print(f"uploaded {count} queued record(s) to {tracking.shown(tracking.tracking_uri(tracking_config))}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline import metadata
    from pipeline.io import read_bytes

    model = read_bytes(args.model)
    with naming_file(args.model):
        print(json.dumps(metadata.inspect_model(model), indent=2, sort_keys=True))
    if args.extract:
        for path in metadata.extract_packed_files(model, args.extract):
            print(f"extracted {path}", file=sys.stderr)
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, as every other error (`--help` shows the usage); exit 2."""

    def error(self, message: str):
        self.exit(EXIT_CONFIG, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="litert-pipeline",
        description="Turn TensorFlow models into validated, quantized LiteRT models, driven by conf/.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    compose = commands.add_parser("compose", help="compose conf/ into params.yaml (validated)")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. 'model=[digits]'")
    compose.add_argument("--conf", default="conf", help="config folder (default: conf)")
    compose.add_argument("--output", default="params.yaml")
    compose.set_defaults(func=cmd_compose)

    run = commands.add_parser("run", help="compose, then dvc repro under one MLflow parent run")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. 'model=[digits]'")
    run.add_argument("--conf", default="conf")
    run.add_argument("--target", dest="targets", action="append", default=[], help="dvc repro target (repeatable)")
    run.add_argument("--name", default="pipeline", help="name of the MLflow parent run")
    run.add_argument("-j", "--jobs", type=_jobs, default=1, metavar="N",
                     help="build up to N units (models, or builds of a model) at once, in workers sharing the "
                          "project's DVC cache; default 1 (one worker when several models are selected)")
    run.add_argument("-v", "--verbose", action="store_true", help="show native libraries' log lines too")
    run.set_defaults(func=cmd_run)

    inspect = commands.add_parser("inspect", help="print a .tflite's metadata, packed files and provenance")
    inspect.add_argument("model")
    inspect.add_argument("--extract", metavar="DIR", help="write the packed files into DIR")
    inspect.set_defaults(func=cmd_inspect)

    report = commands.add_parser("report", help="compare each model's variants: report.md/.csv and Pareto plots")
    report.add_argument("--model", dest="models", action="append", default=[], help="a model (repeatable; default: all)")
    report.add_argument("--params", default="params.yaml", help="the config naming the models and variants")
    report.add_argument("--reports", default="reports", help="where the validation reports are (default: reports)")
    report.add_argument("--out", default="comparison", help="output folder (default: comparison)")
    report.set_defaults(func=cmd_report)

    sweep = commands.add_parser(
        "sweep", help="build and compare many quantization configs under one MLflow parent run (see README)")
    sweep.add_argument("overrides", nargs="*",
                       help="Hydra overrides with sweeps, e.g. 'model=[digits]' quantization=float,static_wi8_ai8")
    sweep.add_argument("--conf", default="conf")
    sweep.add_argument("--name", default="sweep", help="name of the MLflow parent run and the sweep folder")
    sweep.add_argument("--dvc", action="store_true", help="run members as queued DVC experiments")
    sweep.add_argument("--jobs", "-j", type=_jobs, default=2, help="DVC queue workers (with --dvc; default 2)")
    sweep.set_defaults(func=cmd_sweep)

    nightly = commands.add_parser(
        "nightly", help="run, register passing variants, compare with production, write nightly/summary.{md,json}")
    nightly.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. 'model=[digits]'")
    nightly.add_argument("--conf", default="conf")
    nightly.add_argument("--name", default="nightly", help="name of the MLflow parent run")
    nightly.add_argument("-j", "--jobs", type=_jobs, default=1, metavar="N",
                         help="build up to N models at once (as `run -j N`)")
    nightly.add_argument("-v", "--verbose", action="store_true", help="show native libraries' log lines too")
    nightly.set_defaults(func=cmd_nightly)

    promote = commands.add_parser("promote", help="point the alias <alias>-<variant> at a registered version")
    promote.add_argument("name", help="registered model, e.g. vision.digits")
    promote.add_argument("version", type=int)
    promote.add_argument("--alias", default="production")
    promote.set_defaults(func=cmd_promote)

    versions = commands.add_parser("versions", help="list a registered model's versions with their key metrics")
    versions.add_argument("name", help="registered model, e.g. vision.digits")
    versions.add_argument("--json", action="store_true", help="print JSON (all tags) instead of a table")
    versions.set_defaults(func=cmd_versions)

    sync = commands.add_parser("sync", help="upload what stages queued in .litert/pending/ while MLflow was down")
    sync.add_argument("--name", default="sync", help="name of the MLflow parent run")
    sync.set_defaults(func=cmd_sync)
    return parser


# Commands that write params.yaml, run stages or upload the queue take the project lock.
LOCKED = {"compose", "run", "nightly", "sweep", "sync"}


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in LOCKED:
            code = args.func(args)
        else:
            from pipeline.repro import project_lock

            # Started in the background by a shell, SIGINT is ignored here and in every process
            # started from here: DVC and its stages would then not stop when this run is stopped
            # (Ctrl-C or SIGTERM: they get a SIGINT).
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            with project_lock(args.command):
                code = args.func(args)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is handled below
    except BrokenPipeError:  # `litert-pipeline inspect … | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    main()
