"""A JSON schema shared by the structured-output tests (tests/test_constraints.py, tests/test_server_structured.py)."""

# Nested objects, arrays, enums, required fields, bounded numbers, string patterns. Every string and
# number is bounded (pattern, maxLength, multipleOf) and additionalProperties is false: a random model
# otherwise writes digits or keys until the token limit, which is valid JSON's prefix, not JSON.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{2,8}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "main": {"type": "boolean"}},
            "required": ["zip", "main"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "color", "tags", "address"],
    "additionalProperties": False,
}
