"""One line for a config that does not parse: the file, the key, what was expected and the closest valid key.

jsonargparse reports a bad config as a nested message (a union's alternatives, the class it tried, the inner key);
`explain` reads the innermost problem out of it, finds the `--config` file (or the command-line option) that sets
the key, and the valid keys at that place from the parser and the config classes.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_OPTION = re.compile(r"Option '([^']+)' is not accepted")
_GROUP = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
_SUBCOMMAND = re.compile(r"Subcommand '[^']+' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"Unrecognized arguments: (.+)")
_EXPECTED = re.compile(r"Expected a (.+?)\. Got value: (.*)")
_CLASS_REPR = re.compile(r"<class '([^']+)'>")


@dataclasses.dataclass
class Problem:
    kind: str  # "unknown" (a key that does not exist) or "type" (a value of the wrong type)
    path: list[str]  # the key, as jsonargparse names it (subclass arguments without `init_args`)
    class_path: str | None = None  # the class whose arguments the last `class_path` segment opens
    class_at: int = 0  # index in `path` after which the class's arguments start
    expected: str = ""
    got: str = ""


def parse_message(message: str) -> Problem | None:
    """The innermost problem of a jsonargparse error message (None when it is none of the known forms)."""
    path: list[str] = []
    class_path, class_at = None, 0
    for line in message.splitlines():
        s = line.strip().lstrip("- ").strip()
        if m := _PARSER_KEY.match(s):
            path += m.group(1).split(".")
        elif m := _CLASS_PATH.match(s):
            class_path, class_at = m.group(1), len(path)
        elif m := _OPTION.match(s):
            return Problem("unknown", path + m.group(1).split("."), class_path, class_at)
        elif m := _GROUP.match(s):
            return Problem("unknown", path + m.group(1).split(".") + m.group(2).split("."), class_path, class_at)
        elif m := _SUBCOMMAND.match(s):
            return Problem("unknown", m.group(1).split("."))
        elif m := _UNRECOGNIZED.match(s):
            return Problem("unknown", m.group(1).split()[0].lstrip("-").split("=")[0].split("."))
        elif (m := _EXPECTED.match(s)) and "NoneType" not in m.group(1):
            expected = _CLASS_REPR.sub(lambda c: c.group(1).rpartition(".")[2], m.group(1))
            return Problem("type", path, class_path, class_at, expected, m.group(2))
    return None


# ------------------------------------------------------------------------------------------------ valid keys
def _class(tp: Any) -> Any:
    """The class inside Optional[...] / Union[..., None] (the first that has fields), else `tp`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None) and _fields(arg):
                return arg
    return tp


