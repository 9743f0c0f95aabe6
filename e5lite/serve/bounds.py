"""Bounds that the server, not a type, sets on a request field (a flag's ``max_inputs``; the model's
``vocab_size``, ``dim`` and prompt names): declared on ``protocol.py``'s types as ``Bound`` markers, written
into the OpenAPI document by ``bind`` from the same values the validation reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue

BOUNDS_KEY = "x-e5lite-bounds"  # where a Bound waits in a JSON Schema until ``bind`` fills it in


@dataclass(frozen=True)
class Bound:
    """A bound that the server, not the type, sets (``max_inputs`` from a flag; ``vocab_size``, ``dim`` and the
    prompt names from the model), on the OpenAPI document's schema of a field: JSON Schema's ``keyword`` is
    ``bounds[name] + offset`` there (``bind``). Validation checks the same values, from the same dict (the
    validation context), so the document promises exactly what the server accepts."""

    keyword: str  # "maximum", "maxItems", "enum"
    name: str
    offset: int = 0

    def __get_pydantic_json_schema__(self, core_schema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema.setdefault(BOUNDS_KEY, {})[self.keyword] = [self.name, self.offset]
        return schema


def bind(schema: Any, bounds: dict[str, Any]) -> Any:
    """``schema`` (a JSON Schema, or a document of them) with each Bound's keyword set from ``bounds``, in place;
    one whose value is absent from ``bounds`` is left out."""
    if isinstance(schema, dict):
        for keyword, (name, offset) in schema.pop(BOUNDS_KEY, {}).items():
            if bounds.get(name) is not None:
                schema[keyword] = bounds[name] + offset if offset else bounds[name]
        for value in schema.values():
            bind(value, bounds)
    elif isinstance(schema, list):
        for value in schema:
            bind(value, bounds)
    return schema
