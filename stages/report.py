"""DVC stage: one model's variants side by side with the Pareto front (comparison/<model>/)."""

import argparse

from pipeline import config, layout, report
from pipeline.entry import exit_on_error
from pipeline.errors import ConfigError, InputError


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    name = parser.parse_args().model
    cfg = config.load(model=name)
    if name not in cfg.model:
        raise ConfigError(f"unknown model '{name}'", file=config.PARAMS_FILE, key=f"model.{name}")
    variants = [build.variant for build in cfg.build.values() if build.model == name]
    reports = report.collect(layout.REPORTS, {name: variants})
    if not reports:
        raise InputError(f"no validation report of {name}: run its validate stages first",
                         file=str(layout.REPORTS / name))
    report.write(reports, layout.COMPARISON)


if __name__ == "__main__":
    main()
