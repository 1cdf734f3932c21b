"""A small JSON Schema checker covering exactly the keywords deployprune's schemas use.

The tests run it unconditionally (and the ``jsonschema`` package too when it is installed), so
the schema is checked even where ``jsonschema`` is absent. An unknown keyword is an error
here: the schema must not rely on something this checker silently ignores.
"""

from __future__ import annotations

from typing import Any

_IGNORED = {"$schema", "$id", "title", "description", "$defs"}
_KNOWN = {"$ref", "anyOf", "type", "enum", "const", "properties", "required",
          "additionalProperties", "items", "minimum", "maximum"}


def _type_ok(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise ValueError(f"unknown JSON type {name!r}")


def errors(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None,
           path: str = "$") -> list[str]:
    root = root if root is not None else schema
    unknown = set(schema) - _KNOWN - _IGNORED
    if unknown:
        raise ValueError(f"{path}: schema keyword(s) {sorted(unknown)} not supported by the checker")
    out: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        out += errors(value, root["$defs"][ref[len("#/$defs/"):]], root, path)
    if "anyOf" in schema:
        if all(errors(value, s, root, path) for s in schema["anyOf"]):
            out.append(f"{path}: {value!r} matches none of the alternatives")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, t) for t in types):
            out.append(f"{path}: {value!r} is not of type {types}")
            return out
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: {value!r} is not {schema['const']!r}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if "minimum" in schema and number and value < schema["minimum"]:
        out.append(f"{path}: {value!r} < minimum {schema['minimum']}")
    if "maximum" in schema and number and value > schema["maximum"]:
        out.append(f"{path}: {value!r} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{path}: missing required key {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, v in value.items():
            if key in props:
                out += errors(v, props[key], root, f"{path}.{key}")
            elif extra is False:
                out.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                out += errors(v, extra, root, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += errors(v, schema["items"], root, f"{path}[{i}]")
    return out
