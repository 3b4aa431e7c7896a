"""argparse flags generated from a stage's config dataclass, so flags cannot drift from fields.

Each field becomes ``--kebab-name`` (dest = the field name, default None so that only flags the
user gave override the YAML).  The flag's type comes from the annotation: ``int``/``float``/
``str`` (also ``X | None``); ``bool`` as ``--name`` / ``--no-name``; ``list[X]`` repeatable;
a fixed ``tuple[X, X]`` as that many values.  Mappings and nested dataclass sections are YAML
only.  Choices come from the field's ``metadata={"choices": MODULE_CONSTANT}`` or from the
``choices`` argument (for configs defined elsewhere), never copied by hand.  Help comes from
``metadata={"help": ...}``, else the field's trailing comment, else a ``name: text`` entry of the
class docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import tokenize
import types
import typing
from typing import Any, Iterable

_DOC_ENTRY = re.compile(r"^([`\w][`\w /]*?):\s+(.*)$")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _comments(cls: type, names: set[str]) -> dict[str, str]:
    """Trailing ``# comment`` of each ``name: type = default`` line of the class body."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # classes built at run time have no source
        return {}
    by_line: dict[int, list[tokenize.TokenInfo]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            by_line.setdefault(tok.start[0], []).append(tok)
    out = {}
    for toks in by_line.values():
        if (len(toks) > 2 and toks[0].string in names and toks[1].string == ":"
                and toks[-1].type == tokenize.COMMENT):
            out[toks[0].string] = toks[-1].string.lstrip("#").strip()
    return out


def _docstring(cls: type, names: set[str]) -> dict[str, str]:
    """``name: text`` (or ``a/b: text``) entries of the class docstring, continuation lines
    (indented) joined."""
    out: dict[str, str] = {}
    current: list[str] = []
    for line in (inspect.getdoc(cls) or "").splitlines():
        m = _DOC_ENTRY.match(line)
        keys = [k.strip(" `") for k in m.group(1).split("/")] if m else []
        if keys and all(k in names for k in keys):
            current = keys
            for k in keys:
                out[k] = m.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            for k in current:
                out[k] += " " + line.strip()
        else:
            current = []
    return out


def field_help(cls: type) -> dict[str, str]:
    names = {f.name for f in dataclasses.fields(cls)}
    out = {**_docstring(cls, names), **_comments(cls, names)}
    out.update({f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata})
    return out


def _kind(tp: Any) -> dict[str, Any] | None:
    """argparse keyword arguments for a field annotation; None = not a flag (YAML only)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _kind(inner[0]) if len(inner) == 1 else None
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    if origin is list and args and args[0] in (int, float, str):
        return {"action": "append", "type": args[0]}
    if origin is tuple and args and Ellipsis not in args and len(set(args)) == 1 \
            and args[0] in (int, float, str):
        return {"nargs": len(args), "type": args[0]}
    return None


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = (),
              help: dict[str, str] | None = None, choices: dict[str, Iterable] | None = None,
              aliases: dict[str, str] | None = None) -> list[str]:
    """Add a flag for every field of ``cls`` (but ``skip``); returns the dests added.

    ``help`` replaces a field's generated help; ``aliases`` adds another spelling of a flag
    (e.g. the singular ``--eval-set`` for the repeatable ``eval_sets``)."""
    hints = typing.get_type_hints(cls)
    texts = {**field_help(cls), **(help or {})}
    added = []
    for f in dataclasses.fields(cls):
        kw = _kind(hints[f.name])
        if f.name in set(skip) or kw is None:
            continue
        allowed = (choices or {}).get(f.name, f.metadata.get("choices"))
        if allowed is not None:
            kw["choices"] = list(allowed)
        names = [flag(f.name)] + ([aliases[f.name]] if aliases and f.name in aliases else [])
        text = texts.get(f.name, "")
        if (f.default is not dataclasses.MISSING and f.default not in (None, "")
                and "default" not in text):
            text = f"{text} (default: {f.default})".strip()
        parser.add_argument(*names, dest=f.name, default=None, help=text.replace("%", "%%"), **kw)
        added.append(f.name)
    return added


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls``'s fields that the user gave (for ``config.load``'s overrides)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
