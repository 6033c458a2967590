"""DVC stage: one model's representative (calibration) samples and its shared calibration, once for all variants."""

import argparse

from pipeline import config, datasets, steps
from pipeline.build import resolve_model
from pipeline.entry import exit_on_error
from pipeline.io import atomic_path, read_bytes, write_json


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    name = parser.parse_args().model
    model = resolve_model(config.load(model=name), name)
    float_model = read_bytes(model.paths.float_model)
    pool = steps.representative_pool(model)
    steps.check_disjoint(model, pool, float_model)
    calibration = steps.shared_calibration(model, pool, float_model)
    with atomic_path(model.paths.representative) as tmp, open(tmp, "wb") as handle:
        datasets.save(pool, handle)
    write_json(model.paths.calibration, calibration)


if __name__ == "__main__":
    main()
