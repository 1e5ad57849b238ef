"""Reading the YAML users write — specs and scenarios — strictly and safely.

One loader for every YAML document the project reads from a person: a safe loader
(no Python objects) that rejects what a plain ``yaml.safe_load`` accepts silently or
answers with a traceback:

* a key given twice in one mapping (``steps`` twice: the last would win unseen);
* an integer too long for Python to convert (more than 4,300 digits: ``ValueError``),
  or a hex, octal, binary or sexagesimal one of more than :data:`MAX_INT_CHARS`
  characters (they skip that check, and sexagesimal ones are built in quadratic time:
  900 kB took 30 s);
* merge keys (``<<``): PyYAML copies merged mappings before any check sees them, so a
  few lines of nested merges fill memory (nothing canaryd reads needs them);
* nesting deeper than the parser can recurse (``RecursionError``);
* a document larger than :data:`MAX_YAML_CHARS`.

Each becomes a :class:`YAMLInputError` whose message is one line naming the place.

It lives in ``simulator`` because the simulator may not import the controller, and
the controller (``canaryd.spec``) already builds on the simulator.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

MAX_YAML_CHARS = 4 * 1024 * 1024
"""Longest document read: a Kubernetes object is at most 1.5 MiB, a scenario far less."""


MAX_INT_CHARS = 100
"""Longest hex, octal, binary or sexagesimal integer read, in characters."""


class YAMLInputError(ValueError):
    """A YAML document that cannot be read; the message is one line."""


class StrictLoader(yaml.SafeLoader):
    """Safe YAML loader that rejects duplicate mapping keys instead of keeping the last,
    merge keys, and integers longer than :data:`MAX_INT_CHARS` characters."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "found a merge key ('<<'), which is not supported: write the keys out",
                    key_node.start_mark,
                )


class _TooLongError(ValueError):
    """An integer scalar longer than MAX_INT_CHARS (raised through PyYAML)."""


def _construct_bounded_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    decimal = node.value.lstrip("+-").replace("_", "").isdigit()
    if not decimal and len(node.value) > MAX_INT_CHARS:  # decimal: Python's 4,300 digits
        raise _TooLongError(
            f"line {node.start_mark.line + 1}: the document holds a number too long to "
            f"read ({len(node.value):,} characters; at most {MAX_INT_CHARS})"
        )
    return int(loader.construct_yaml_int(node))


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {_short(key)}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)
StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_bounded_int)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 40, 40, 40


def short_repr(value: object, limit: int = 60) -> str:
    """``repr`` bounded in time and length, whatever ``value`` is (an alias bomb of 9**9
    strings included), on one line."""
    text = one_line(_REPR.repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


_short = short_repr


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``,
    ``\\u2028``, lone surrogates), so that a message stays one line and can be written."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a PyYAML error: what is wrong and where."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        detail = exc.problem or "invalid YAML"
        if exc.context:
            detail += f" ({exc.context}"
            if exc.context_mark is not None and exc.context_mark.line != mark.line:
                detail += f" started at line {exc.context_mark.line + 1}"
            detail += ")"
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {detail}"
    return "YAML syntax error: " + " ".join(str(exc).split())


def load_yaml(text: str) -> Any:
    """The one document in ``text``, read with :class:`StrictLoader`.

    Raises:
        YAMLInputError: the document is not valid YAML, repeats a key, holds a number
            too long to read, nests too deeply or is too large.
    """
    if len(text) > MAX_YAML_CHARS:
        raise YAMLInputError(
            f"the document is {len(text):,} characters long; at most {MAX_YAML_CHARS:,} are read"
        )
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as exc:
        raise YAMLInputError(yaml_problem(exc)) from None
    except _TooLongError as exc:
        raise YAMLInputError(str(exc)) from None
    except RecursionError:
        raise YAMLInputError("the document nests mappings or lists too deeply to read") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # more than sys.get_int_max_str_digits()
            raise YAMLInputError(
                "the document holds a number too long to read (over 4,300 digits)"
            ) from None
        raise YAMLInputError(f"the document holds a value that cannot be read: {exc}") from None
