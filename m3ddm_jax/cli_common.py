"""Shared command-line plumbing: one-line errors, quiet JAX start-up."""
from __future__ import annotations

import argparse
import os
import re
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

_ML_SUGGESTION = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def config_error_message(e: BaseException, argv: list[str]) -> str:
    """One line for an error raised while loading a config file or applying ``--config.*`` overrides: an
    unknown field names the override and the closest existing field (``did you mean --config.train.steps?``),
    a value that does not parse names the field, its type and its current value."""
    cfg = _loaded_config(argv, e)
    if isinstance(e, (AttributeError, KeyError, TypeError)) or _is_unknown_config_flag(e):
        line = _unknown_field_line(cfg, argv, e)
        if line:
            return line
    if _is_bad_value(e):
        line = _bad_value_line(cfg, e)
        if line:
            return line
    return f"bad --config or override: {_first_line(e)}"


def _is_unknown_config_flag(e: BaseException) -> bool:
    return type(e).__name__ == "UnrecognizedFlagError" and "'config." in str(e)


def _is_bad_value(e: BaseException) -> bool:
    return type(e).__name__ == "IllegalFlagValueError" or (isinstance(e, ValueError) and "--config." in str(e))


def _override_args(argv: list[str]) -> list[tuple[str, str | None]]:
    """``[(field path, value or None), ...]`` of the ``--config.PATH=VALUE`` / ``--config.PATH VALUE`` args."""
    out = []
    for i, a in enumerate(argv):
        a = "-" + a.lstrip("-") if a.startswith("--") or a.startswith("-config.") else a
        if not a.startswith("-config."):
            continue
        name, eq, value = a[len("-config."):].partition("=")
        out.append((name, value if eq else (argv[i + 1] if i + 1 < len(argv) else None)))
    return out


def _config_file_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
    return None


