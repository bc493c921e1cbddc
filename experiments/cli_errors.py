"""The binaries' edge for mistakes in flags: a config file or `--config.*` override that cannot be used is one
line `error: <flag>: <why>` and exit code 1, never a traceback from ml_collections."""

import sys

from absl import app


def make_flags_parser(config_flag):
    """An `app.run(main, flags_parser=...)` parser: absl's own (usage errors as usual), then the config file is
    loaded (ml_collections defers a missing file's error to the first `.value`) and its overrides applied.

    Args:
      config_flag: the `FlagHolder` of `config_flags.DEFINE_config_file`.
    """

    def parse(argv):
        try:
            parsed = app.parse_flags_with_usage(argv)
            config_flag.value.keys()  # a file that failed to load raises on first access: here, not in main
            return parsed
        except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
            key = str(e).strip("'\" ")
            named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key and key in a]
            if named and isinstance(e, AttributeError | KeyError):
                sys.exit(f"error: {named[0]}: the config has no key {key!r}")
            why = [line.strip() for line in str(e).splitlines() if line.strip()]
            sys.exit(f"error: {named[0] if named else '--config'}: {why[-1] if why else type(e).__name__}")

    return parse
