"""DVC stage, the last: log every build's deferred records to MLflow in this one process (runs,
metrics, artifacts, registry versions), and write tracked.json (each build's verdict)."""

import argparse

from pipeline import config, layout, repro
from pipeline.entry import exit_on_error
from pipeline.io import write_json


@exit_on_error
def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    write_json(layout.TRACKED, repro.track(config.load()))


if __name__ == "__main__":
    main()
