"""The binaries' edge for users' mistakes: one line `error: <what, naming the file, key, row, tensor or flag>`
on stderr and exit code 2, never a traceback.

Exit codes of every binary: 0 done; 2 a mistake in the input (a flag, a config key, a file, a checkpoint, a spec;
argparse's and the launch scripts' code for usage errors), found before anything is written; 1 a bug (Python's
code for an uncaught exception, printed with its traceback) or a finding reported as such (experiments.plan: the
run does not fit); 128 + N killed by signal N (143: SIGTERM, after removing the temporary files,
`hm3_jax.io.atomic`). The library raises its mistakes as exceptions whose message names the thing at fault
(`run_config.ConfigError`, `zoo.ZooError`, `CheckpointError`, `SpecError`, ... all ValueErrors); `user_errors` turns the
ones a binary lists into that line. With `--verbosity=1` (or `HM3_TRACEBACK=1` in the environment) the
traceback is printed before it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from typing import NoReturn

from absl import app, flags

from hm3_jax.io import atomic

EXIT_USER_ERROR = 2


def wants_traceback() -> bool:
    """`--verbosity=1` or more, or `HM3_TRACEBACK` set to a non-empty value other than 0."""
    verbosity = flags.FLAGS.verbosity if flags.FLAGS.is_parsed() else 0
    return verbosity >= 1 or os.environ.get("HM3_TRACEBACK", "0") not in ("", "0")


def fail(message: str) -> NoReturn:
    """Prints `error: <message>` to stderr and exits with code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors(*error_types: type[BaseException]) -> Iterator[None]:
    """Inside the block, an exception of `error_types` is a user's mistake: `fail(str(error))` (its traceback
    first with `wants_traceback()`)."""
    try:
        yield
    except error_types as e:
        if wants_traceback():
            traceback.print_exc()
        fail(str(e))


def make_flags_parser(config_flag=None):
    """An `app.run(main, flags_parser=...)` parser: an unknown flag or a bad flag value, a config file that cannot
    be loaded, or a `--config.*` override of a missing key is `fail(...)` naming the flag (absl would print
    its usage text, ml_collections a traceback).

    Args:
      config_flag: the `FlagHolder` of `config_flags.DEFINE_config_file`, or None for a binary without one.
    """

    def parse(argv):
        try:
            parsed = flags.FLAGS(argv)  # a --config.* override of a missing key raises here
            if config_flag is not None:
                config_flag.value.keys()  # a file that failed to load raises on first access: here, not in main
            return parsed
        except flags.Error as e:
            fail(str(e))
        except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
            if wants_traceback():
                traceback.print_exc()
            key = str(e).strip("'\" ")
            named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key and key in a]
            if named and isinstance(e, AttributeError | KeyError):
                fail(f"{named[0]}: the config has no key {key!r}")
            why = [line.strip() for line in str(e).splitlines() if line.strip()]
            fail(f"{named[0] if named else '--config'}: {why[-1] if why else type(e).__name__}")

    return parse


def run(main, config_flag=None) -> None:
    """`app.run(main)` for a binary: flags parsed by `make_flags_parser(config_flag)`, and SIGTERM removing
    the temporary files this process made before it exits with code 143 (`atomic.install_signal_cleanup`)."""
    atomic.install_signal_cleanup()
    app.run(main, flags_parser=make_flags_parser(config_flag))
