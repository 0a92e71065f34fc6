"""Unsloth's `to_sharegpt` and dataset-level `apply_chat_template` (`unsloth/chat_templates.py`), as its
"ChatGPT-style" / CSV / Titanic notebooks call them:

    dataset = to_sharegpt(dataset, merged_prompt="{instruction}[[\\nYour input is:\\n{input}]]",
                          output_column_name="output", conversation_extension=3)   # -> "conversations" column
    dataset = standardize_sharegpt(dataset)                                        # "from"/"value" -> "role"/"content"
    dataset = apply_chat_template(dataset, tokenizer=tokenizer, chat_template=chat_template)   # -> "text" column

`apply_chat_template` reads an Ollama-style template ("{SYSTEM}", "{INPUT}", "{OUTPUT}") the way Unsloth's
`construct_chat_template` does, installs the equivalent Jinja template on the tokenizer and renders each conversation
with it. Both take a list of dicts (returning a new list) or a `datasets.Dataset` (returning a mapped one).
"""

from __future__ import annotations

import re

import numpy as np

from fastlora_jax.chat_template_formats import jinja_string

_COLUMN = re.compile(r"\{(.+?)\}")
_OPTIONAL = re.compile(r"\[\[.+?\]\]", re.DOTALL)

# ---------------------------------------------------------------------------------------------- datasets


def _records(dataset, where: str) -> tuple[bool, list[str]]:
    """(is a list, column names): the first record's keys for a list, as `Dataset.from_list` reads them."""
    if isinstance(dataset, (list, tuple)):
        first = dataset[0] if len(dataset) else {}
        if not isinstance(first, dict):
            raise TypeError(f"{where}: the dataset's records are {type(first).__name__}s; accepted: dicts")
        return True, list(first)
    if hasattr(dataset, "map") and hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__"):
        return False, list(dataset.column_names)
    raise TypeError(f"{where}: dataset of type {type(dataset).__name__}; accepted: a list of dicts or a "
                    "datasets.Dataset")


# ---------------------------------------------------------------------------------------------- to_sharegpt


def _prompt_parts(merged_prompt: str, columns: list[str]) -> list[tuple[bool, str]]:
    """The merged_prompt as (optional, text) pieces: "[[...]]" blocks (brackets dropped) and the text between them."""
    for column in _COLUMN.findall(merged_prompt):
        if column not in columns:
            raise KeyError(f"to_sharegpt: merged_prompt names the column {column!r}, which the dataset lacks; its "
                           f"columns are {columns}")
    parts, at = [], 0
    for block in _OPTIONAL.finditer(merged_prompt):
        if block.start() > at:
            parts.append((False, merged_prompt[at: block.start()]))
        inner = block.group()[2:-2]
        if not _COLUMN.search(inner):
            raise IndexError(f"to_sharegpt: the optional block {block.group()!r} of merged_prompt names no column; "
                             "accepted: [[...]] blocks holding at least one {column}")
        parts.append((True, inner))
        at = block.end()
    if at < len(merged_prompt) or not parts:
        parts.append((False, merged_prompt[at:]))
    return parts


def _text(value) -> str:
    return "" if value is None else str(value)


def _merge(parts: list[tuple[bool, str]], record: dict) -> str:
    """The merged prompt of one record: columns filled in (None as ""), an optional block dropped when its first
    column is empty (Unsloth's rule: only the first column of a block decides)."""
    out = []
    for optional, text in parts:
        if optional and _text(record.get(_COLUMN.search(text).group(1))) == "":
            continue
        out.append(_COLUMN.sub(lambda m: _text(record.get(m.group(1))), text))
    return "".join(out)


