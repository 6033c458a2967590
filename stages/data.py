"""DVC stage: materialize one dataset or generator into checked samples."""

import argparse

from pipeline import config, datasets, layout
from pipeline.entry import exit_on_error
from pipeline.errors import ConfigError
from pipeline.io import atomic_path


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="a key of `dataset` or `generator` in params.yaml")
    name = parser.parse_args().dataset
    cfg = config.load(data=name)
    if name not in cfg.dataset and name not in cfg.generator:
        raise ConfigError(f"unknown dataset '{name}'", file=config.PARAMS_FILE, key=f"dataset.{name}")
    group = "dataset" if name in cfg.dataset else "generator"
    samples = datasets.materialize(getattr(cfg, group)[name], key=f"{group}.{name}")
    with atomic_path(layout.samples(name)) as tmp, open(tmp, "wb") as handle:
        datasets.save(samples, handle)


if __name__ == "__main__":
    main()
