"""DVC stage: build one bundled example model (no downloads)."""

import argparse

from pipeline import layout
from pipeline.entry import exit_on_error
from pipeline.examples import build_example


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("example")
    name = parser.parse_args().example
    build_example(name, layout.example(name))


if __name__ == "__main__":
    main()
