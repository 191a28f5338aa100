"""Tool calls on /v1/chat/completions: showing the tools to the model, and enforcing a call.

- The conversation (tool results and earlier calls included) goes through the model's chat
  template with `tools=`, when the template renders tools. SmolLM2-135M's does not: then the
  tools are described in the system message in SmolLM2's own tool-calling format (its model
  card's prompt), earlier calls are written back in that format and tool results are messages of
  role "tool", as llama.cpp does for templates without tool support.
- The model calls tools as `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>` (SmolLM2)
  or Hermes' `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; server.tool_parser reads
  both.
- tool_choice "required" or a named function is a grammar (engine.structured): the output is
  exactly one such block, whose calls name the allowed functions with arguments valid against
  their `parameters` schemas. "auto" leaves the model free and parses what it wrote; "none"
  leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from engine.structured import JSON_OPTIONS, StructuredOutputs
from server.errors import BadRequestError
from server.protocol import ChatCompletionRequest, ChatMessage
from server.protocol_structured import ChatTool, NamedToolChoice

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# SmolLM2-Instruct's function-calling prompt (its model card), for templates without tools.
TOOLS_PROMPT = """You are an expert in composing functions. You are given a question and a set of \
possible functions. Based on the question, you will need to make one or more function/tool calls \
to achieve the purpose. If none of the functions can be used, answer the question directly.

You have access to the following tools:
<tools>{tools}</tools>

To call tools, answer with the calls only, in the following format, and make sure the parameter \
types are correct:
<tool_call>[
{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},
... (more tool calls as required)
]</tool_call>"""


def tool_mode(request: ChatCompletionRequest) -> str | None:
    """"auto", "required", a function's name, or None (no tools offered). Raises
    BadRequestError for a named function that is not among the tools."""
    if not request.tools or request.tool_choice == "none":
        return None
    choice = request.tool_choice or "auto"
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {t.function.name for t in request.tools}:
            raise BadRequestError(f"tool_choice names function {name!r}, which is not among the "
                                  f"tools", param="tool_choice")
        return name
    return choice


def conversation(request: ChatCompletionRequest, template_has_tools: bool,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages as the chat template takes them, and the tools to pass it (None: none, or
    already described in the system message)."""
    offered = request.tools if tool_mode(request) is not None else None
    messages = [_message(m, template_has_tools) for m in request.messages]
    if not offered:
        return messages, None
    if template_has_tools:
        return messages, [t.model_dump(exclude_none=True) for t in offered]
    prompt = TOOLS_PROMPT.format(tools=json.dumps(
        [t.function.model_dump(exclude_none=True) for t in offered], ensure_ascii=False))
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages, None


def _message(message: ChatMessage, template_has_tools: bool) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.text()}
    calls = message.tool_calls or []
    if calls and template_has_tools:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in calls]
    elif calls:  # written back as the model writes them
        written = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                   for c in calls]
        text = TOOL_CALL_START + json.dumps(written, ensure_ascii=False) + TOOL_CALL_END
        out["content"] = f"{out['content']}\n{text}" if out["content"] else text
    if message.tool_call_id is not None and template_has_tools:
        out["tool_call_id"] = message.tool_call_id
    return out


def _arguments(text: str) -> Any:
    """A call's arguments as the template wants them (an object), its text if not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def tool_call_constraint(request: ChatCompletionRequest) -> StructuredOutputs | None:
    """The grammar of tool_choice "required" or a named function (None for auto / none): one
    `<tool_call>[...]</tool_call>` block of calls to the allowed functions, each with arguments
    valid against its parameters schema; one call for a named function or with
    parallel_tool_calls false."""
    mode = tool_mode(request)
    if mode in (None, "auto"):
        return None
    assert request.tools is not None
    tools: Sequence[ChatTool] = request.tools
    if mode != "required":
        tools = [t for t in tools if t.function.name == mode]
    defs: dict[str, Any] = {}
    calls = [{"type": "object",
              "properties": {"name": {"const": t.function.name},
                             "arguments": _hoist_defs(t.function.parameters or {"type": "object"},
                                                      t.function.name, defs)},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "x-guidance": JSON_OPTIONS}
    if defs:
        schema["$defs"] = defs
    if mode != "required" or request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    grammar = (f"start: {json.dumps(TOOL_CALL_START)} calls {json.dumps(TOOL_CALL_END)}\n"
               f"calls: %json {json.dumps(schema, ensure_ascii=False)}")
    return StructuredOutputs.grammar(grammar, "tool_choice" if mode != "required" else "tools")


def _hoist_defs(parameters: dict[str, Any], function: str, defs: dict[str, Any]) -> Any:
    """`parameters` without its "$defs" (pydantic's nested models), which move to `defs` as
    "<function>.<name>", its "#/$defs/<name>" references renamed to match: the schema is now
    nested inside the call grammar's, where references resolve from that schema's root."""
    own = parameters.get("$defs") or parameters.get("definitions")
    if not isinstance(own, dict):
        return parameters
    renamed = {f"#/{key}/{name}": f"#/$defs/{function}.{name}"
               for key in ("$defs", "definitions") for name in own}

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: renamed.get(v, v) if k == "$ref" and isinstance(v, str) else rename(v)
                    for k, v in node.items() if k not in ("$defs", "definitions")}
        if isinstance(node, list):
            return [rename(v) for v in node]
        return node

    for name, sub in own.items():
        defs[f"{function}.{name}"] = rename(sub)
    return rename(parameters)
