"""Shared command-line plumbing: one-line errors, quiet JAX start-up."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from m3ddm_jax.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line on stderr (exit 2)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; a :class:`UserError` becomes one line on stderr and exit code 1 (no traceback)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return fn() or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# -- absl / ml_collections entry points (train.py, eval.py) -------------------------------------------------------

HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "--helpxml", "-helpxml")


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0].strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":  # KeyError / AttributeError reprs
        text = text[1:-1]
    return text or type(e).__name__


CONFIG_ERRORS = (AttributeError, KeyError, ValueError, TypeError, OSError, SyntaxError)


def config_error_message(e: BaseException, argv: list[str]) -> str:
    """One line for an error raised while loading a config file or applying ``--config.*`` overrides."""
    why = _first_line(e)
    if isinstance(e, (AttributeError, KeyError)) and why.isidentifier():
        used = [a.split("=")[0] for a in argv if a.startswith("--config.") and f".{why}" in a.split("=")[0]]
        why = f"{used[0] if used else why}: the config has no field {why!r} (--print_config lists them)"
    return f"bad --config or override: {why}"


def print_config(cfg, source: str | None = None) -> None:
    """:func:`format_config` on stdout (a closed pipe, as with ``| head``, is not an error)."""
    try:
        print(format_config(cfg, source), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def absl_flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run``: ``--help`` / ``-h`` print usage and exit 0 (absl exits 1), and a
    bad flag, config file or ``--config.FIELD=VALUE`` override is one line on stderr with exit code 2."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags  # noqa: PLC0415

        head, tail = (argv[:argv.index("--")], argv[argv.index("--"):]) if "--" in argv else (argv, [])
        head = [head[0]] + ["--help" if a == "-h" else a for a in head[1:]]
        asked = any(a in HELP_FLAGS for a in head[1:])
        try:
            return flags.FLAGS(head + tail)
        except flags.Error as e:
            print(f"{prog}: error: {_first_line(e)} (see --help)", file=sys.stderr)
            sys.exit(2)
        except SystemExit as e:  # absl's help flags print the usage, then exit 1
            if asked and e.code == 1:
                sys.exit(0)
            raise
        except BrokenPipeError:  # usage piped into a closed reader (| head)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0 if asked else 1)
        except CONFIG_ERRORS as e:  # config file / override
            print(f"{prog}: error: {config_error_message(e, head)}", file=sys.stderr)
            sys.exit(2)

    return parse


def format_config(cfg, source: str | None = None) -> str:
    """A config as ``field.path = value`` lines (the names ``--config.field.path=VALUE`` overrides take)."""
    lines = [f"# {source or 'config'}, after --config.* overrides; override a field with --config.FIELD=VALUE"]

    def walk(node, prefix: str) -> None:
        for key in node.keys():
            value = node[key]
            if hasattr(value, "keys") and hasattr(value, "to_dict"):  # a nested ConfigDict
                walk(value, f"{prefix}{key}.")
            else:
                lines.append(f"{prefix}{key} = {value!r}")

    walk(cfg, "")
    return "\n".join(lines)


def checked_config(cfg):
    """The value of a ``config_flags`` flag, or a :class:`ConfigError` naming why the file did not load
    (config_flags defers a load failure to the first attribute access)."""
    from m3ddm_jax.errors import ConfigError  # noqa: PLC0415

    try:
        list(cfg.keys())
    except (OSError, AttributeError, KeyError, SyntaxError, ImportError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("[Errno") or "Error" in ln), lines[0] if lines else "")
        raise ConfigError(f"cannot load the config: {why or type(e).__name__}") from e
    return cfg
