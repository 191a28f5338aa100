"""Reads tool calls out of a choice's text as it streams: `<tool_call>` blocks holding one call
object (Hermes) or a list of them (SmolLM2), each `{"name": "...", "arguments": {...}}`.

Text outside the blocks is content. A call is announced once its name is known, then its
arguments stream as fragments of their JSON text, as OpenAI streams `delta.tool_calls`; a JSON
response runs the same parser over the whole text, so both agree. A block that does not hold
calls of this shape is given back as content. Nothing here checks arguments against a schema:
with tool_choice required or named the grammar already did, and with auto OpenAI's own models
make no promise either.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from server.tools import TOOL_CALL_END, TOOL_CALL_START

_CALL_HEAD = re.compile(r'\s*\[?\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_CALL_HEAD_MAX_CHARS = 256  # past this, text that is not yet a call head never becomes one
_NEXT_CALL = re.compile(r"\s*\}\s*,")  # after arguments: another call of a list follows
_BLOCK_END = re.compile(r"\s*\}\s*\]?\s*" + re.escape(TOOL_CALL_END))


@dataclass
class ToolCallDelta:
    """What one feed added to one call: its id and name when it starts, argument text."""

    index: int  # the call's position among the choice's calls
    id: str | None = None  # set on the call's first delta
    name: str | None = None  # set on the call's first delta
    arguments: str = ""  # the next fragment of the arguments' JSON text


@dataclass
class ParsedCall:
    id: str  # call_<hex>
    name: str
    arguments: str = ""  # JSON text


@dataclass
class ToolCallParser:
    """Splits one choice's text into content and tool calls, one feed at a time."""

    calls: list[ParsedCall] = field(default_factory=list)  # every call so far
    _text: str = ""  # all text fed
    _pos: int = 0  # what precedes it is handled
    _block_start: int = -1  # where the open block's tag starts (-1: no block open)
    _block_calls: int = 0  # calls announced in the open block
    _after_call: bool = False  # a call's arguments ended: its "}" and what follows are next
    _args_start: int = -1  # start of the arguments being read (-1: between calls)
    _depth: int = 0  # brackets open in those arguments
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """Add text; returns the content it completes and the call deltas. With final=True,
        everything held back (a partial tag, a block that never held a call) comes out."""
        self._text += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if self._block_start < 0:
                if not self._outside(content, final):
                    break
            elif self._args_start >= 0:
                if not self._arguments(deltas):
                    break
            elif not self._between_calls(content, deltas, final):
                break
        if final and self._block_start >= 0 and not self._block_calls:
            content.append(self._text[self._block_start:])  # never a call: it was text
            self._block_start, self._pos = -1, len(self._text)
        return "".join(content), _merged(deltas)

    def _outside(self, content: list[str], final: bool) -> bool:
        start = self._text.find(TOOL_CALL_START, self._pos)
        if start < 0:
            end = len(self._text) if final else _safe_end(self._text, self._pos)
            content.append(self._text[self._pos:end])
            self._pos = end
            return False
        content.append(self._text[self._pos:start])
        self._block_start, self._block_calls = start, 0
        self._pos = start + len(TOOL_CALL_START)
        return True

    def _between_calls(self, content: list[str], deltas: list[ToolCallDelta],
                       final: bool) -> bool:
        """In a block, before a call's head (or after a call's arguments)."""
        rest = self._text[self._pos:]
        if self._after_call:  # after a call: the next one, or the end of the block
            if m := _NEXT_CALL.match(rest):
                self._pos += m.end()
                self._after_call = False
                return True
            if m := _BLOCK_END.match(rest):
                self._pos += m.end()
                self._block_start, self._after_call = -1, False
                return True
            return self._give_up_if_broken(rest, content, final)
        head = _CALL_HEAD.match(rest)
        if head is None:
            return self._give_up_if_broken(rest, content, final)
        call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", json.loads(head.group(1)))
        self.calls.append(call)
        deltas.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name))
        self._block_calls += 1
        self._pos += head.end()
        self._args_start, self._depth = self._pos, 0
        self._in_string = self._escaped = False
        return True

    def _give_up_if_broken(self, rest: str, content: list[str], final: bool) -> bool:
        """Waits for more text unless the block cannot be calls: then a block without calls
        is content, and one with calls is closed where its text stops making sense."""
        broken = TOOL_CALL_END in rest or len(rest) > _CALL_HEAD_MAX_CHARS or final
        if not broken:
            return False
        end = rest.find(TOOL_CALL_END)
        end = len(self._text) if end < 0 else self._pos + end + len(TOOL_CALL_END)
        if not self._block_calls:
            content.append(self._text[self._block_start:end])
        self._block_start, self._pos, self._after_call = -1, end, False
        return True

    def _arguments(self, deltas: list[ToolCallDelta]) -> bool:
        """Scan the arguments' JSON value; its new text is the next fragment."""
        text, i = self._text, self._pos
        done = False
        while i < len(text):
            ch = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]" or (ch == "," and not self._depth):
                if not self._depth:  # a value that is no object ends before the call's "}"
                    done = True
                    break
                self._depth -= 1
                if not self._depth:
                    i += 1
                    done = True
                    break
            i += 1
        fragment = text[self._pos:i]
        self._pos = i
        call = self.calls[-1]
        if not call.arguments:
            fragment = fragment.lstrip()
        call.arguments += fragment
        if fragment:
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=fragment))
        if done:
            call.arguments = call.arguments.strip()
            self._args_start, self._after_call = -1, True
        return done


def _safe_end(text: str, start: int) -> int:
    """Where content may be emitted up to: before a tail that could begin a tool-call tag."""
    for keep in range(min(len(TOOL_CALL_START) - 1, len(text) - start), 0, -1):
        if TOOL_CALL_START.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def _merged(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """One delta per call: its head and argument fragments of one feed joined."""
    out: list[ToolCallDelta] = []
    for delta in deltas:
        if out and out[-1].index == delta.index:
            out[-1].arguments += delta.arguments
        else:
            out.append(delta)
    return out
