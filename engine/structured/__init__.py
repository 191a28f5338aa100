"""Structured outputs: constraints on the generated text (JSON schemas, regexes, choices,
grammars), compiled by llguidance and enforced by masks in the sampler."""

from engine.structured.params import JSON_OPTIONS, STRUCTURED_KINDS, StructuredOutputs

__all__ = ["JSON_OPTIONS", "STRUCTURED_KINDS", "StructuredOutputs"]
