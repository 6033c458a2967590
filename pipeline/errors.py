"""Errors the pipeline reports to users as one line, with a documented exit code."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

# Exit codes (documented in README.md).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_INPUT = 3
EXIT_GATE = 4
EXIT_TRACKING = 5
EXIT_OUTPUT = 7
EXIT_BUSY = 8
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


class PipelineError(Exception):
    """An expected failure: printed as a single line, exits with `exit_code`."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.message = message
        self.file = file
        self.key = key
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ": ".join(part for part in (self.file, self.key) if part)
        text = f"{where}: {self.message}" if where else self.message
        return " ".join(printable(text).split())


class ConfigError(PipelineError):
    """The configuration is invalid (unknown key, wrong type, bad reference...)."""

    exit_code = EXIT_CONFIG


class InputError(PipelineError):
    """An input named by a valid config is missing, unreadable or malformed."""

    exit_code = EXIT_INPUT


class RejectedSample(InputError):
    """A sample the float model itself cannot run (a token id outside its vocabulary...): raised
    where the data's origin is unknown; the caller names the dataset it came from."""


class GateError(PipelineError):
    """A model was produced but failed a validation gate or a compatibility check."""

    exit_code = EXIT_GATE


class TrackingError(PipelineError):
    """The MLflow tracking server could not be reached or refused a request."""

    exit_code = EXIT_TRACKING


class BusyError(PipelineError):
    """Another invocation holds the project (run, nightly, sweep, compose, sync): nothing was changed."""

    exit_code = EXIT_BUSY


class OutputError(PipelineError):
    """An output could not be written (disk full, file size limit, a folder that is a file...)."""

    exit_code = EXIT_OUTPUT


# Terminal escape sequences (colours Keras puts in its messages, or ones a config value smuggles
# in to rewrite an operator's screen).
ESCAPE_SEQUENCE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def printable(text: str) -> str:
    """`text` without escape sequences, other control characters shown as '?'."""
    return "".join(c if c.isprintable() or c.isspace() else "?" for c in ESCAPE_SEQUENCE.sub("", text))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (library errors span many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def naming_file(file: str) -> Iterator[None]:
    """Name `file` in the pipeline errors raised inside that do not name one (code that
    parses bytes does not know where they came from)."""
    try:
        yield
    except PipelineError as exc:
        if exc.file is None:
            exc.file = file
            exc.args = (exc.one_line(),)
        raise


# Most severe first: when several stages fail, `run` exits with the first of these it saw.
# A bug outranks a full disk, which outranks a tracking outage, a config, an input, a gate.
SEVERITY = (EXIT_INTERNAL, EXIT_OUTPUT, EXIT_TRACKING, EXIT_CONFIG, EXIT_INPUT, EXIT_GATE)
# Set by `litert-pipeline run`/`nightly`: a folder where each failing stage records its exit code
# and message, so the invocation exits with the stage's code rather than DVC's.
OUTCOMES_ENV = "LITERT_OUTCOMES"


def most_severe(codes: list[int]) -> int:
    return min(codes, key=lambda code: SEVERITY.index(code) if code in SEVERITY else len(SEVERITY))
