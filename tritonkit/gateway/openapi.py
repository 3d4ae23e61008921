"""OpenAI's own API description as the gateway's contract.

`openai_openapi.json` holds the schemas of the endpoints served here, copied from OpenAI's
published document (github.com/openai/openai-openapi, MIT; its commit inside;
`scripts/vendor_openai_schema.py` renews it). Request bodies are checked against its request
schemas, so a client learns of a wrong type or enum as OpenAI would tell it (a 400 naming the
`param`); the tests check every answer against its response schemas.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

DOCUMENT = Path(__file__).with_name("openai_openapi.json")
PREFIX = "#/components/schemas/"


def json_schema(node: Any) -> Any:
    """The document's schema as JSON Schema: OpenAPI 3.0's `nullable: true`, which the document still
    uses beside 3.1's null types, becomes `anyOf [..., null]` (a validator ignores `nullable`)."""
    if isinstance(node, list):
        return [json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@dataclass(frozen=True)
class SchemaError:
    param: str | None  # the offending field's path as OpenAI names it (`messages[0].content`)
    message: str


@cache
def document() -> dict:
    return json_schema(json.loads(DOCUMENT.read_text()))


@cache
def validator(name: str):
    """A Draft 2020-12 validator of the component schema `name`, its references resolved in the document."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    root = document()
    if name not in root["components"]["schemas"]:
        raise KeyError(f"{name} is not among the vendored schemas (scripts/vendor_openai_schema.py ROOTS)")
    resource = Resource.from_contents(root, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:openai-openapi", resource)
    return Draft202012Validator({"$ref": f"urn:openai-openapi{PREFIX}{name}"}, registry=registry)


def param_path(path: Iterable[Any]) -> str | None:
    """A JSON path as OpenAI's error `param`: `messages[0].content[1].image_url`."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text or None


def errors(name: str, instance: Any) -> list[SchemaError]:
    """Every violation of schema `name` by `instance` (empty when it conforms)."""
    found = list(validator(name).iter_errors(instance))
    return [SchemaError(param_path(e.absolute_path), summary(e)) for e in found]


def first_error(name: str, instance: Any) -> SchemaError | None:
    """The violation to tell a client about, or None."""
    from jsonschema.exceptions import best_match

    found = list(validator(name).iter_errors(instance))
    if not found:
        return None
    return explained(best_match(found))


DISCRIMINATORS = ("role", "type")  # the fields the document's unions of objects are told apart by


def explained(error: Any) -> SchemaError:
    """The error as a client can act on it: a union of objects told apart by `role` or `type` (a
    message, a content part, a response format) is explained by the member the instance names."""
    from jsonschema.exceptions import best_match

    if error.validator in ("anyOf", "oneOf") and isinstance(error.instance, dict):
        options = [resolved(option) for option in error.validator_value]
        for key in DISCRIMINATORS:
            allowed = [allowed_values(option, key) for option in options]
            if key not in error.instance or not any(allowed):
                continue
            for index, values in enumerate(allowed):
                if error.instance[key] in values:
                    inner = [e for e in error.context if e.relative_schema_path[0] == index]
                    if inner:
                        return explained(best_match(inner))
            expected = sorted({v for values in allowed for v in values})
            return SchemaError(
                param_path([*error.absolute_path, key]), f"expected one of {', '.join(map(json.dumps, expected))}"
            )
    return SchemaError(param_path(error.absolute_path), summary(error))


def resolved(option: dict) -> dict:
    ref = option.get("$ref")
    return document()["components"]["schemas"][ref.removeprefix(PREFIX)] if isinstance(ref, str) else option


def allowed_values(schema: dict, key: str) -> list:
    field = schema.get("properties", {}).get(key)
    if not isinstance(field, dict):
        return []
    if "const" in field:
        return [field["const"]]
    return list(field.get("enum", []))


def summary(error: Any) -> str:
    """jsonschema's message, short: the instance it quotes is cut (a request can hold megabytes of
    base64), and a failed `anyOf`/`oneOf` says what was expected rather than repeating the value."""
    if error.validator in ("anyOf", "oneOf"):
        kinds = sorted({kind for option in error.validator_value for kind in option_types(option)})
        return f"expected {' or '.join(kinds) if kinds else 'one of the documented forms'}"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"expected {expected}, got {json_type(error.instance)}"
    if error.validator == "enum":
        return f"expected one of {', '.join(json.dumps(v) for v in error.validator_value)}"
    if error.validator == "required":
        missing = [p for p in error.validator_value if p not in (error.instance or {})]
        return f"missing required {', '.join(missing)}"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(extra)}"
    message = error.message
    return message if len(message) <= 160 else message[:157] + "..."


def option_types(option: dict) -> list[str]:
    if "$ref" in option:
        return [option["$ref"].removeprefix(PREFIX).removeprefix("urn:openai-openapi")]
    kind = option.get("type")
    if isinstance(kind, list):
        return kind
    return [kind] if kind else []


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def form_instance(name: str, fields: Iterable[tuple[str, Any]]) -> dict:
    """A multipart form's fields as the JSON object request schema `name` describes, so it can be
    validated like a JSON body: `key[]` fields (OpenAI's arrays) gathered into lists, `key[field]`
    fields into objects, each value
    read as its property's type ("0.5" -> 0.5, "true" -> true; a value that does not read stays a
    string, which validation then names), a file as a string (the schema's binary format)."""
    properties = document()["components"]["schemas"][name].get("properties", {})
    instance: dict[str, Any] = {}
    for key, value in fields:
        key = key.removesuffix("[]")
        value = value if isinstance(value, str) else "<file>"
        if key.endswith("]") and "[" in key:  # an object's field, as the SDK sends one: chunking_strategy[type]
            parent, field_name = key[:-1].split("[", 1)
            nested = instance.setdefault(parent, {})
            if isinstance(nested, dict):
                nested[field_name] = typed(value, {"integer", "number", "string"})
            continue
        kinds = property_types(properties.get(key, {}))
        if "array" in kinds:
            instance.setdefault(key, []).append(value)
        else:
            instance[key] = typed(value, kinds)
    return instance


def property_types(schema: dict) -> set[str]:
    schema = resolved(schema)
    kinds = set(option_types(schema)) - {None}
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        kinds |= property_types(option)
    return {k for k in kinds if k in ("array", "number", "integer", "boolean", "string", "null")}


def typed(value: str, kinds: set[str]) -> Any:
    if "boolean" in kinds and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if "integer" in kinds:
        try:
            return int(value)
        except ValueError:
            pass
    if "number" in kinds:
        try:
            return float(value)
        except ValueError:
            pass
    return value
