"""Where every command line of llava_lit finds its configs, and the `--help` that lists their settings.

The config tree (`conf/` at the repository root) ships inside the package as `llava_lit.conf`
(`src/llava_lit/conf` links to it; the wheel copies it in), so an installed package finds it without a
checkout: entry points are declared with `hydra_app(name)` (Hydra's `pkg://llava_lit.conf`), and code that
composes a config by hand uses `compose_config` or `config_dir()`. A config folder of one's own joins the search
path with `hydra.searchpath=[file:///path/to/my_conf]` (its files then override or add to the shipped ones).

`--help` renders every setting of the composed config (the overrides given with it applied), each with its
one-line doc: the comment after the key in the yaml that sets it (or the comment lines right above the key), else
the docstring of the matching dataclass field (`schemas`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "llava_lit.conf"
"""The Python package holding the config tree."""
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
"""The config tree as Hydra's `config_path` names it."""
HELP_RESOLVER = "llava_lit.help"
"""The OmegaConf resolver `conf/hydra/help/settings.yaml` renders `--help` with."""

_SCHEMAS: dict[str, Mapping[str, type]] = {}
"""Per config name, the dataclasses whose field docstrings document its keys (`hydra_app(schemas=...)`)."""


def config_dir() -> Path:
    """The config tree on disk (inside the installed package, or the checkout's `conf/` for an editable one)."""
    import llava_lit.conf

    return Path(llava_lit.conf.__file__).resolve().parent


def hydra_app(
    config_name: str, schemas: Mapping[str, type] | None = None
) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """`@hydra.main` over the packaged config tree, with `schemas` documenting settings in `--help`.

    `schemas` maps a key prefix (`""` for the root) to the dataclass whose field docstrings document the keys
    under it (nested dataclass fields are followed). The decorated function runs the command line when called
    without arguments, and returns its result when called with a composed config (`compose_config(name, ...)`).
    """
    _SCHEMAS[config_name] = dict(schemas or {})
    return hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)


def compose_config(config_name: str, overrides: Sequence[str] = (), **kwargs: Any) -> DictConfig:
    """`config_name` composed from the packaged tree with `overrides` (`kwargs` go to `hydra.compose`, e.g.
    `return_hydra_config=True`), as the entry point declared with `hydra_app(config_name)` would compose it."""
    with hydra.initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra.compose(config_name, overrides=list(overrides), **kwargs)


# --------------------------------------------------------------------------------------------- --help

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")
"""A yaml mapping line `key: value  # comment` (block style, as the config tree writes it)."""
_PACKAGE_HEADER = re.compile(r"^#\s*@package\s+(?P<package>\S+)")


def _comment_start(rest: str) -> int | None:
    """Where the `# comment` after a yaml value starts (a `#` after whitespace, outside quotes), or None."""
    quote = None
    for i, char in enumerate(rest):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or rest[i - 1] in " \t"):
            return i
    return None


def yaml_key_docs(path: Path, package: str = "") -> dict[str, str]:
    """`{dotted key: doc}` for the keys of one config file, under `package` (its group's package).

    A key's doc is its trailing comment (continued by comment-only lines aligned under it), else the block of
    comment lines right above it. A `# @package _global_` header puts the keys at the root.
    """
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    above: list[str] = []  # comment lines right above the current line
    last: tuple[str, int] | None = None  # the key whose trailing comment the next comment lines may continue
    seen_key = False
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            header = _PACKAGE_HEADER.match(stripped)
            if header:
                package = "" if header["package"] == "_global_" else header["package"]
                continue
            text = stripped[1:].strip()
            if last is not None and line.index("#") == last[1]:
                docs[last[0]] += " " + text
            else:
                last = None
                above.append(text)
            continue
        last = None
        match = _KEY_LINE.match(line)
        if not match:
            above = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([p for p in (package, *(k for _, k in stack), match["key"]) if p])
        start = _comment_start(match["rest"])
        if start is not None:
            docs[key] = match["rest"][start + 1 :].strip()
            last = (key, len(line) - len(match["rest"]) + start)
        elif above and seen_key:  # the comments above the first key describe the file, not the key
            docs[key] = " ".join(above)
        above = []
        seen_key = True
        stack.append((indent, match["key"]))
    return docs


