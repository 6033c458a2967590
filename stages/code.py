"""DVC stage: what each stage module runs, as the one code dependency of its stages."""

import argparse

from pipeline.entry import exit_on_error
from pipeline.fingerprint import write_fingerprints


@exit_on_error
def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    write_fingerprints()


if __name__ == "__main__":
    main()
