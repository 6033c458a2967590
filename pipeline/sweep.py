"""`litert-pipeline sweep`: try many quantization configs, compare them, pick one to ship.

A sweep is Hydra overrides, some of them sweeps: `quantization=a,b,c` (one member per
variant) or `quantization.static_wi8_ai8.num_samples=50,100,200` (one per value, with
`quantization=static_wi8_ai8`). Each member builds one variant of the selected models and
is one child run (per model) of the sweep's MLflow parent run.

1. Shared stages, once: compose conf/ (without the sweep's quantization and build
   overrides) into params.yaml and `dvc repro` the per-model stages every build reads (float
   model, reference outputs, calibration samples): DVC's cache makes this a no-op when done.
2. Members, either
   - Hydra multirun jobs (basic launcher, or Ray with `hydra/launcher=ray`): each composes
     its config, names itself after its swept values (the variant `<variant>__<key>_<value>`),
     writes it to its own working copy (`<sweep>/<job>/params.yaml`, the shared files linked
     in) and runs the build stages of dvc.yaml there; reports and models land in
     `<sweep>/reports/` and `<sweep>/models/`. Members share state through files and MLflow.
   - or DVC experiments (`--dvc`): one queued experiment per member, run by `-j` queue
     workers; each experiment's `report@<model>` rows (comparison/<model>/report.json, a
     DVC metrics file) come back through `dvc exp show`.
3. `<sweep>/comparison/`: report.md/.csv and the Pareto plots, logged to the parent run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline import config, report, repro, tracking
from pipeline.build import Build, derive, resolve_model
from pipeline.errors import EXIT_GATE, EXIT_OK, ConfigError, InputError, PipelineError
from pipeline.io import write_json, write_text
from pipeline.layout import ComparisonPaths

SWEEPS = Path("multirun")
# Per-model stages whose outputs every build reads (dvc.yaml): run once, shared by members.
SHARED_STAGES = ("convert", "representative")
# Dataset stages (all of them): a DVC experiment reproduces every stage, so each would make its own.
DATA_STAGES = ("data", "generate")
# Per-build stages a member runs, in order (their commands come from dvc.yaml).
MEMBER_STAGES = ("quantize", "metadata", "validate")
# Project entries a member's working copy does not link: outputs and state of its own.
NOT_LINKED = {"params.yaml", "dvc.lock", "artifacts", "models", "reports", "comparison", "mlflow.db", "mlruns",
              str(SWEEPS)}
MEMBER_FILE = "member.json"


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"bad override: {' '.join(str(exc).split())}") from None


def _touches_builds(key: str) -> bool:
    """Overrides that only choose or change variants and builds: the shared stages ignore them."""
    return key.split(".")[0] in ("quantization", "build", "autoselect")


# --- one member's config ---------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def member_label(variant: str, swept: list[str]) -> str:
    """The member's variant name: the variant, plus each swept value other than the variant
    choice (keys under the variant's own section shortened), e.g. static_wi8_ai8__num_samples_50."""
    parts = []
    for override in _parse(swept):
        key = override.key_or_group
        if key == "quantization":
            continue
        key = key.removeprefix(f"quantization.{variant}.")
        parts.append(_slug(f"{key}_{override.input_line.split('=', 1)[1]}"))
    return "__".join([variant, *parts])


@dataclass(frozen=True)
class Member:
    label: str  # the variant name the member builds under
    variant: str  # the variant of `quantization` it derives from
    builds: list[Build]  # one per model: the variant under its label, the model's gates and overrides
    params: dict[str, Any]  # its params.yaml, made from `builds`: what its stage commands read

    @property
    def models(self) -> list[str]:
        return [build.model.name for build in self.builds]


def member_config(raw: dict[str, Any], swept: list[str], *, file: str) -> Member:
    """The member's builds: each model of a composed config with its single variant, renamed
    after the swept values."""
    variants = list(raw.get("quantization") or {})
    if len(variants) != 1:
        raise ConfigError(f"a sweep member builds one variant, this one has {len(variants)}: choose it with "
                          "quantization=<name>, or sweep quantization=a,b,c", file=file, key="quantization")
    (variant,) = variants
    label = member_label(variant, swept)
    own = {name: entry for name, entry in (raw.get("build") or {}).items() if (entry or {}).get("variant") == variant}
    cfg = config.validate({**raw, "build": own, "autoselect": {}}, file=file)
    builds = []
    for name in cfg.model:
        entry = cfg.build.get(f"{name}-{variant}")
        builds.append(derive(resolve_model(cfg, name), label, cfg.quantization[variant],
                             entry.validation if entry else None))
    return Member(label, variant, builds, params_holding(cfg, builds))


def params_holding(cfg: config.PipelineConfig, builds: list[Build]) -> dict[str, Any]:
    """params.yaml for exactly `builds` (as `compose` writes it: typed, every default, no unused
    data): their variants by name, and each build with its whole gate set as its override."""
    params = config.plain(cfg)
    params.update(
        quantization={build.variant_name: config.plain(build.variant) for build in builds},
        build={build.name: {"model": build.model.name, "variant": build.variant_name,
                            "validation": config.plain(build.gates)} for build in builds},
        autoselect={},
    )
    return config.used_only(params)


# --- shared stages ---------------------------------------------------------------------------


def model_inputs(params: dict[str, Any], model: str) -> dict[str, Any]:
    """What the shared stages read of one model: its sections and the data they name."""
    section = params["model"][model]
    data = {**(params.get("dataset") or {}), **(params.get("generator") or {})}
    names = {section["representative"]["dataset"], section["evaluation"]["dataset"]}
    return {"model": {k: section.get(k) for k in ("source", "conversion", "representative", "evaluation")},
            "data": {name: data.get(name) for name in sorted(names)}}


def prepare_shared(overrides: list[str], conf_dir: str) -> dict[str, Any]:
    """Compose the sweep's fixed model settings into params.yaml and `dvc repro` the shared
    stages of its models, outside any parent run (they are not members). Returns the params."""
    import yaml

    base = [o.input_line for o in _parse(overrides) if not o.is_sweep_override() and not _touches_builds(o.key_or_group)]
    repro.write_composed(base, conf_dir)
    params = yaml.safe_load(Path(config.PARAMS_FILE).read_text(encoding="utf-8"))
    targets = [*DATA_STAGES, *(f"{stage}@{m}" for m in params["model"] for stage in SHARED_STAGES)]
    parent = os.environ.pop(tracking.PARENT_ENV, None)
    try:
        code = repro.dvc("repro", *targets)
    finally:
        if parent:
            os.environ[tracking.PARENT_ENV] = parent
    if code != 0:
        raise InputError(f"dvc repro {' '.join(targets)} failed (exit {code}): the shared stages must succeed first",
                         file="dvc.yaml")
    _log_shared_records()
    return params


def _log_shared_records() -> None:
    """The shared stages' records (the `track` stage did not run), logged without a parent run."""
    cfg = config.load()
    if not cfg.tracking.enabled or not tracking.pending(tracking.DEFERRED_DIR):
        return
    repro.upload_records(cfg, None)


# --- running a member in its working copy ----------------------------------------------------


def stage_commands(dvc_yaml: Path, build: str, model: str, variant: str) -> list[tuple[str, list[str]]]:
    """(stage, argv) of the build stages in dvc.yaml for one build, with this interpreter as python."""
    import yaml

    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    commands = []
    for name in MEMBER_STAGES:
        template = stages[name]["do"]["cmd"]
        line = (template.replace("${key}", build).replace("${item.model}", model).replace("${item.variant}", variant))
        if "${" in line:
            raise InputError(f"stage {name}: cannot fill {line!r} for a sweep member", file=str(dvc_yaml))
        argv = shlex.split(line)
        commands.append((name, [sys.executable, *argv[1:]] if argv[0] == "python" else argv))
    return commands


def link_working_copy(project: Path, workdir: Path, sweep_dir: Path, models: list[str]) -> None:
    """Link the project's sources and the models' shared files into `workdir`; reports and
    models go to the sweep's folders, where the report gathers them."""
    for entry in sorted(project.iterdir()):
        if entry.name.startswith(".") or entry.name in NOT_LINKED or (workdir / entry.name).exists():
            continue
        (workdir / entry.name).symlink_to(entry)
    for folder in ("reports", "models"):
        (sweep_dir / folder).mkdir(parents=True, exist_ok=True)
        if not (workdir / folder).exists():
            (workdir / folder).symlink_to(sweep_dir / folder)
    artifacts = workdir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    if not (artifacts / "data").exists():
        (artifacts / "data").symlink_to(project / "artifacts" / "data")
    for model in models:
        (artifacts / model).mkdir(exist_ok=True)
        for shared in sorted((project / "artifacts" / model).glob("*")):
            if shared.is_file() and not (artifacts / model / shared.name).exists():
                (artifacts / model / shared.name).symlink_to(shared)


def check_shared(member: Member, shared_params: dict[str, Any], *, file: str) -> None:
    """Members read the shared float model and calibration: their model settings must be those."""
    for model in member.models:
        if model not in shared_params["model"] or model_inputs(member.params, model) != model_inputs(shared_params, model):
            raise ConfigError("differs from the shared stages' params.yaml: a Hydra sweep shares one float model and "
                              "calibration per model; sweep model settings with --dvc", file=file, key=f"model.{model}")


def run_stages(member: Member, workdir: Path, project: Path) -> int:
    """Run the member's build stages in `workdir` (links into `project`); stage output goes to
    stages.log. Returns 0, EXIT_GATE when only validation gates failed, or the failing stage's
    exit code."""
    gate_failed = False
    env = {**os.environ, config.PROJECT_ROOT_ENV: str(project)}  # where the links may lead
    with open(workdir / "stages.log", "w", encoding="utf-8") as log:
        for model in member.models:
            build = f"{model}-{member.label}"
            for stage, command in stage_commands(workdir / "dvc.yaml", build, model, member.label):
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                code = subprocess.call(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
                if code == EXIT_GATE and stage == "validate":
                    gate_failed = True  # the report says which gates: a result, not an error
                elif code != 0:
                    return code
    return EXIT_GATE if gate_failed else EXIT_OK


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("error:")]
    return lines[-1] if lines else f"see {log}"


def run_member(cfg: Any) -> None:
    """The Hydra task: one sweep member (runs in the launcher's process or a Ray worker)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.get()
    project = Path(hydra_cfg.runtime.cwd)
    workdir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = workdir.parent
    fixed = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    swept = [o for o in hydra_cfg.overrides.task if _parse([o])[0].key_or_group not in fixed]
    result: dict[str, Any] = {"job": hydra_cfg.job.num, "workdir": str(workdir), "overrides": swept}
    try:
        file = str(workdir / config.PARAMS_FILE)
        member = member_config(OmegaConf.to_container(cfg, resolve=True), swept, file=file)
        result.update(label=member.label, variant=member.variant, models=member.models)
        check_shared(member, _load_yaml(project / config.PARAMS_FILE), file=file)
        _claim(sweep_dir, member.label)
        write_text(file, _dump_yaml(member.params))
        link_working_copy(project, workdir, sweep_dir, member.models)
        code = run_stages(member, workdir, project)
        result.update(exit_code=code, status={EXIT_OK: "passed", EXIT_GATE: "failed gates"}.get(code, "error"))
        if code not in (EXIT_OK, EXIT_GATE):
            result["message"] = _last_error(workdir / "stages.log")
    except PipelineError as exc:
        result.update(exit_code=exc.exit_code, status="error", message=exc.one_line())
    write_json(workdir / MEMBER_FILE, result)


def _claim(sweep_dir: Path, label: str) -> None:
    """Two members building under one name would share MLflow runs and reports: refuse."""
    claims = sweep_dir / "labels"
    claims.mkdir(exist_ok=True)
    try:
        os.close(os.open(claims / label, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise ConfigError(f"another member of this sweep is also named '{label}': sweep distinct values",
                          key="overrides") from None


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _dump_yaml(params: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(params, sort_keys=False)


# --- the sweep -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    name: str
    stamp: str  # when it started, naming its folder and experiments
    directory: Path
    parent: str | None
    cfg: config.PipelineConfig


def _start(overrides: list[str], conf_dir: str, name: str, kind: str) -> Sweep:
    if not config.NAME.fullmatch(name):  # it names the sweep's folder
        raise ConfigError(f"sweep {config.NAME_RULE}", key="--name")
    prepare_shared(overrides, conf_dir)
    cfg = config.load()
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    directory = (SWEEPS / f"{name}-{stamp}").resolve()
    directory.mkdir(parents=True)
    parent = tracking.start_parent_run(cfg.tracking, name, {"kind": kind, "sweep_dir": str(directory)})
    return Sweep(name, stamp, directory, parent, cfg)


def _ended_on_failure(sweep: Sweep):
    """The sweep's parent run never stays RUNNING: FAILED if what follows raises, KILLED if
    interrupted (`_finish` ends it otherwise)."""
    return repro.ended_on_failure(repro.Invocation(sweep.cfg, sweep.parent))


def _member_env(sweep: Sweep) -> dict[str, str]:
    """What members need of the invocation: its parent run, and the tracking URI resolved here
    (members run in other folders, where a relative sqlite path would point elsewhere)."""
    if sweep.parent is None:
        return {}
    return {tracking.PARENT_ENV: sweep.parent, "MLFLOW_TRACKING_URI": tracking.tracking_uri(sweep.cfg.tracking)}


def _finish(sweep: Sweep, results: list[dict[str, Any]], reports: list[report.ModelReport]) -> int:
    """Write the comparison, log it to the parent run, summarize; the exit code of the first
    member that could not build (gate failures are results, not errors)."""
    written = report.write(reports, sweep.directory / "comparison")
    write_json(sweep.directory / "members.json", results)
    errors = [r for r in results if r.get("status") == "error"]
    tracking.end_parent_run(
        sweep.cfg.tracking, sweep.parent, succeeded=not errors,
        metrics={"members": len(results), "members_failed": len(errors)},
        artifacts=[sweep.directory / "comparison", sweep.directory / "members.json"] if written else
        [sweep.directory / "members.json"],
    )
    for result in results:
        line = f"{result.get('label', result.get('overrides'))}: {result.get('status')}"
        print(line + (f" ({result['message']})" if result.get("message") else ""), file=sys.stderr)
    print(f"sweep {sweep.name}: {len(results)} members, report in {sweep.directory / 'comparison'}")
    return next((r["exit_code"] for r in errors), EXIT_OK)


def run_hydra_sweep(overrides: list[str], *, conf_dir: str, name: str) -> int:
    """Members as Hydra multirun jobs; `hydra/launcher=ray` (the `ray` extra) runs them on Ray."""
    import hydra

    sweep = _start(overrides, conf_dir, name, kind="sweep")
    with _ended_on_failure(sweep):
        fixed = sorted({o.key_or_group for o in _parse(overrides) if not o.is_sweep_override()})
        argv = [
            "--multirun",
            f"--config-path={Path(conf_dir).resolve()}",
            f"--config-name={config.CONFIG_NAME}",
            *overrides,
            f"hydra.sweep.dir='{sweep.directory}'",
            "hydra.sweep.subdir=${hydra.job.num}",
            f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]",
            *(f"+hydra.job.env_set.{key}='{value}'" for key, value in _member_env(sweep).items()),
        ]
        app = hydra.main(config_path=None, config_name=None, version_base=None)(run_member)
        saved = sys.argv
        sys.argv = ["litert-pipeline-sweep", *argv]
        try:
            app()
        except SystemExit as exc:  # Hydra exits after printing why it could not launch (bad override...)
            if exc.code:
                raise ConfigError("the sweep could not start: see Hydra's message above", key="overrides") from None
        finally:
            sys.argv = saved
        results = [json.loads(p.read_text()) for p in sorted(sweep.directory.glob(f"*/{MEMBER_FILE}"),
                                                              key=lambda p: int(p.parent.name))]
        if not results:
            raise InputError("no member ran: check the overrides", file=str(sweep.directory))
        builds: dict[str, list[str]] = {}
        for result in results:
            for model in result.get("models", []):
                builds.setdefault(model, []).append(result["label"])
    return _finish(sweep, results, report.collect(sweep.directory / "reports", builds))


# --- members as DVC experiments --------------------------------------------------------------


def expand(overrides: list[str]) -> list[list[str]]:
    """Every member's overrides: the cartesian product of the sweeps, as Hydra's basic sweeper orders it."""
    choices = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line.split("=", 1)[1]]
               for o in _parse(overrides)]
    keys = [o.input_line.split("=", 1)[0] for o in _parse(overrides)]
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*choices)]


def with_sweeper_params(overrides: list[str], conf_dir: str) -> list[str]:
    """The overrides plus the sweeps a sweep config (`+sweep=<name>`) declares in hydra.sweeper.params."""
    fixed = [o.input_line for o in _parse(overrides) if not o.is_sweep_override()]
    params = _compose(fixed, conf_dir, with_hydra=True).hydra.sweeper.params
    return [*overrides, *(f"{key}={value}" for key, value in (params or {}).items())]


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def experiment_overrides(member: Member, overrides: list[str]) -> list[str]:
    """`dvc exp run -S` overrides making DVC compose exactly the member's params."""
    extra = ["~build", f"+build={hydra_value(member.params['build'])}", "~autoselect", "+autoselect={}"]
    # DVC composes conf/ itself: select only the data and examples the member uses, as our
    # compose keeps them (a dataset of an example not built would be a stage that cannot run).
    for group in ("dataset", "generator", "examples"):
        if not any(o.lstrip("+~").split("=")[0] == group for o in overrides):
            names = list(member.params.get(group) or [])
            extra.append(f"{group}=[{','.join(names)}]")
            if not names and group != "examples":  # no group option selected leaves no key: dvc.yaml loops on it
                extra.append(f"+{group}={{}}")
    # And the models' and data's settings as compose spelled them (every default): the shared stages'
    # params must be the same, or the first member runs conversion and calibration again.
    extra += [f"++{group}.{name}={hydra_value(section)}" for group in ("model", "dataset", "generator")
              for name, section in (member.params.get(group) or {}).items()]
    if member.label != member.variant:
        extra.append(f"+quantization.{member.label}={hydra_value(member.params['quantization'][member.label])}")
    return [*overrides, *extra]


def _compose(overrides: list[str], conf_dir: str, *, with_hydra: bool = False) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
            return compose(config.CONFIG_NAME, overrides=overrides, return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(" ".join(str(exc).split()), file=str(Path(conf_dir) / f"{config.CONFIG_NAME}.yaml")) from None


def _compose_raw(overrides: list[str], conf_dir: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(_compose(overrides, conf_dir), resolve=True)


def _queue_workers() -> str:
    result = subprocess.run([str(repro.BIN / "dvc"), "queue", "status"], capture_output=True, text=True)
    match = re.search(r"Worker status: (\d+) active, (\d+) idle", result.stdout)
    return "" if match is None or match.groups() == ("0", "0") else match.group(0)


def _queue_states(names: set[str]) -> dict[str, str]:
    result = subprocess.run([str(repro.BIN / "dvc"), "queue", "status"], capture_output=True, text=True)
    states = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in names:
            states[fields[1]] = fields[-1]
    return states


def _experiment_metrics(names: set[str]) -> dict[str, dict[str, Any]]:
    """Each named experiment's metrics files, as `dvc exp show --json` reports them."""
    result = subprocess.run([str(repro.BIN / "dvc"), "exp", "show", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise InputError(f"dvc exp show failed: {' '.join(result.stderr.split())[:300]}", file="dvc.yaml")
    found = {}
    for commit in json.loads(result.stdout):
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("name") in names:  # files the experiment did not commit come with an "error"
                    metrics = (rev.get("data") or {}).get("metrics") or {}
                    found[rev["name"]] = {path: entry.get("data") for path, entry in metrics.items()}
    return found


def run_dvc_sweep(overrides: list[str], *, conf_dir: str, name: str, jobs: int, poll_seconds: float = 2.0) -> int:
    """Members as DVC experiments: queued, then run by `jobs` queue workers."""
    busy = _queue_workers()
    if busy:
        raise InputError(f"DVC queue workers are already running ({busy}); they would run members outside this "
                         "sweep's MLflow parent: wait for them or `dvc queue stop`", file=".dvc")
    # Every member checked before anything is built or an MLflow run opened.
    swept_overrides = with_sweeper_params(overrides, conf_dir)
    planned: dict[str, tuple[Member, list[str]]] = {}
    for member_overrides in expand(swept_overrides):
        swept = [o for o, base in zip(member_overrides, _parse(swept_overrides)) if base.is_sweep_override()]
        member = member_config(_compose_raw(member_overrides, conf_dir), swept, file="params.yaml")
        if member.label in planned:
            raise ConfigError(f"two members are both named '{member.label}': sweep distinct values", key="overrides")
        planned[member.label] = (member, member_overrides)
    sweep = _start(overrides, conf_dir, name, kind="sweep-dvc")
    with _ended_on_failure(sweep):
        members = {f"{label}-{sweep.stamp}": planned_member for label, planned_member in planned.items()}
        for experiment, (member, member_overrides) in members.items():
            command = [str(repro.BIN / "dvc"), "exp", "run", "--queue", "-n", experiment]
            for override in experiment_overrides(member, member_overrides):
                command += ["-S", override]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise InputError(f"dvc exp run --queue failed: {' '.join(result.stderr.split())[:300]}", file="dvc.yaml")

        env = {**os.environ, **_member_env(sweep), "PATH": f"{repro.BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        subprocess.run([str(repro.BIN / "dvc"), "queue", "start", "-j", str(jobs)], env=env, check=False)
        pending = set(members)
        while True:
            states = _queue_states(pending)
            if not any(state in ("Queued", "Running") for state in states.values()):
                break
            time.sleep(poll_seconds)

        metrics = _experiment_metrics(set(members))
        results, rows = [], {}
        for job, (experiment, (member, member_overrides)) in enumerate(members.items()):
            result: dict[str, Any] = {"job": job, "experiment": experiment, "label": member.label,
                                      "variant": member.variant, "models": member.models, "overrides": member_overrides}
            found = {m: (metrics.get(experiment, {}).get(ComparisonPaths.of(m).json.as_posix()) or {}).get(member.label)
                     for m in member.models}
            if not all(found.values()):
                result.update(exit_code=InputError.exit_code, status="error",
                              message=f"experiment {experiment} did not finish: dvc queue logs {experiment}")
            else:
                for model, fields in found.items():
                    rows.setdefault(model, []).extend(report.rows_from_json(model, {member.label: fields}))
                passed = all(fields["passed"] for fields in found.values())
                result.update(exit_code=EXIT_OK if passed else EXIT_GATE, status="passed" if passed else "failed gates")
            results.append(result)
    return _finish(sweep, results, [report.build_model_report(model, model_rows) for model, model_rows in rows.items()])