def _fields(tp: Any) -> dict[str, Any]:
    """name -> type of a dataclass's fields or a class's constructor arguments (empty for anything else)."""
    tp = _class(tp) if typing.get_origin(tp) is not None else tp
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(tp)}
    if inspect.isclass(tp) and tp.__module__.split(".")[0] not in ("builtins", "typing"):
        hints = _hints(tp.__init__)
        try:
            params = inspect.signature(tp.__init__).parameters
        except (TypeError, ValueError):
            return {}
        return {n: hints.get(n, Any) for n, p in params.items()
                if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return {}


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - unresolvable annotations: names only
        return {}


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def valid_keys(parser: Any, parent: list[str], class_path: str | None = None, class_at: int = 0) -> list[str]:
    """The keys that may follow `parent` (jsonargparse's naming) in this parser's config."""
    if class_path is not None and len(parent) >= class_at:
        fields = _fields(_import(class_path))
        rest = parent[class_at:]
    else:
        prefix = ".".join(parent)
        dests = [a.dest for a in getattr(parser, "_actions", []) if isinstance(getattr(a, "dest", None), str)]
        children = {d[len(prefix) + 1:].split(".")[0] if prefix else d.split(".")[0]
                    for d in dests if not prefix or d.startswith(prefix + ".")}
        children.discard("help")
        children.discard("config")
        action = next((a for a in getattr(parser, "_actions", []) if a.dest == prefix), None) if prefix else None
        if children or action is None:
            return sorted(c for c in children if c and c != "__default_config__")
        fields, rest = _fields(getattr(action, "_typehint", None)), []
    for name in rest:
        fields = _fields(fields.get(name)) if name in fields else {}
    return sorted(fields)


# ------------------------------------------------------------------------------------------------ sources
def config_files(argv: Sequence[str]) -> list[str]:
    """The `--config` / `-c` files of a command line, in order."""
    files, args = [], list(argv)
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def _lookup(data: Any, path: list[str]) -> bool:
    for name in path:
        if not isinstance(data, dict) or name not in data:
            return False
        data = data[name]
    return True


def _spellings(problem: Problem) -> list[list[str]]:
    """The key as a config file may spell it: subclass arguments with and without `init_args`."""
    p = problem.path
    if problem.class_path is None or dataclasses.is_dataclass(_import(problem.class_path)):
        return [p]
    return [p[:problem.class_at] + ["init_args"] + p[problem.class_at:], p]


def where(problem: Problem, argv: Sequence[str]) -> tuple[str, list[str]]:
    """(the file or 'the command line' that sets the key, the key as spelled there); later sources win."""
    spellings = _spellings(problem)
    found: tuple[str, list[str]] | None = None
    args = list(argv)
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args) or a.startswith("--config="):
            name = args[i + 1] if "=" not in a else a.split("=", 1)[1]
            try:
                data = yaml.safe_load(Path(name).read_text())
            except (OSError, yaml.YAMLError):
                continue
            for spelled in spellings:
                if _lookup(data, spelled):
                    found = (name, spelled)
                    break
        elif a.startswith("--") and a != "--config":
            key = a[2:].split("=", 1)[0].split(".")
            for spelled in spellings:
                if key == spelled or key[:len(spelled)] == spelled or spelled[:len(key)] == key:
                    found = ("the command line", spelled)
                    break
    return found or ("the config", spellings[0])


def unknown_top_level_key(argv: Sequence[str], parser: Any) -> str | None:
    """One line for a config file's top-level key the parser does not know. jsonargparse checks leaves only, so a
    misspelt section holding nothing but empty mappings (`modle: {prw: {}}`) would otherwise be dropped silently."""
    valid = valid_keys(parser, [])
    for file in config_files(argv):
        try:
            data = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError):
            continue  # jsonargparse reports unreadable files itself
        for key in data if isinstance(data, dict) else ():
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]}?" if close else "valid keys: " + ", ".join(valid[:12])
                return f"{file}: unknown key {key} ({hint})"
    return None


def explain(message: str, argv: Sequence[str], parser: Any) -> str:
    """One line for a jsonargparse error: `FILE: KEY ...` naming what was expected and the closest valid key."""
    problem = parse_message(message)
    if problem is None or not problem.path:
        first = next((s.strip() for s in message.splitlines() if s.strip()), message)
        return f"{first} (see --help for the options)"
    source, spelled = where(problem, argv)
    key = ".".join(spelled)
    if problem.kind == "type":
        return f"{source}: {key} expects {problem.expected}, got {problem.got!r}"
    # the first segment that is not a key at its place (`modle.x`: `modle`)
    bad, candidates = len(problem.path) - 1, []
    for i in range(len(problem.path)):
        keys = valid_keys(parser, problem.path[:i], problem.class_path, problem.class_at)
        if keys and problem.path[i] not in keys:
            bad, candidates = i, keys
            break
    else:
        candidates = valid_keys(parser, problem.path[:-1], problem.class_path, problem.class_at)
    shift = len(spelled) - len(problem.path)  # `init_args` in the spelled key
    cut = bad + (shift if problem.class_path is not None and bad >= problem.class_at else 0)
    spelled = spelled[:cut + 1]
    key = ".".join(spelled)
    close = difflib.get_close_matches(problem.path[bad], candidates, n=1, cutoff=0.5)
    prefix = ".".join(spelled[:-1])
    if close:
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    elif candidates:
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        hint = f"valid keys{' of ' + prefix if prefix else ''}: {shown}"
    else:
        hint = "see --help for the options"
    return f"{source}: unknown key {key} ({hint})"
