"""DVC stage: each model's part of params.yaml, as the small file its stages' DVC `params` name."""

import argparse

from pipeline import config
from pipeline.entry import exit_on_error


@exit_on_error
def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    config.write_model_parts()


if __name__ == "__main__":
    main()