def dataclass_field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """`{dotted key: doc}` from the docstrings under a dataclass's fields, following dataclass-typed fields."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[prefix + node.target.id] = " ".join(following.value.value.split())
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        for kind in (hints.get(field.name), *typing.get_args(hints.get(field.name))):
            if dataclasses.is_dataclass(kind):
                docs.update(dataclass_field_docs(kind, f"{prefix}{field.name}."))  # type: ignore[arg-type]
    return docs


def _value_text(value: Any) -> str:
    """A config value as a command-line override writes it (`null`, `true`, `[0.9, 0.999]`, `{}`)."""
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str) and (value == "" or " " in value):
        return repr(value)
    return str(value)


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """`(dotted key, value as written)` for every leaf of a config container (values unresolved)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], _value_text(node)


def settings_docs(config_name: str, choices: Mapping[str, Any]) -> dict[str, str]:
    """Docs of the settings of `config_name` with the group `choices` Hydra made: dataclass docstrings, then
    the comments of the primary file and of each chosen group file (later ones win, as their values do)."""
    docs: dict[str, str] = {}
    for prefix, cls in _SCHEMAS.get(config_name, {}).items():
        docs.update(dataclass_field_docs(cls, f"{prefix}." if prefix else ""))
    root = config_dir()
    docs.update(yaml_key_docs(root / f"{config_name}.yaml"))
    for group, choice in choices.items():
        path = root / group / f"{choice}.yaml"
        if choice is None or group.startswith("hydra") or not path.is_file():
            continue
        docs.update(yaml_key_docs(path, package=group.replace("/", ".")))
    return docs


def render_settings_help(root: DictConfig) -> str:
    """The `--help` text of the composed config `root` (with its `hydra` node): usage, the config groups it
    chose from, every setting with its value and doc, and Hydra's flags."""
    config_name = root.hydra.job.config_name
    choices = {
        group: choice
        for group, choice in OmegaConf.to_container(root.hydra.runtime.choices).items()  # type: ignore[union-attr]
        if not group.startswith("hydra")
    }
    docs = settings_docs(config_name, choices)
    settings = OmegaConf.to_container(root, resolve=False)
    settings.pop("hydra", None)  # type: ignore[union-attr]
    lines = [
        f"python -m llava_lit.{config_name} [KEY=VALUE ...]" + (" [GROUP=CHOICE ...]" if choices else "")
    ]
    if choices:
        lines += ["", "== Config groups (GROUP=CHOICE as composed, then every choice of the group) =="]
        for group, choice in sorted(choices.items()):
            options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
            if options:  # an optional group without files here (`local`) is left out
                lines.append(f"  {group}={_value_text(choice)}  ({', '.join(options)})")
    lines += ["", "== Settings (KEY=VALUE, as composed with the overrides given) =="]
    for key, value in _flatten(settings):
        lines.append(f"  {key}={value}")
        if key in docs:
            lines.append(f"      {docs[key]}")
    lines += [
        "",
        f"Configs: {config_dir()} (add a folder of your own: hydra.searchpath=[file:///path/to/conf]).",
    ]
    text = "\n".join(lines).replace("$", "$$")  # the text goes through string.Template next
    return text + "\n\n== Flags ==\n$FLAGS_HELP"


def _help_resolver(*, _root_: DictConfig) -> str:
    """`${llava_lit.help:}`: the help text of the config it is resolved in."""
    return render_settings_help(_root_)


if not OmegaConf.has_resolver(HELP_RESOLVER):
    OmegaConf.register_new_resolver(HELP_RESOLVER, _help_resolver)
