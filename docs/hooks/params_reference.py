"""MkDocs hook: the configuration reference, generated from params.yaml at build time.

`docs/configuration.md` holds the placeholder `<!-- params-reference -->`; on every build this hook
replaces it with one section per top-level key of `params.yaml` and one table row per key path
(dotted, e.g. `gate.min_kept_fraction`): its default value as written, and the comment text attached
to it. So the reference cannot drift from the file: it is the file.

Comments are attached by a line-based reading of params.yaml's indentation:

- comment lines directly above a key (no blank line between) belong to that key;
- a key's trailing comment belongs to it, and so do the comment-only lines right after it that
  continue it (indented to the trailing comment's column or deeper; for a key with a value on its
  line, indented deeper than the key);
- a comment block followed by a blank line is a note on the enclosing section (the file's header
  is the note of the whole file);
- a flow value that spans lines (`{...}` or `[...]`) is one value, with the comments of all its lines.

The values themselves are parsed by PyYAML, key by key, and checked against `yaml.safe_load` of the
whole file: a key the line reader missed, or read wrong, fails the build instead of leaving a hole.
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mkdocs.exceptions import PluginError

PAGE = "configuration.md"
PLACEHOLDER = "<!-- params-reference -->"
PARAMS = "params.yaml"

_KEY = re.compile(r"""^(?P<key>"[^"]*"|'[^']*'|[^\s#'"{\[\]},&*!|>%@`-][^:]*?|-[^\s:][^:]*?)\s*:(?:\s+(?P<value>.*))?$""")
_params_path: Path | None = None


@dataclass
class Entry:
    path: tuple[Any, ...]          # the keys, as YAML reads them
    names: tuple[str, ...]         # the keys, as written
    line: int                      # 1-based line of the key
    indent: int
    raw: str = ""                  # the value as written (a multi-line flow value joined); "" for a section
    above: list[str] = field(default_factory=list)
    trailing: list[str] = field(default_factory=list)
    trailing_col: int | None = None
    section: bool = False          # a block mapping: its keys are entries of their own
    block_lines: list[str] = field(default_factory=list)  # a block sequence or literal value's lines
    notes: list[str] = field(default_factory=list)         # detached comment blocks inside a section

    @property
    def dotted(self) -> str:
        return ".".join(self.names)

    def comment(self) -> tuple[str, str]:
        """(the comment lines above the key, its trailing comment with its continuation lines)."""
        return " ".join(self.above), " ".join(self.trailing)


def _split_comment(text: str) -> tuple[str, str | None, int | None]:
    """Split a line into its code and its trailing comment (quote-aware): (code, comment, column)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'" and (i == 0 or not (text[i - 1].isalnum())):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1:].strip(), i
    return text.rstrip(), None, None


def _brackets(code: str) -> int:
    """Open minus closed flow brackets in code, ignoring quoted text."""
    depth, quote = 0, None
    for ch in code:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


def _fail(path: Path, line: int, message: str) -> PluginError:
    return PluginError(f"params reference: {path}:{line}: {message}")


def parse(path: Path) -> tuple[list[str], list[Entry]]:
    """Read params.yaml line by line: (the file's own notes, every entry in file order)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    root = Entry(path=(), names=(), line=0, indent=-1, section=True)
    entries: list[Entry] = []
    stack: list[Entry] = [root]        # open sections, innermost last
    pending: list[str] = []            # comment lines waiting for the key below them
    pending_indent = 0
    owner: Entry | None = None         # the entry whose trailing comment the next comment line may continue

    def indent_of(text: str) -> int:
        return len(text) - len(text.lstrip(" "))

    def detach() -> None:
        """A comment block followed by a blank line: a note on the section it is indented into."""
        nonlocal pending
        if pending:
            host = next(s for s in reversed(stack) if s.indent < pending_indent)
            host.notes.append(" ".join(pending))
            pending = []

    i = 0
    while i < len(lines):
        text = lines[i]
        number = i + 1
        i += 1
        stripped = text.strip()
        if "\t" in text[: len(text) - len(text.lstrip())]:
            raise _fail(path, number, "a tab in the indentation")
        if not stripped:
            detach()
            owner = None
            continue
        if stripped in ("---", "..."):
            continue
        indent = indent_of(text)
        if stripped.startswith("#"):
            comment = stripped[1:].strip()
            continuation = owner is not None and bool(owner.trailing) and (
                (owner.trailing_col is not None and indent >= owner.trailing_col)
                or (not owner.section and indent > owner.indent))
            if continuation:
                owner.trailing.append(comment)
            else:
                owner = None
                if not pending:
                    pending_indent = indent
                pending.append(comment)
            continue
        code, comment, column = _split_comment(text)
        match = _KEY.match(code.strip())
        if not match:
            raise _fail(path, number, f"cannot read {stripped!r} as `key: value` (the reference generator "
                                      "reads one key per line; flow values and block sequences may span lines)")
        while stack[-1].indent >= indent:
            stack.pop()
        parent = stack[-1]
        key_text = match.group("key")
        key = yaml.safe_load(key_text)
        name = key_text[1:-1] if key_text[:1] in "\"'" else key_text
        entry = Entry(path=parent.path + (key,), names=parent.names + (name,), line=number,
                      indent=indent, above=pending)
        pending = []
        if comment is not None:
            entry.trailing, entry.trailing_col = [comment], column
        value = (match.group("value") or "").strip()
        if value and value[:1] not in "|>":
            parts = [value]
            depth = _brackets(value)
            while depth > 0:                 # a flow value that spans lines
                if i >= len(lines):
                    raise _fail(path, number, "unclosed flow value")
                more_code, more_comment, more_col = _split_comment(lines[i])
                i += 1
                parts.append(more_code.strip())
                depth += _brackets(more_code)
                if more_comment is not None:
                    entry.trailing.append(more_comment)
                    entry.trailing_col = more_col
            entry.raw = " ".join(p for p in parts if p)
        else:
            entry.raw = value                # "" or a block scalar's indicator
            nxt = next((ln for ln in lines[i:] if ln.strip() and not ln.strip().startswith("#")), "")
            item = nxt.strip().startswith("- ") or nxt.strip() == "-"
            if value or (nxt and item and indent_of(nxt) >= indent):
                # a block scalar or a block sequence: its lines are the value
                while i < len(lines):
                    ln = lines[i]
                    ls = ln.strip()
                    deeper = indent_of(ln) > indent
                    same_item = indent_of(ln) == indent and (ls.startswith("- ") or ls == "-") and not value
                    if ls and not (deeper or same_item):
                        break
                    if ls.startswith("#") and not value:
                        entry.trailing.append(ls[1:].strip())
                    else:
                        entry.block_lines.append(ln)
                        item_comment = None if value else _split_comment(ln)[1]
                        if item_comment:
                            entry.trailing.append(item_comment)
                    i += 1
                while entry.block_lines and not entry.block_lines[-1].strip():
                    entry.block_lines.pop()
            elif nxt and indent_of(nxt) > indent:
                entry.section = True
                stack.append(entry)
            # else: an empty value (null)
        entries.append(entry)
        owner = entry
    detach()
    return root.notes, entries


def _value(entry: Entry) -> Any:
    if entry.block_lines:
        text = "\n".join(entry.block_lines) + "\n"
        if entry.raw[:1] in "|>":
            text = "x: " + entry.raw + "\n" + text
            return yaml.safe_load(text)["x"]
        return yaml.safe_load(text)
    return yaml.safe_load("x: " + entry.raw)["x"] if entry.raw else None


def _shown(entry: Entry) -> str:
    if entry.block_lines:
        value = _value(entry)
        if isinstance(value, str):
            return json.dumps(value, ensure_ascii=False)
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return entry.raw or "null"


def check(path: Path, entries: list[Entry]) -> None:
    """Every key path of the parsed file is an entry, with the value PyYAML reads for it."""
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    by_path = {e.path: e for e in entries}

    def walk(node: dict, prefix: tuple) -> None:
        for key, value in node.items():
            here = prefix + (key,)
            entry = by_path.get(here)
            if entry is None:
                raise PluginError(f"params reference: {path}: the key {'.'.join(map(str, here))} was not "
                                  "read by the line reader")
            if entry.section:
                if not isinstance(value, dict):
                    raise _fail(path, entry.line, f"{entry.dotted} read as a section, but it is not a mapping")
                walk(value, here)
            else:
                try:
                    read = _value(entry)
                except yaml.YAMLError as exc:
                    raise _fail(path, entry.line, f"{entry.dotted}: cannot read its value alone ({exc})") from exc
                if read != value:
                    raise _fail(path, entry.line, f"{entry.dotted}: read {read!r}, PyYAML reads {value!r}")

    if not isinstance(tree, dict):
        raise PluginError(f"params reference: {path}: not a mapping")
    walk(tree, ())
    if len(by_path) != len(entries):
        raise PluginError(f"params reference: {path}: a key appears twice")
    for entry in entries:
        node: Any = tree
        for key in entry.path:
            if not isinstance(node, dict) or key not in node:
                raise _fail(path, entry.line, f"{entry.dotted} is not a key of the parsed file")
            node = node[key]


def _md(text: str) -> str:
    """Comment text for a table cell: code spans kept, everything else escaped."""
    out = []
    for k, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if k % 2:
            out.append(part.replace("|", "\\|"))
        else:
            part = html.escape(part, quote=False)
            out.append(re.sub(r"([\\*_\[\]|])", r"\\\1", part))
    return "".join(out)


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _cell(entry: Entry, sep: str = "<br>") -> str:
    return sep.join(_md(part) for part in entry.comment() if part)


def render(path: Path) -> str:
    notes, entries = parse(path)
    check(path, entries)
    out = [f"*Generated from `{PARAMS}` at build time ({len(entries)} key paths): each with its "
           "default and the comment beside or above it in the file.*", ""]
    out += [_md(n) + "\n" for n in notes]
    tops = [e for e in entries if len(e.path) == 1]
    for top in tops:
        out += [f"## `{top.dotted}`", ""]
        if top.section and _cell(top):
            out += [_cell(top, "\n\n"), ""]
        out += [_md(n) + "\n" for n in top.notes]
        rows = [e for e in entries if e.path[:1] == top.path and (len(e.path) > 1 or not top.section)]
        if not rows:
            continue
        out += ["| key | default | what it is |", "| :--- | :--- | :--- |"]
        for e in rows:
            note = _cell(e, "<br>")
            if e.section and e.notes:
                note = "<br>".join(filter(None, [note] + [_md(n) for n in e.notes]))
            default = "*(section)*" if e.section else _code(_shown(e))
            out.append(f"| {_code(e.dotted)} | {default} | {note} |")
        out.append("")
    return "\n".join(out)


def on_config(config, **kwargs):
    global _params_path
    _params_path = Path(config.config_file_path).resolve().parent / PARAMS
    if not _params_path.is_file():
        raise PluginError(f"params reference: {_params_path} not found")
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if PLACEHOLDER not in markdown:
        raise PluginError(f"params reference: {PAGE} has no {PLACEHOLDER} placeholder")
    return markdown.replace(PLACEHOLDER, render(_params_path))