def to_sharegpt(dataset, merged_prompt: str = "", merged_column_name: str = "instruction",
                output_column_name: str = "output", remove_unused_columns: bool = True,
                conversation_extension: int = 1, random_state: int = 3407):
    """Unsloth's `to_sharegpt`: a "conversations" column of ShareGPT turns [{"from": "human", "value": prompt},
    {"from": "gpt", "value": str(output)}] per record.

    merged_prompt: the human turn, "{column}" filled with the record's value (None as ""); a "[[...]]" block is
    dropped when its first column is empty or None; "" (the default) gives an empty human turn, as Unsloth.
    merged_column_name receives it (kept only with remove_unused_columns=False, which keeps every column).
    conversation_extension=N > 1: each row's conversation is followed by those of N - 1 other rows, the j-th from
    `Dataset.shuffle(seed=random_state + j)`'s order, as Unsloth's; needs remove_unused_columns=True (Unsloth's
    concatenation fails on duplicated columns otherwise). KeyError: a column the dataset lacks; IndexError: a
    [[...]] block without a column; TypeError: "conversations" holding lists (ShareGPT already).
    """
    is_list, columns = _records(dataset, "to_sharegpt")
    if isinstance(conversation_extension, bool) or not isinstance(conversation_extension, (int, np.integer)):
        raise TypeError(f"to_sharegpt: conversation_extension={conversation_extension!r}; accepted: an int")
    if "conversations" in columns and len(dataset) and isinstance(dataset[0]["conversations"], list):
        raise TypeError("to_sharegpt: the dataset's 'conversations' column holds lists: it is probably in ShareGPT "
                        "format already; pass it to standardize_sharegpt instead")
    parts = _prompt_parts(merged_prompt, columns)
    if output_column_name not in (*columns, merged_column_name):
        raise KeyError(f"to_sharegpt: output_column_name={output_column_name!r} is not a column of the dataset; its "
                       f"columns are {columns}")
    extensions = max(int(conversation_extension) - 1, 0)
    if extensions and not remove_unused_columns:
        raise ValueError(f"to_sharegpt: conversation_extension={conversation_extension} with "
                         "remove_unused_columns=False (Unsloth's concatenation of the shuffled copies fails on their "
                         "duplicated columns); accepted: remove_unused_columns=True or conversation_extension=1")

    def convert(record: dict) -> dict:
        human = _merge(parts, record)
        gpt = human if output_column_name == merged_column_name else record.get(output_column_name)
        convo = [{"from": "human", "value": human}, {"from": "gpt", "value": str(gpt)}]
        return {"conversations": convo} if remove_unused_columns else {merged_column_name: human,
                                                                        "conversations": convo}

    if is_list:
        out = [{**({} if remove_unused_columns else record), **convert(record)} for record in dataset]
        convos = [record["conversations"] for record in out]
    else:
        def convert_batch(batch: dict) -> dict:
            converted = [convert(dict(zip(batch, values))) for values in zip(*batch.values())]
            return {key: [c[key] for c in converted] for key in (converted[0] if converted else ["conversations"])}

        out = dataset.map(convert_batch, batched=True, desc="Merging columns",
                          remove_columns=columns if remove_unused_columns else None)
        convos = list(out["conversations"]) if extensions else []
    if not extensions:
        return out
    n = len(convos)
    orders = [np.arange(n)] + [np.random.default_rng(random_state + j).permutation(n)
                               for j in range(1, extensions + 1)]  # [extensions + 1, n]

    def extended(i: int) -> list[dict]:
        return [turn for order in orders for turn in convos[order[i]]]

    if is_list:
        return [{"conversations": extended(i)} for i in range(n)]
    return out.map(lambda batch, idx: {"conversations": [extended(i) for i in idx]}, batched=True,
                   with_indices=True, desc="Extending conversations")


# ---------------------------------------------------------------------------------------------- apply_chat_template

_LLAMA3_EXAMPLE = ("<|start_header_id|>user<|end_header_id|>\n\n{INPUT}<|eot_id|><|start_header_id|>assistant"
                   "<|end_header_id|>\n\n{OUTPUT}<|eot_id|>")
_LLAMA3_TEMPLATE = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
                    + 2 * _LLAMA3_EXAMPLE)  # Unsloth's default chat_template
_DEFAULT_SYSTEM = ("Below are some instructions that describe some tasks. Write responses that appropriately "
                   "complete each request.")
_TEMPLATE_HELP = ("accepted: a template holding {INPUT} and {OUTPUT}, such as 'System text\\n### Input:\\n{INPUT}\\n"
                  "### Response:\\n{OUTPUT}', or two such examples after an optional {SYSTEM} part")


def _two_examples(template: str, eos_tokens: list[str]) -> tuple[str, str, str] | None:
    """(system, input, output) of a template ending with two identical {INPUT} ... {OUTPUT} examples, else None:
    the longest suffix that occurs earlier is the example; its input part runs to {INPUT}, whitespace and an EOS."""
    j = len(template) - 1
    while j > 0 and template.rfind(template[j:], 0, j) != -1:
        j -= 1
    if j <= 0 or j == len(template) - 1:
        return None
    left, right = template[: j + 1], template[j + 1:]
    if right.count("{INPUT}") != 1 or right.count("{OUTPUT}") != 1:
        return None
    eos = "|".join(f"(?:{re.escape(e)})" for e in sorted(eos_tokens, key=len, reverse=True))
    end = re.search(r"\{INPUT\}\s*" + (f"(?:{eos})?" if eos else ""), right).end()
    at = left.find(right[:end])
    system = left if at == -1 else left[:at]
    return (system, right[:end], right[end:]) if system + right == left else None


