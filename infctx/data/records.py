"""Record formats: how one JSON object / dataset row becomes a document of text segments with loss flags.

A document is a list of (text, trained) pairs; `trained` is False for prompt-like parts whose tokens the SFT loss
must skip. Plain pretraining text is a single trained segment.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

# Bad-input classes, reported with file:line (stable names used in summaries and tests).
BAD_JSON = "malformed JSON"
MISSING_KEY = "missing key"
NOT_STRING = "non-string field"
BAD_UTF8 = "invalid UTF-8"
EMPTY = "empty document"


class BadRecord(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class ChatTemplate:
    """Each message renders as prefix[role] + content + suffix; messages of `trained_roles` count in the loss
    (their content and suffix; the role prefix is prompt). Defaults follow the RWKV World chat convention."""

    prefix: dict[str, str] = field(default_factory=lambda: {
        "system": "System: ", "user": "User: ", "assistant": "Assistant: "})
    suffix: str = "\n\n"
    trained_roles: list[str] = field(default_factory=lambda: ["assistant"])


@dataclass
class RecordFormat:
    """kind: text | prompt_completion | chat | template.
    template: str.format-style text with {column} fields (prompt part for SFT when completion_template is set)."""

    kind: str = "text"
    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    chat: ChatTemplate = field(default_factory=ChatTemplate)
    template: str | None = None
    completion_template: str | None = None

    KINDS = ("text", "prompt_completion", "chat", "template")

    def __post_init__(self) -> None:
        if isinstance(self.chat, dict):
            self.chat = ChatTemplate(**self.chat)
        if self.kind not in self.KINDS:
            raise ValueError(f"format.kind must be one of {', '.join(self.KINDS)} (got {self.kind!r})")
        if self.kind == "template" and not self.template:
            raise ValueError("format.kind 'template' needs format.template, e.g. 'Q: {question}\\nA: {answer}'")

    @property
    def has_mask(self) -> bool:
        """Whether documents carry prompt parts, i.e. the build writes a loss-mask sidecar."""
        return self.kind in ("prompt_completion", "chat") or (self.kind == "template" and bool(self.completion_template))

    def segments(self, record: Any) -> list[tuple[str, bool]]:
        if not isinstance(record, dict):
            raise BadRecord(BAD_JSON, f"expected a JSON object, got {type(record).__name__}")
        if self.kind == "text":
            segs = [(_field(record, self.text_key), True)]
        elif self.kind == "prompt_completion":
            segs = [(_field(record, self.prompt_key), False), (_field(record, self.completion_key), True)]
        elif self.kind == "chat":
            segs = self._chat(record)
        else:
            segs = [(_render(self.template, record), not self.completion_template)]
            if self.completion_template:
                segs.append((_render(self.completion_template, record), True))
        if not any(text.strip() for text, _ in segs):
            raise BadRecord(EMPTY, "no text (only whitespace)")
        return [(t, m) for t, m in segs if t]

    def _chat(self, record: dict) -> list[tuple[str, bool]]:
        messages = record.get(self.messages_key)
        if messages is None:
            raise BadRecord(MISSING_KEY, f"no '{self.messages_key}' field")
        if not isinstance(messages, list):
            raise BadRecord(NOT_STRING, f"'{self.messages_key}' must be a list of {{role, content}} objects")
        segs: list[tuple[str, bool]] = []
        for n, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise BadRecord(NOT_STRING, f"{self.messages_key}[{n}] must be an object with role and content")
            role, content = _field(msg, "role", f"{self.messages_key}[{n}]"), _field(msg, "content", f"{self.messages_key}[{n}]")
            if role not in self.chat.prefix:
                raise BadRecord(NOT_STRING, f"{self.messages_key}[{n}].role {role!r} is not one of "
                                            f"{sorted(self.chat.prefix)} (set format.chat.prefix)")
            trained = role in self.chat.trained_roles
            segs.append((self.chat.prefix[role], False))
            segs.append((content + self.chat.suffix, trained))
        return segs


def _field(record: dict, key: str, where: str = "") -> str:
    name = f"{where}.{key}" if where else key
    if key not in record:
        raise BadRecord(MISSING_KEY, f"no '{name}' field")
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(NOT_STRING, f"'{name}' is {type(value).__name__}, expected a string")
    return value


def _render(template: str, record: dict) -> str:
    for _, name, _, _ in string.Formatter().parse(template):
        if name:
            _field(record, name)
    return template.format_map(record)
