"""Reading a recipe file: UTF-8 YAML through a bounded safe loader, with one-line errors.

PyYAML's safe loader (no Python tags), made stricter (`RecipeLoader`): a key set twice in one mapping
is an error, `3e-3` is a float as in YAML 1.2 (YAML 1.1 reads it as a string), and a recipe whose
aliases expand past MAX_RECIPE_NODES values, or that nests deeper than MAX_RECIPE_DEPTH, is refused
(the "billion laughs"). Values shown in messages, and the messages themselves, are bounded.
"""
from __future__ import annotations

import re
import reprlib
from pathlib import Path

import yaml

from longtrain.trainer.errors import LongtrainError

MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000  # values after alias expansion; a recipe holds a few hundred
MAX_RECIPE_DEPTH = 32  # nesting of mappings and lists; a recipe nests 4 deep (model.ode.solver)
MAX_MESSAGE_CHARS = 600

# YAML 1.2 floats without a dot (3e-3, 1E5): PyYAML's YAML 1.1 resolver reads them as strings.
FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags) that also refuses a key set twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then explicit keys: overriding the merged ones is the point of a merge
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable: the base class refuses it
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {short(key)} is set twice in one mapping (first on line {first}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class RecipeDumper(yaml.SafeDumper):
    """Writes what RecipeLoader reads back unchanged (quotes a string such as '1e5')."""


for _cls in (RecipeLoader, RecipeDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_1_2, list("-+0123456789."))


def parse_yaml(text: str, where: str):
    """YAML text -> plain values; LongtrainError (one line, naming `where` and the line) when it is not
    valid YAML, nests too deeply, or expands past MAX_RECIPE_NODES values through aliases."""
    try:
        value = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise LongtrainError(bounded(f"{where}:{line} is not valid YAML: {problem}")) from None
    except RecursionError:
        raise LongtrainError(f"{where}: nested too deeply to read (more than {MAX_RECIPE_DEPTH} levels of mappings "
                             "and lists; a recipe nests about 4)") from None
    _check_expanded_size(value, where)
    return value


def _check_expanded_size(value, where: str) -> None:
    """Count values as if every alias were copied, visiting each shared mapping or list once (linear in the
    document, not in its expansion); refuse recursive aliases, deep nesting and large expansions."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def count(node, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in visiting:
            raise LongtrainError(f"{where}: an alias (*name) refers to a mapping or list that contains it")
        if depth >= MAX_RECIPE_DEPTH:
            raise LongtrainError(f"{where}: nested more than {MAX_RECIPE_DEPTH} levels of mappings and lists deep; "
                                 "a recipe nests about 4 (model.ode.solver)")
        visiting.add(id(node))
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1 + sum(count(child, depth + 1) for child in children)
        visiting.discard(id(node))
        if total > MAX_RECIPE_NODES:
            raise LongtrainError(f"{where}: holds more than {MAX_RECIPE_NODES:,} values once its aliases (*name) are "
                                 "expanded; a recipe holds a few hundred (nested aliases multiply: 'billion laughs')")
        sizes[id(node)] = total
        return total

    count(value, 0)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 120
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 8
_repr.maxlevel = 3


def short(value) -> str:
    """repr of a user's value, bounded (a recipe value can be megabytes, or a shared structure)."""
    text = _repr.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def bounded(message: str) -> str:
    message = " ".join(message.splitlines())
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."


def read_recipe_file(path: Path) -> dict:
    """The mapping in a recipe file; LongtrainError in one line when it is missing, not UTF-8 text, not
    valid (bounded) YAML, empty, or not a mapping."""
    if path.is_dir():
        raise LongtrainError(f"recipe {str(path)!r} is a directory; give a YAML file")
    if not path.is_file():
        raise LongtrainError(f"recipe file {str(path)!r} not found")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise LongtrainError(f"{path}: {size:,} bytes is too large for a recipe (a few kB of YAML; at most "
                                 f"{MAX_RECIPE_BYTES:,})")
        data = path.read_bytes()
    except OSError as e:
        raise LongtrainError(f"recipe {str(path)!r} cannot be read: {e.strerror or e}") from None
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LongtrainError(f"{path} is not a text file (byte {e.start}: {e.reason}); a recipe is UTF-8 YAML "
                             "text") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        # An empty file is more likely a mistake (a truncated copy, the wrong file) than a wish for defaults.
        raise LongtrainError(f"{path} is empty: write the settings to change, or `{{}}` to train every default")
    if not isinstance(raw, dict):
        raise LongtrainError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    return raw