def _loaded_config(argv: list[str], e: BaseException | None = None):
    """The config the overrides apply to, or None: the parsed flag's value, else the ``--config`` file (or
    the flag's default file, found in the failed definition's frames) loaded afresh without overrides."""
    try:
        from absl import flags  # noqa: PLC0415

        if "config" in flags.FLAGS:
            value = flags.FLAGS["config"].value
            if value is not None and hasattr(value, "keys"):
                list(value.keys())
                return value
    except Exception:  # noqa: BLE001 - not parsed / failed to load: load the file below
        pass
    path = _config_file_arg(argv)
    if path is None and e is not None:  # a default config file, overridden while its flag was being defined
        import traceback  # noqa: PLC0415

        for frame, _ in traceback.walk_tb(e.__traceback__):
            if type(frame.f_locals.get("self")).__name__ == "_ConfigFlag" and isinstance(
                    frame.f_locals.get("default"), str):
                path = frame.f_locals["default"]
    if not path:
        return None
    try:
        import importlib.util  # noqa: PLC0415

        file, _, arg = path.partition(":")
        spec = importlib.util.spec_from_file_location("_m3ddm_config_for_suggestions", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - the suggestion is a courtesy
        return None


def config_paths(cfg) -> list[str]:
    """Every field of a ConfigDict as a dotted path, sections included (``train``, ``train.steps``, ...)."""
    out: list[str] = []

    def walk(node, prefix: str) -> None:
        for key in node.keys():
            out.append(prefix + key)
            value = node[key]
            if hasattr(value, "keys") and hasattr(value, "to_dict"):
                walk(value, f"{prefix}{key}.")

    walk(cfg, "")
    return out


def suggest_fields(bad: str, paths: list[str]) -> list[str]:
    """The existing fields closest to the dotted path ``bad`` (at most 3, best first): a wrong section is
    corrected among its siblings (``trian.steps`` -> ``train.steps``); a wrong last name is looked up as the
    same name in other sections (``optim.steps`` -> ``train.steps``, ``preview.steps``), else corrected among
    its siblings (``train.step`` -> ``train.steps``), else matched against every whole path."""
    import difflib  # noqa: PLC0415

    known = set(paths)
    sections = {p.rsplit(".", 1)[0] for p in paths if "." in p}
    parts = bad.split(".")
    i = 0
    while i < len(parts) and ".".join(parts[:i + 1]) in known:
        i += 1
    if i == len(parts):
        return []
    prefix = ".".join(parts[:i])
    siblings = [p.rsplit(".", 1)[-1] for p in paths if p.count(".") == i and (not i or p.startswith(prefix + "."))]
    close = difflib.get_close_matches(parts[i], siblings, n=3, cutoff=0.6)
    if i < len(parts) - 1:  # a wrong section: correct it, then the rest
        for c in close:
            fixed = ".".join(parts[:i] + [c] + parts[i + 1:])
            if fixed in known:
                return [fixed]
            rest = suggest_fields(fixed, paths)
            if rest:
                return rest
    else:
        same = [p for p in paths if p.rsplit(".", 1)[-1] == parts[-1] and p not in sections]
        if same:
            return same[:3]
        if close:
            return [".".join(parts[:i] + [c]) for c in close[:1]]
    leaves = [p for p in paths if p not in sections]
    return difflib.get_close_matches(bad, leaves, n=1, cutoff=0.75)


def _unknown_field_line(cfg, argv: list[str], e: BaseException) -> str | None:
    overrides = _override_args(argv)
    if cfg is not None:
        paths = config_paths(cfg)
        known = set(paths)
        for name, value in overrides:
            if name in known:
                continue
            parts = name.split(".")
            parent = next((".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in known),
                          "")
            arg = f"--config.{name}" + (f"={value}" if value is not None else "")
            if parent and not hasattr(_get(cfg, parent), "keys"):
                return (f"{arg}: {parent} is a {type(_get(cfg, parent)).__name__} value, not a section "
                        "(--print_config lists every field)")
            guesses = suggest_fields(name, paths)
            hint = f"; did you mean {' or '.join('--config.' + g for g in guesses)}?" if guesses else ""
            return f"{arg}: the config has no field {name!r}{hint} (--print_config lists every field)"
    m = _ML_SUGGESTION.search(str(e.args[0]) if e.args else str(e))  # no config to search: ml_collections' guess
    if m:
        good, bad = m.groups()
        for name, value in overrides:
            parts = name.split(".")
            if bad in parts:
                fixed = ".".join(good if p == bad else p for p in parts)
                return (f"--config.{name}: the config has no field {name!r}; did you mean --config.{fixed}? "
                        "(--print_config lists every field)")
        return f"bad --config override: the config has no field {bad!r}; did you mean {good!r}?"
    return None


def _get(cfg, path: str):
    node = cfg
    for k in path.split("."):
        node = node[k]
    return node


_FLAG_VALUE = re.compile(r"flag --config\.([\w.]+)=(.*?): (.*)$")


def _bad_value_line(cfg, e: BaseException) -> str | None:
    m = _FLAG_VALUE.search(_first_line(e))
    if not m:
        return None
    path, value, why = m.groups()
    current = None
    if cfg is not None:
        try:
            current = _get(cfg, path)
        except Exception:  # noqa: BLE001
            current = None
    if isinstance(current, bool):
        want = "True or False"
    elif current is not None:
        kind = type(current).__name__
        want = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    else:
        return f"--config.{path}={value}: not a valid value for {path}: {why}"
    return f"--config.{path}={value}: {path} takes {want} (now {current!r}), got {value!r}"


def print_config(cfg, source: str | None = None) -> None:
    """:func:`format_config` on stdout (a closed pipe, as with ``| head``, is not an error)."""
    try:
        print(format_config(cfg, source), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def absl_flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run``: ``--help`` / ``-h`` print usage and exit 0 (absl exits 1); a
    bad flag, a config file that does not load, an unknown ``--config.FIELD`` (with the closest field as a
    suggestion) or a value that does not parse is one line on stderr with exit code 1."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags  # noqa: PLC0415

        head, tail = (argv[:argv.index("--")], argv[argv.index("--"):]) if "--" in argv else (argv, [])
        head = [head[0]] + ["--help" if a == "-h" else a for a in head[1:]]
        asked = any(a in HELP_FLAGS for a in head[1:])
        try:
            rest = flags.FLAGS(head + tail)
        except flags.Error as e:
            if _is_unknown_config_flag(e) or _is_bad_value(e):
                _fail(prog, config_error_message(e, head))
            _fail(prog, f"{_first_line(e)} (see --help)")
        except SystemExit as e:  # absl's help flags print the usage, then exit 1
            if asked and e.code == 1:
                sys.exit(0)
            raise
        except BrokenPipeError:  # usage piped into a closed reader (| head)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0 if asked else 1)
        except CONFIG_ERRORS as e:  # config file / override
            _fail(prog, config_error_message(e, head))
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            from m3ddm_jax.errors import ConfigError  # noqa: PLC0415

            try:  # a config file that does not load (missing, syntax error) reports here, before main
                checked_config(flags.FLAGS["config"].value)
            except ConfigError as e:
                _fail(prog, str(e))
        return rest

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
