"""`llmapi bench --guided-json SCHEMA`: real-text prompts of a fixed length that ask for a JSON record, the
built-in schema, and how many outputs parse as JSON and validate against the schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BUILTIN = "builtin"

# A CRM record: nested enums, bounded strings, a bounded array, number ranges and a boolean.
BUILTIN_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "minLength": 3, "maxLength": 60},
        "city": {"type": "string", "minLength": 1, "maxLength": 40},
        "plan": {"enum": ["free", "pro", "enterprise"]},
        "interests": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 24},
                      "maxItems": 4},
        "vip": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "city", "plan", "interests", "vip"],
}

# What a support agent's tool would put before the request: policy text, then the note to extract from.
PREAMBLE = (
    "You are the assistant of the customer success team at Northwind Outfitters, a company that sells outdoor "
    "gear, travel luggage and camping equipment in twelve countries. Agents paste notes from phone calls, chats "
    "and emails into this tool, and you turn each note into a structured record for the customer database. Keep "
    "the customer's own words where you can, never invent an email address, and use the plan the customer is on "
    "today rather than one they asked about. Ages are whole years. A customer is a VIP when they have spent more "
    "than five thousand dollars in the last year or when the note says so explicitly. Interests are short nouns "
    "such as hiking, kayaking, climbing or photography, at most four of them, most important first. The database "
    "rejects records with missing fields, so every field must be present even when the note only hints at it. "
    "Records are reviewed every Monday by the regional managers, who compare them with the original notes and "
    "send back the ones that do not match. Our return policy allows returns within sixty days with a receipt, "
    "and members of the pro and enterprise plans get free shipping on every order above fifty dollars. "
)
FIRST = ["Maria", "James", "Aiko", "Lars", "Fatima", "Diego", "Chloe", "Ravi", "Ingrid", "Tomasz", "Amara", "Wei"]
LAST = ["Lopez", "Carter", "Tanaka", "Nilsson", "Haddad", "Romero", "Dubois", "Patel", "Berg", "Nowak", "Okafor",
        "Chen"]
CITIES = ["Lisbon", "Denver", "Osaka", "Gothenburg", "Amman", "Valencia", "Lyon", "Pune", "Bergen", "Krakow",
          "Lagos", "Chengdu"]
INTERESTS = ["hiking", "kayaking", "climbing", "photography", "trail running", "fishing", "skiing", "cycling",
             "bird watching", "camping"]
PLANS = ["free", "pro", "enterprise"]


def load_schema(value: str) -> dict:
    """--guided-json: "builtin" (BUILTIN_SCHEMA) or a JSON schema file; ValueError naming a file that is missing
    or holds no JSON object."""
    if value == BUILTIN:
        return BUILTIN_SCHEMA
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--guided-json={value!r} is invalid: no such file (a JSON schema file, or 'builtin')")
    try:
        schema = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"--guided-json={value!r} is invalid: the file is not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"--guided-json={value!r} is invalid: the file holds a {type(schema).__name__}, not a JSON "
                         "schema object")
    return schema


def _note(rng: np.random.Generator) -> str:
    """A short agent note about one customer, drawn from `rng`."""
    first, last, city = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES)
    age, plan = int(rng.integers(19, 78)), rng.choice(PLANS)
    likes = list(rng.choice(INTERESTS, size=int(rng.integers(1, 4)), replace=False))
    spent = int(rng.integers(2, 90)) * 100
    return (f"Note: {first} {last} ({age}) called from {city} about a delayed order. They are on the {plan} plan, "
            f"spent about ${spent} with us this year and mentioned {', '.join(likes)}. Reach them at "
            f"{first.lower()}.{last.lower()}@example.com.")


def _encode(tokenizer, text: str) -> list[int]:
    """The prompt's ids: the chat template around `text` if the tokenizer has one, else the text as it encodes."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding (transformers >= 5)
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return list(tokenizer.encode(text))


def json_prompts(tokenizer, schema: dict, isl: int, num: int, seed: int) -> list[list[int]]:
    """`num` prompts of exactly `isl` tokens (chat template included) asking for a JSON record of `schema`'s
    fields from a customer note: the note and the instruction last, the preamble in front cut to fill the length
    (repeated if `isl` is long). ValueError when the note and instruction alone take more than `isl` tokens."""
    rng = np.random.default_rng(seed)
    fields = ", ".join(schema.get("properties", {})) or "the schema's fields"
    instruction = f"Extract the customer's record from the note above as a JSON object with the fields {fields}."
    background = tokenizer.encode(PREAMBLE * (1 + isl // 64), add_special_tokens=False)
    prompts = []
    for _ in range(num):
        tail = f"{_note(rng)}\n\n{instruction}"
        shortest = _encode(tokenizer, tail)
        if len(shortest) > isl:
            raise ValueError(f"--isl={isl} is too short for the JSON request: the note and instruction alone take "
                             f"{len(shortest)} tokens")
        prompts.append(_fill(tokenizer, background, tail, isl, shortest))
    return prompts


def _fill(tokenizer, background: list[int], tail: str, isl: int, shortest: list[int]) -> list[int]:
    """The longest prompt of at most `isl` tokens made of the first k background tokens (decoded) before `tail`;
    a prompt of exactly `isl` tokens when the tokenizer allows (text boundaries may merge tokens: then one of
    isl - 1 or so, the closest below)."""
    def build(k: int) -> list[int]:
        return _encode(tokenizer, (tokenizer.decode(background[:k]) + "\n\n" if k else "") + tail)

    best, k, tried = shortest, isl - len(shortest), set()  # first guess: a background token per missing one
    while len(tried) < 8:
        k = max(0, min(k, len(background)))
        if k in tried:
            break
        tried.add(k)
        ids = build(k)
        if len(best) < len(ids) <= isl:
            best = ids
        if len(ids) == isl:
            break
        k += isl - len(ids)  # move k by what this try missed the length by
    return best


def check_outputs(texts: list[str], schema: dict) -> dict:
    """How many outputs parse as JSON, and (with jsonschema installed) how many of those validate."""
    parsed, valid = 0, 0
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        parsed += 1
        if jsonschema is not None:
            try:
                jsonschema.validate(value, schema)
                valid += 1
            except jsonschema.ValidationError:
                pass
    return {"json_parsed": parsed, "schema_valid": valid if jsonschema is not None else None}


__all__ = ["BUILTIN_SCHEMA", "load_schema", "json_prompts", "check_outputs"]
