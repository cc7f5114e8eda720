"""Pieces of the HTTP schemas that both surfaces share (the native API's are the same in
camelCase): a response format.  Each surface's own schemas are beside its router
(``openai/schemas.py``, ``native/schemas.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from cyllm.gateway.json_schema import Constraint, constraint_of


class JsonSchemaFormat(BaseModel):
    name: str = Field("output", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON matching a
    schema; the two JSON kinds are decoded under a grammar (``Constraint``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormat:
        if (self.kind() == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with type json_schema, and only there")
        return self

    def kind(self) -> str:
        return self.type

    def constraint(self) -> Constraint | None:
        return constraint_of(self.kind(), self.json_schema.schema_ if self.json_schema else None)