def _one_example(template: str) -> tuple[str, str, str]:
    """(system, input, output) as Unsloth's fallback reads them: the output part runs from after {INPUT} to {OUTPUT}
    and the text that follows the first {OUTPUT}; the input part starts at the longest start of the output part
    that also occurs before an {INPUT}."""
    missing = [slot for slot in ("{INPUT}", "{OUTPUT}") if slot not in template]
    if missing:
        raise RuntimeError(f"apply_chat_template: chat_template={template[:200]!r} lacks {' and '.join(missing)}; "
                           + _TEMPLATE_HELP)
    ending = re.escape(template[template.find("{OUTPUT}") + len("{OUTPUT}"):])
    found = re.search(r"\{INPUT\}" + ending + r"(.+?\{OUTPUT\}" + ending + ")", template, re.DOTALL)
    if found is None:
        raise RuntimeError(f"apply_chat_template: chat_template={template[:200]!r} has no {{INPUT}} ... {{OUTPUT}} "
                           "example that can be read off it; " + _TEMPLATE_HELP)
    output = found.group(1)
    separator = None
    for k in range(1, len(output)):
        at = template.find(output[:k])
        if at == -1 or template.find("{INPUT}", at + k + 1) == -1:
            break
        separator = output[:k]
    if separator is None:
        raise RuntimeError(f"apply_chat_template: chat_template={template[:200]!r}: no text before {{INPUT}} "
                           "separates its examples; " + _TEMPLATE_HELP)
    output_at = template.find(output)
    user = template[max(template.rfind(separator, 0, output_at), 0): output_at]
    return template[: template.find(user + output)], user, output


def _split(template: str, eos_tokens: list[str]) -> tuple[str, str, str, str]:
    """(template read, system, input, output): two examples, else the template without trailing whitespace read in
    full, else one example (Unsloth's order of attempts)."""
    parts = _two_examples(template, eos_tokens)
    if parts is not None:
        return (template, *parts)
    if template.rstrip() != template:
        try:
            return _split(template.rstrip(), eos_tokens)
        except RuntimeError:
            pass
    return (template, *_one_example(template))


def _eos_tokens(tokenizer, extra_eos_tokens) -> list[str]:
    """The tokenizer's EOS first, then extra_eos_tokens (each a single token), as Unsloth orders them."""
    extra = [extra_eos_tokens] if isinstance(extra_eos_tokens, str) else list(extra_eos_tokens or [])
    vocab = tokenizer.get_vocab()
    for token in extra:
        if not isinstance(token, str) or token not in vocab:
            raise ValueError(f"apply_chat_template: extra_eos_tokens holds {token!r}, which is not a single token of "
                             "the tokenizer; accepted: strings of its vocabulary (tokenizer.get_vocab())")
    tokens = ([tokenizer.eos_token] if tokenizer.eos_token is not None else []) + extra
    if str(getattr(tokenizer, "name_or_path", "")).lower().startswith(("unsloth/llama-3-8b-instruct",
                                                                      "unsloth/llama-3-70b-instruct")):
        tokens.append("<|eot_id|>")
    if not tokens:
        raise RuntimeError("apply_chat_template: the tokenizer has no EOS token; pass one in extra_eos_tokens")
    return list(dict.fromkeys(tokens))


def _jinja(system: str, user: str, assistant: str, default_system_message: str | None, bos: bool) -> str:
    """The Jinja template rendering like Unsloth's: BOS (where the tokenizer adds one), the system part (with
    {SYSTEM} from a first system message, else default_system_message, else no system part), then each message
    through the input / output part; a role other than user / assistant raises."""

    def expression(part: str, slot: str, content: str) -> str:
        pieces = part.split(slot)
        terms = [jinja_string(pieces[0])] if pieces[0] else []
        for piece in pieces[1:]:
            terms += [content] + ([jinja_string(piece)] if piece else [])
        return "{{ " + (" + ".join(terms) or "''") + " }}"

    def literal(text: str) -> str:
        return "{{ " + jinja_string(text) + " }}" if text else ""

    if "{SYSTEM}" in system:
        default = "" if default_system_message is None else literal(system.replace("{SYSTEM}", default_system_message))
        head = ("{% if messages[0]['role'] == 'system' %}" + expression(system, "{SYSTEM}", "messages[0]['content']")
                + "{% set loop_messages = messages[1:] %}{% else %}" + default
                + "{% set loop_messages = messages %}{% endif %}")
    else:
        head = literal(system) + "{% set loop_messages = messages %}"
    return (("{{ bos_token }}" if bos else "") + head
            + "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
            + expression(user, "{INPUT}", "message['content']") + "{% elif message['role'] == 'assistant' %}"
            + expression(assistant, "{OUTPUT}", "message['content']")
            + "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}" + literal(assistant[: assistant.find("{OUTPUT}")]) + "{% endif %}")


def _check_roles(convo, i: int, system_allowed: bool) -> None:
    """The roles Unsloth's template renders: user / assistant, and a first system message where it has {SYSTEM}."""
    for j, message in enumerate(convo):
        role = message.get("role", message.get("from")) if isinstance(message, dict) else message
        if role in ("user", "assistant") or (role == "system" and j == 0 and system_allowed):
            continue
        system = "a first 'system' message" if system_allowed else "no 'system' one (the template has no {SYSTEM})"
        raise ValueError(f"apply_chat_template: row {i}, message {j} has role {role!r}; accepted: 'user', "
                         f"'assistant' and {system}; ShareGPT rows ('from'/'value') need standardize_sharegpt first")


def apply_chat_template(dataset, tokenizer=None, chat_template: str = _LLAMA3_TEMPLATE,
                        default_system_message: str | None = _DEFAULT_SYSTEM, extra_eos_tokens=None):
    """Unsloth's dataset-level `apply_chat_template`: a "text" column rendering each "conversations" row
    ({"role", "content"} messages) through an Ollama-style template; sets `tokenizer.chat_template` to the same
    format as Jinja (and `tokenizer._unsloth_input_part` / `_unsloth_output_part`: the texts before {INPUT} and
    {OUTPUT}), as Unsloth.

    chat_template: an optional system part (with or without {SYSTEM}), then either two identical examples of
    "...{INPUT}...{OUTPUT}..." or one; read as Unsloth's `construct_chat_template` reads it (leading whitespace
    dropped). Unless some {OUTPUT} is directly followed by an EOS token (the tokenizer's or extra_eos_tokens), the
    tokenizer's EOS is appended to the output part. A tokenizer that adds BOS by itself gets BOS first.
    default_system_message: fills {SYSTEM} when a conversation does not start with a system message (None: the
    system part is left out). extra_eos_tokens: a token or list of tokens that also end an answer.
    """
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(f"apply_chat_template: tokenizer={tokenizer!r}; accepted: the model's transformers tokenizer")
    is_list, columns = _records(dataset, "apply_chat_template")
    if "conversations" not in columns:
        raise KeyError(f"apply_chat_template reads the 'conversations' column; the dataset has {columns} (make it "
                       "with to_sharegpt, then standardize_sharegpt)")
    if not isinstance(chat_template, str):
        raise TypeError(f"apply_chat_template: chat_template of type {type(chat_template).__name__}; "
                        + _TEMPLATE_HELP)
    eos_tokens = _eos_tokens(tokenizer, extra_eos_tokens)
    template, system, user, assistant = _split(chat_template.lstrip(), eos_tokens)
    if not any(re.search(r"\{OUTPUT\}" + re.escape(eos), template) for eos in eos_tokens):
        assistant += eos_tokens[0]
    for part, slot in ((user, "{INPUT}"), (assistant, "{OUTPUT}")):
        if slot not in part:
            raise RuntimeError(f"apply_chat_template: chat_template={chat_template[:200]!r} reads as the part "
                               f"{part!r} without {slot}; " + _TEMPLATE_HELP)
    ids = tokenizer("A")["input_ids"]
    bos = bool(ids) and ids[0] == getattr(tokenizer, "bos_token_id", None)
    if bos and system.startswith(tokenizer.bos_token):
        system = system[len(tokenizer.bos_token):]
    jinja = _jinja(system, user, assistant, default_system_message, bos)
    for target in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        if target is not None:
            target.chat_template = jinja
            target._unsloth_input_part = user[: user.find("{INPUT}")]
            target._unsloth_output_part = assistant[: assistant.find("{OUTPUT}")]

    def render(convo, i: int) -> str:
        _check_roles(convo, i, "{SYSTEM}" in system)
        return tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False)

    if is_list:
        return [{**record, "text": render(record["conversations"], i)} for i, record in enumerate(dataset)]
    return dataset.map(lambda batch, idx: {"text": [render(c, i) for c, i in zip(batch["conversations"], idx)]},
                       batched=True, with_indices=True)
