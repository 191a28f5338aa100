"""Request schemas of structured outputs and tool calls (pydantic v2), as OpenAI and vLLM take
them: `response_format` (text, json_object, json_schema), vLLM's `structured_outputs` and its
older `guided_*` fields, and chat's `tools` / `tool_choice` with the messages that carry tool
calls and their results. server/structured.py turns them into the engine's constraint.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOOLS = 128  # tools per request at most (OpenAI's limit)
MAX_CHOICES = 1024  # guided_choice / structured_outputs.choice strings at most
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class _Model(BaseModel):
    # As OpenAIBaseModel (server.protocol): unknown fields ignored, no NaN / Infinity.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class JsonSchemaFormat(_Model):
    """`response_format.json_schema`: OpenAI's structured outputs."""

    name: str = Field(default="response", max_length=64)  # the schema's name (unused)
    description: str | None = None  # unused
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # the JSON schema;
    #   None = any JSON object
    strict: bool | None = None  # accepted: the output always follows the schema here


class ResponseFormat(_Model):
    """`response_format`: text (the default), any JSON object, or JSON following a schema."""

    type: str  # text | json_object | json_schema (structural_tag is not supported)
    json_schema: JsonSchemaFormat | None = None  # with type json_schema

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in RESPONSE_FORMATS:
            raise ValueError(f"response_format type {value!r} is not supported; one of "
                             f"{', '.join(RESPONSE_FORMATS)}")
        return value

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: json_schema is required with type 'json_schema' "
                             "and only then")
        return self


class StructuredOutputsRequest(_Model):
    """vLLM's `structured_outputs`: exactly one of its fields."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")  # a JSON schema
    #   (or its JSON text)
    regex: str | None = None  # the whole output matches it
    choice: list[str] | None = Field(default=None, max_length=MAX_CHOICES)  # exactly one of
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF
    json_object: bool | None = None  # any JSON object

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsRequest:
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, "
                             "grammar, json_object")
        return self


# ------------------------------------------------------------------------------------- tools


class FunctionDefinition(_Model):
    name: str = Field(pattern=FUNCTION_NAME)  # what the model calls it
    description: str | None = None  # shown to the model
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments; None = no
    #   arguments ({} is then what a call passes)
    strict: bool | None = None  # accepted: enforced calls always follow `parameters` here


class ChatTool(_Model):
    type: Literal["function"]  # the only kind of tool
    function: FunctionDefinition


class ToolChoiceFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    """tool_choice naming one function: the model must call it (once)."""

    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(_Model):
    name: str
    arguments: str  # the arguments as JSON text


class ToolCall(_Model):
    """A call the assistant made, in a message sent back to us with the conversation."""

    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction
