"""DVC stage: each model's part of params.yaml, as the small file its stages' DVC `params` name."""

import argparse
import json
import shutil

from pipeline import config, layout
from pipeline.entry import exit_on_error
from pipeline.io import write_text


@exit_on_error
def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    parts = config.model_parts()
    shutil.rmtree(layout.MODEL_PARAMS, ignore_errors=True)  # a removed model's part goes with it
    for name, part in parts.items():
        write_text(layout.model_params(name), json.dumps(part, indent=1) + "\n")


if __name__ == "__main__":
    main()
