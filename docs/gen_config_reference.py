"""The configuration reference (reference/config.md), generated from conf/ at every site build.

`render(conf_dir)` walks every config group (recursively), every option file and every key inside it,
and returns a Markdown page: per group a table of its option files, per file its `defaults:` list and
its keys with the default value and the key's comment (the inline one and the comment block right
above it) as the description. Keys are shown under the package Hydra puts them in (the group's path,
or what a `# @package` header says). Files of Hydra's own `hydra/` group are summarised below two
levels of nesting.

Run by mkdocs-gen-files (mkdocs.yml, `plugins: gen-files: scripts:`); `python docs/gen_config_reference.py`
prints the page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = re.compile(r"^#\s*@package\s+(\S+)")
KEY = re.compile(r"""^(?P<indent>\s*)(?P<key>"[^"]*"|'[^']*'|[^\s#'"\-][^:#]*?)\s*:(?:\s|$)(?P<rest>.*)$""")
LIST_ITEM = re.compile(r"^(?P<indent>\s*)-\s*(?P<item>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
HYDRA_DEPTH = 2  # keys of Hydra's own group are listed to this depth, deeper mappings by their keys


def _split_comment(text: str) -> tuple[str, str]:
    """(value part, comment) of the rest of a YAML line; a # inside quotes or ${...} is not a comment."""
    quote, depth = None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth <= 0 and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def _comments(path: Path) -> tuple[str, dict[str, str], dict[str, str]]:
    """The file's header comment, each key path's comment, and each defaults entry's comment."""
    header: list[str] = []
    keys: dict[str, str] = {}
    defaults: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings the current line is in
    pending: list[str] = []  # comment lines right above the next key
    last: str | None = None  # the key whose inline comment a deeper comment-only line continues
    last_indent = -1
    seen_key = False
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped:
            pending, last = [], None
            if not seen_key and header:
                seen_key = True  # a blank line ends the file's header comment
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if PACKAGE.match(stripped):
                continue
            if last is not None and indent > last_indent:
                keys[last] = f"{keys[last]} {text}".strip()
            elif not seen_key:
                header.append(text)
            else:
                pending.append(text)
            continue
        seen_key = True
        item = LIST_ITEM.match(line)
        if item and not KEY.match(line):
            if stack and stack[-1][1] == "defaults" and item.group("comment"):
                defaults[item.group("item").strip()] = item.group("comment").strip()
            pending, last = [], None
            continue
        match = KEY.match(line)
        if not match:
            pending, last = [], None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match.group("key").strip().strip("'\"")
        dotted = ".".join([k for _, k in stack] + [key])
        _, inline = _split_comment(match.group("rest"))
        text = " ".join(pending + ([inline] if inline else []))
        if text:
            keys[dotted] = text
        last, last_indent = (dotted if inline else None), indent
        stack.append((indent, key))
        pending = []
    return " ".join(header), keys, defaults


def _package(path: Path, conf_dir: Path) -> str:
    """The package a file's keys land in: its group path unless a `# @package` header says otherwise."""
    group = path.parent.relative_to(conf_dir).as_posix()
    group = "" if group == "." else group.replace("/", ".")
    for line in path.read_text().splitlines():
        match = PACKAGE.match(line.strip())
        if match:
            name = match.group(1)
            return {"_global_": "", "_group_": group}.get(name, name.replace("_group_", group))
        if line.strip() and not line.lstrip().startswith("#"):
            break
    return group


def leaf_keys(node, prefix: str = "", depth: int | None = None) -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a config file's content (``OmegaConf.to_container`` of it,
    interpolations unresolved), the top-level ``defaults`` list left out; with ``depth``, mappings
    deeper than that are leaves."""
    out: list[tuple[str, object]] = []
    for key, child in node.items():
        if not prefix and key == "defaults":
            continue
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(child, dict) and child and (depth is None or dotted.count(".") + 1 < depth):
            out.extend(leaf_keys(child, dotted, depth))
        else:
            out.append((dotted, child))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(value) -> str:
    if isinstance(value, dict) and value:
        return "mapping: " + ", ".join(f"`{k}`" for k in value)
    if isinstance(value, str):
        shown = value if value else '""'
    else:
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
        shown = "null" if value is None else shown.replace("True", "true").replace("False", "false")
    return f"`{_cell(shown)}`"


def _load(path: Path) -> dict:
    """A config file's content as plain containers, interpolations left as written."""
    content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return content if isinstance(content, dict) else {}


def _defaults_lines(entries, comments: dict[str, str]) -> list[str]:
    if not entries:
        return []
    rows = ["", "Defaults list (composed in this order):", "", "| entry | description |", "|---|---|"]
    for entry in entries:
        if isinstance(entry, dict):
            (key, value), *_ = entry.items()
            text = f"{key}: {'null' if value is None else value}"
        else:
            text = str(entry)
        note = next((c for k, c in comments.items() if k.replace(" ", "") == text.replace(" ", "")), "")
        rows.append(f"| `{_cell(text)}` | {_cell(note)} |")
    return rows


def _includes(files: list[Path], conf_dir: Path) -> dict[Path, list[tuple[Path, str]]]:
    """For each config file that another one's defaults list includes by path (``base/x@_here_``,
    ``gaussian``, ``/group/option``): the including files and the package each puts its keys in."""
    found: dict[Path, list[tuple[Path, str]]] = {}
    for includer in files:
        for entry in _load(includer).get("defaults") or []:
            if not isinstance(entry, str) or entry == "_self_":
                continue
            name, _, package = entry.partition("@")
            base = conf_dir if name.startswith("/") else includer.parent
            target = (base / f"{name.lstrip('/')}.yaml").resolve()
            if not target.is_file():
                continue
            here = _package(includer, conf_dir)
            if not package:
                package = _package(target, conf_dir)
            elif package == "_here_":
                package = here
            elif package.startswith("_global_"):
                package = package.removeprefix("_global_").lstrip(".")
            else:
                package = f"{here}.{package}" if here else package
            found.setdefault(target, []).append((includer, package))
    return found


def _title(path: Path, conf_dir: Path) -> str:
    group = path.parent.relative_to(conf_dir).as_posix()
    return path.name if group == "." else f"{group}={path.stem}"


def _file_section(path: Path, conf_dir: Path, title: str, included_by=()) -> list[str]:
    content = _load(path)
    header, comments, default_comments = _comments(path)
    package = included_by[0][1] if included_by else _package(path, conf_dir)
    hydra_group = path.parent.relative_to(conf_dir).parts[:1] == ("hydra",)
    group, _, stem = title.partition("=")
    anchor = f" {{#{_anchor(group, stem)}}}" if stem else ""  # attr_list: the group tables link here
    lines = [f"### `{title}`{anchor}", ""]
    if header:
        lines += [_cell(header), ""]
    lines.append(f"File `conf/{path.relative_to(conf_dir).as_posix()}`; package: `{package or '_global_'}`.")
    if included_by:
        names = ", ".join(f"`{_title(f, conf_dir)}`" for f, _ in included_by)
        lines.append(f"Its keys are part of {names} (through their defaults lists).")
    lines += _defaults_lines(content.get("defaults"), default_comments)
    leaves = leaf_keys(content, depth=HYDRA_DEPTH if hydra_group else None)
    if leaves:
        lines += ["", "| key | default | description |", "|---|---|---|"]
        shown_parents: set[str] = set()
        for dotted, value in leaves:
            parts = dotted.split(".")
            for i in range(1, len(parts)):  # a mapping's own comment, once, before its first key
                parent = ".".join(parts[:i])
                if parent not in shown_parents and comments.get(parent):
                    shown_parents.add(parent)
                    full = f"{package}.{parent}" if package else parent
                    lines.append(f"| `{_cell(full)}` | (mapping) | {_cell(comments[parent])} |")
            full = f"{package}.{dotted}" if package else dotted
            lines.append(f"| `{_cell(full)}` | {_value(value)} | {_cell(comments.get(dotted, ''))} |")
    return lines + [""]


def render(conf_dir: Path | str) -> str:
    """The configuration reference of every config file under conf_dir, as Markdown."""
    conf_dir = Path(conf_dir)
    files = sorted(conf_dir.rglob("*.yaml"))
    primary = [f for f in files if f.parent == conf_dir]
    groups: dict[str, list[Path]] = {}
    for f in files:
        if f.parent != conf_dir:
            groups.setdefault(f.parent.relative_to(conf_dir).as_posix(), []).append(f)
    out = [
        "# Configuration reference",
        "",
        "Generated from `conf/` when the site is built (`docs/gen_config_reference.py`): every config",
        "group, its options and every key with its default and the comment beside it in the file. Choose",
        "an option with `group=option` and set a key with `key=value` on the command line",
        "(e.g. `python train.py device=mrr zo.samples=50`).",
        "",
        "## Primary configs",
        "",
    ]
    included = _includes(files, conf_dir)
    for f in primary:
        out += _file_section(f, conf_dir, f.name, included.get(f.resolve(), ()))
    out += ["## Groups", "", "| group | options |", "|---|---|"]
    for group, members in groups.items():
        options = ", ".join(f"[`{m.stem}`](#{_anchor(group, m.stem)})" for m in members)
        out.append(f"| `{group}` | {options} |")
    out.append("")
    for group, members in groups.items():
        out += [f"## `{group}`", "", "| option | description |", "|---|---|"]
        for m in members:
            out.append(f"| `{m.stem}` | {_cell(_comments(m)[0])} |")
        out.append("")
        for m in members:
            out += _file_section(m, conf_dir, f"{group}={m.stem}", included.get(m.resolve(), ()))
    return "\n".join(out) + "\n"


def _anchor(group: str, stem: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{group}-{stem}".lower()).strip("-")


def main() -> None:
    import mkdocs_gen_files

    with mkdocs_gen_files.open("reference/config.md", "w") as f:
        f.write(render(ROOT / "conf"))


if __name__ == "<run_path>":  # mkdocs-gen-files runs the script with runpy.run_path
    main()
elif __name__ == "__main__":
    print(render(ROOT / "conf"), end="")
