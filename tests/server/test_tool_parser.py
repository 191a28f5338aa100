"""server.tool_parser: tool calls out of text, whole or streamed one character at a time (both
must agree), in SmolLM2's list format and Hermes' one-call blocks; and the call grammar."""

from __future__ import annotations

import json

import pytest

from server.protocol import ChatCompletionRequest
from server.tool_parser import ToolCallParser
from server.tools import tool_call_constraint

CASES = [
    # (text, content, [(name, arguments)])
    ('Sure.<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris {x}", "n": [1]}}, '
     '{"name": "f2", "arguments": {}}]</tool_call>',
     "Sure.", [("get_weather", '{"city": "Paris {x}", "n": [1]}'), ("f2", "{}")]),
    ('<tool_call>\n{"name": "a", "arguments": {"x": "\\"}"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
     "\n", [("a", '{"x": "\\"}"}'), ("b", "{}")]),
    ("no calls here <tool_ca", "no calls here <tool_ca", []),
    ("bad <tool_call>hello</tool_call> end", "bad <tool_call>hello</tool_call> end", []),
    ('<tool_call>[{"name": "cut", "arguments": {"a": 1', "", [("cut", '{"a": 1')]),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_whole_and_streamed_agree(text: str, content: str,
                                  calls: list[tuple[str, str]]) -> None:
    whole = ToolCallParser()
    assert whole.feed(text, final=True)[0] == content
    assert [(c.name, c.arguments) for c in whole.calls] == calls
    streamed = ToolCallParser()
    pieces, fragments = [], {}
    for i, ch in enumerate(text):
        piece, deltas = streamed.feed(ch, final=i == len(text) - 1)
        pieces.append(piece)
        for d in deltas:
            assert (d.id is not None) == (d.index not in fragments)  # id once, first
            fragments[d.index] = fragments.get(d.index, "") + d.arguments
    assert "".join(pieces) == content
    assert [(c.name, c.arguments) for c in streamed.calls] == calls
    assert [fragments[i] for i in range(len(calls))] == [a for _, a in calls]


def test_call_grammar_hoists_nested_definitions() -> None:
    address = {"type": "object", "properties": {"zip": {"type": "string"}}}
    tools = [{"type": "function", "function": {
        "name": "send", "parameters": {"$defs": {"Address": address}, "type": "object",
                                       "properties": {"to": {"$ref": "#/$defs/Address"}}}}}]
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],  # type: ignore
                                    tools=tools, tool_choice="required")
    constraint = tool_call_constraint(request)
    assert constraint is not None and constraint.kind == "grammar"
    schema = json.loads(constraint.spec.split("%json ", 1)[1])
    assert schema["$defs"] == {"send.Address": address}
    assert "maxItems" not in schema  # required: several calls may be made
    arguments = schema["items"]["properties"]["arguments"]
    assert arguments["properties"]["to"] == {"$ref": "#/$defs/send.Address"}
