"""A request's constraint on its text: from `response_format`, vLLM's `structured_outputs` or its
older `guided_*` fields (at most one of them), as the engine's StructuredOutputs. Whether it
compiles is the engine's to say (a 400 naming the same field, before anything is streamed).
"""

from __future__ import annotations

from engine.structured import StructuredOutputs
from server.errors import BadRequestError
from server.protocol import GenerationRequest


def request_constraint(request: GenerationRequest) -> StructuredOutputs | None:
    """The constraint the request asks for (None = free text). Raises BadRequestError naming
    the field when it is malformed, or the second field when several are given."""
    found: list[StructuredOutputs] = []
    try:
        _collect(request, found)
    except ValueError as exc:  # StructuredOutputs' own checks name the field first
        message = str(exc)
        raise BadRequestError(message, param=message.split(":")[0].split()[0]) from exc
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise BadRequestError(f"{found[1].param}: only one structured output may be asked for, "
                              f"got {names}", param=found[1].param)
    return found[0] if found else None


def _collect(request: GenerationRequest, found: list[StructuredOutputs]) -> None:
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(StructuredOutputs.json_object("response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None  # the protocol checks it
        schema = fmt.json_schema.schema_
        found.append(StructuredOutputs.json_object("response_format") if schema is None
                     else StructuredOutputs.json(schema, "response_format"))
    so = request.structured_outputs
    if so is not None:
        param = "structured_outputs"
        if so.json_ is not None:
            found.append(StructuredOutputs.json(so.json_, param))
        elif so.regex is not None:
            found.append(StructuredOutputs.regex(so.regex, param))
        elif so.choice is not None:
            found.append(StructuredOutputs.choice(so.choice, param))
        elif so.grammar is not None:
            found.append(StructuredOutputs.grammar(so.grammar, param))
        else:
            found.append(StructuredOutputs.json_object(param))
    if request.guided_json is not None:
        found.append(StructuredOutputs.json(request.guided_json, "guided_json"))
    if request.guided_regex is not None:
        found.append(StructuredOutputs.regex(request.guided_regex, "guided_regex"))
    if request.guided_choice is not None:
        found.append(StructuredOutputs.choice(request.guided_choice, "guided_choice"))
    if request.guided_grammar is not None:
        found.append(StructuredOutputs.grammar(request.guided_grammar, "guided_grammar"))
