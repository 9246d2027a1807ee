"""How the four CLIs end: one exit-code table, and every fault as one line on stderr, never a traceback.

The traceback of a fault goes to the command's log file (`<dir>/<prog>.log`, where dir is the run, dataset or
checkpoint folder the command works on) when that folder exists, and to stderr as well under `--debug`.

    0   ok
    1   a real failure: a diverged loss, or a bug (the one line says where the traceback is)
    2   a user error: bad config or flag, missing or damaged data or checkpoint, an impossible or full output path
    75  preempted (SIGTERM/SIGUSR1): a checkpoint was written, requeue the job
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def describe_os_error(err: OSError) -> str:
    """An OSError as `<file>: <reason>` (e.g. `runs/x/a.pt: No space left on device`), without the errno tag."""
    reason = err.strerror or str(err)
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def one_line(err: BaseException) -> str:
    """The exception's message on one line."""
    text = describe_os_error(err) if isinstance(err, OSError) else str(err) or err.__class__.__name__
    return " ".join(text.split())


def write_log(log_dir: Optional[Path], prog: str) -> Optional[Path]:
    """Append the exception being handled, with its traceback, to `<log_dir>/<prog>.log`; the file, or None when
    there is no such folder or it cannot be written."""
    if log_dir is None or not Path(log_dir).is_dir():
        return None
    path = Path(log_dir) / f"{prog}.log"
    try:
        with open(path, "a") as f:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            f.write(f"--- {stamp} {prog} (rank {os.environ.get('RANK', '0')}) {' '.join(sys.argv[1:])}\n")
            f.write(traceback.format_exc())
    except OSError:
        return None
    return path


def run_cli(prog: str, body: Callable[[], int], *, user_errors: tuple[type[BaseException], ...] = (),
            failures: tuple[type[BaseException], ...] = (), debug: bool = False,
            log_dir: Callable[[], Optional[Path]] = lambda: None, interrupted: str = "interrupted") -> int:
    """Run a CLI's `body` and turn what it raises into one line on stderr and the table's exit code.

    `user_errors` (and every OSError: a path that cannot be made, a full disk) exit 2; `failures` (e.g. a diverged
    loss) and unexpected exceptions exit 1; Ctrl-C exits 130 with `interrupted` as its line. `log_dir()` names the
    folder whose log file gets the traceback; `debug` also prints it.
    """
    try:
        return body()
    except SystemExit:
        raise
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            code, line = EXIT_INTERRUPTED, f"{prog}: {interrupted}"
        elif isinstance(err, failures):
            code, line = EXIT_FAILURE, f"{prog}: {one_line(err)}"
        elif isinstance(err, user_errors + (OSError,)):
            code, line = EXIT_USER_ERROR, f"{prog}: error: {one_line(err)}"
        else:
            code, line = EXIT_FAILURE, f"{prog}: internal error: {err.__class__.__name__}: {one_line(err)}"
        try:
            where = log_dir()
        except Exception:  # the log's folder comes from the input that may have caused the fault
            where = None
        log = write_log(where, prog)
        if debug:
            traceback.print_exc(file=sys.stderr)
        elif code == EXIT_FAILURE and not isinstance(err, failures):
            line += f" (traceback in {log}; --debug prints it)" if log else " (--debug prints the traceback)"
        print(line, file=sys.stderr)
        return code
