"""docs/configuration.md, generated from the sections' dataclasses and their line comments."""
from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import typing

from pipeline.config.sections import PipelineConfig


def _field_docs(cls) -> dict[str, str]:
    """{field: its one-line doc}: the comment on the field's line (the comments above a field
    say why, for readers of the code). The comments in this file are the documentation."""
    docs = {}
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = re.match(r"\s*(\w+): [^=]+=[^#]*(#\s*(.*))?$", line)
        if m:
            docs[m.group(1)] = (m.group(3) or "").strip()
    return docs


def _shown(value) -> str:
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(map(str, value)) + "]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def markdown() -> str:
    """docs/configuration.md: every key with its default and meaning, from the dataclasses."""
    out = ["# Configuration", "",
           "Every key of the pipeline's config, with its default. A job reads a YAML preset "
           "(`--config`) and `--set section.key=value` overrides; unknown keys and wrong types "
           "are errors. Modes list their choices. Generated from `pipeline/config/sections.py` by "
           "`python -m pipeline.config --markdown > docs/configuration.md`; a test fails when "
           "this page is stale. Which keys make which stages rerun: "
           "[operations.md](operations.md).", ""]
    for section in dataclasses.fields(PipelineConfig):
        cls = typing.get_type_hints(PipelineConfig)[section.name]
        docs, defaults = _field_docs(cls), cls()
        out += [f"## {section.name}", "", "| key | default | meaning |", "|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            doc = docs.get(f.name, "")
            typ = hints[f.name]
            if isinstance(typ, type) and issubclass(typ, enum.Enum):
                doc += " Choices: " + ", ".join(f"`{m.value}`" for m in typ) + "."
            out.append(f"| `{section.name}.{f.name}` | {_shown(getattr(defaults, f.name))} "
                       f"| {doc.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)
