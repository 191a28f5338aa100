"""What a request asks its output to be: a JSON schema, any JSON object, a regex, one of a few
strings, or a grammar. Pure data (no grammar engine here): `SamplingParams` carries it, the
engine compiles it once when the request arrives (engine.structured.compiler), and the runner
enforces it token by token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

# One JSON layout, json.dumps's: a weak model allowed free whitespace can emit newlines forever
# inside a valid document; with fixed separators every token moves the document forward. (A JSON
# schema embedded in a grammar takes them as its "x-guidance" key.)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the generated text. Build it with the constructors below.

    Equal constraints compile once (the compiler caches by (kind, spec)); `param` only names
    the request field in errors.
    """

    kind: StructuredKind  # json: `spec` is a JSON schema (JSON text); json_object: any JSON
    #   object; regex: `spec` is a regular expression the whole output matches; choice: `spec`
    #   is a JSON list of strings, the output is exactly one of them; grammar: `spec` is a Lark
    #   grammar (llguidance's dialect, `%json {...}` embeds a schema) or a GBNF one (llama.cpp's,
    #   told apart by its `::=`)
    spec: str = ""  # see kind; "" for json_object
    param: str = field(default="structured_outputs", compare=False)  # the request field it
    #   came from, named by the 400 when it cannot be compiled

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"{self.param}: unknown kind {self.kind!r}; one of "
                             f"{', '.join(STRUCTURED_KINDS)}")
        if self.kind == "json_object":
            if self.spec:
                raise ValueError(f"{self.param}: json_object takes no spec")
            return
        if not self.spec:
            raise ValueError(f"{self.param} must not be empty")
        if self.kind in ("json", "choice"):
            try:
                value = json.loads(self.spec)
            except ValueError as exc:
                raise ValueError(f"{self.param} is not valid JSON: {exc}") from None
            if self.kind == "json" and not isinstance(value, dict | bool):
                raise ValueError(f"{self.param} must be a JSON schema (an object)")
            if self.kind == "choice" and not (
                    isinstance(value, list) and value
                    and all(isinstance(c, str) and c for c in value)):
                raise ValueError(f"{self.param} must be a non-empty list of non-empty strings")

    @staticmethod
    def json(schema: dict[str, Any] | str, param: str = "structured_outputs",
             ) -> StructuredOutputs:
        """Output valid against a JSON schema (a dict, or its JSON text). Property order is
        kept: the output lists properties in the schema's order."""
        spec = schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))
        return StructuredOutputs("json", spec, param)

    @staticmethod
    def json_object(param: str = "structured_outputs") -> StructuredOutputs:
        """Output is one JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return StructuredOutputs("json_object", "", param)

    @staticmethod
    def regex(pattern: str, param: str = "structured_outputs") -> StructuredOutputs:
        return StructuredOutputs("regex", pattern, param)

    @staticmethod
    def choice(choices: list[str] | tuple[str, ...],
               param: str = "structured_outputs") -> StructuredOutputs:
        return StructuredOutputs("choice", json.dumps(list(choices), ensure_ascii=False), param)

    @staticmethod
    def grammar(text: str, param: str = "structured_outputs") -> StructuredOutputs:
        return StructuredOutputs("grammar", text, param)
