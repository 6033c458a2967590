"""How entry points end: a PipelineError as one line with its documented exit code, and, when
an invocation (`litert-pipeline run`/`nightly`) runs the stage, its outcome left where that
invocation looks, so it exits with the stage's code rather than DVC's."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from pipeline.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, OUTCOMES_ENV, PipelineError, first_line
from pipeline.io import write_json


def record_outcome(code: int, message: str) -> None:
    """Leave this stage's failure for the invocation that ran it (if one did)."""
    folder = os.environ.get(OUTCOMES_ENV)
    if not folder:
        return
    stage = os.environ.get("DVC_STAGE") or f"pid-{os.getpid()}"
    name = "".join(c if c.isalnum() or c in "-_@." else "_" for c in stage)
    try:
        write_json(Path(folder) / f"{name}.json", {"stage": stage, "exit_code": code, "message": message})
    except PipelineError:
        pass  # the invocation then reports DVC's failure as internal: nothing better is known


def name_the_conf_file(exc: PipelineError) -> None:
    """An error about a key of params.yaml names the conf/ file that set the value, where one did
    (params.yaml is composed from conf/: the team edits the conf file)."""
    import yaml

    from pipeline.config import CONF_DIR, PARAMS_FILE, conf_file_setting, value_at

    if exc.file != PARAMS_FILE or not exc.key or not Path(CONF_DIR).is_dir():
        return
    try:
        value = value_at(yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8")), exc.key)
        file = conf_file_setting(Path(CONF_DIR), exc.key, value)
    except Exception:  # only a better file name was at stake
        return
    if file:
        exc.file = file
        exc.args = (exc.one_line(),)


def exit_on_error(main):
    """Run a CLI entry point; print a PipelineError as one line and exit with its code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as exc:
            name_the_conf_file(exc)
            print(f"error: {exc.one_line()}", file=sys.stderr)
            record_outcome(exc.exit_code, exc.one_line())
            _error_line_stays_last()
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where a command turns it into this
            print("error: interrupted", file=sys.stderr)
            record_outcome(EXIT_INTERRUPTED, "interrupted")
            _error_line_stays_last()
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # a bug: the traceback follows, and the invocation learns of it
            record_outcome(EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {first_line(exc)}")
            raise

    return wrapper


def _error_line_stays_last() -> None:
    """Drop what native code writes to stderr while the process exits (LiteRT's accelerator
    registry logs its teardown from static destructors), so the error line is the last line."""
    sys.stderr.flush()
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    except OSError:
        pass
