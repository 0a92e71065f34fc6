"""Unsloth's `get_chat_template` and the chat formats it installs (Unsloth's `CHAT_TEMPLATES` names), as Jinja for
transformers' `apply_chat_template`, with what `get_chat_template` needs to know of each: its end-of-turn text and
default system message. Importable as `fastlora_jax.chat_templates.get_chat_template`, Unsloth's path.

The templates read text messages {"role", "content"} (ShareGPT rows are rewritten to those first, by
`sharegpt_prelude`). Every character they output sits inside a `{{ '...' }}` literal, so a template renders the same
with or without Jinja's trim_blocks / lstrip_blocks. A template with a default system message reads it from the
variable `default_system`, which `system_prelude` sets.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatFormat:
    """One chat format. stop_word: the text that ends a turn, "eos_token" meaning the tokenizer's own EOS.
    maps_eos: whether Unsloth makes stop_word the tokenizer's EOS under map_eos_token=True (else it ignores it).
    default_system_message: the system text used when the conversation has none (None: the format has none)."""

    template: str
    stop_word: str = "eos_token"
    maps_eos: bool = False
    default_system_message: str | None = None


def jinja_string(text: str) -> str:
    """`text` as a single-quoted Jinja string literal (Jinja reads back Python's backslash escapes)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


def system_prelude(system_message: str) -> str:
    return "{% set default_system = " + jinja_string(system_message) + " %}"


def sharegpt_prelude(role: str, content: str, user: str, assistant: str) -> str:
    """Jinja that rewrites ShareGPT-style messages to {"role", "content"} ones before the template reads them: when
    the first message has no "role" key (Unsloth's test), each message's `role` field gives the role, its
    `content` field the text, and the role names `user` / `assistant` become "user" / "assistant" (others, such as
    "system", are kept)."""
    role, content, user, assistant = map(jinja_string, (role, content, user, assistant))
    row = ("{'role': 'user' if name == " + user + " else 'assistant' if name == " + assistant + " else name, "
           "'content': m[" + content + "]}")
    return ("{% if messages and 'role' not in messages[0] %}"
            "{% set sharegpt = namespace(rows=[]) %}"
            "{% for m in messages %}"
            "{% set name = m[" + role + "] %}"
            "{% set sharegpt.rows = sharegpt.rows + [" + row + "] %}"
            "{% endfor %}"
            "{% set messages = sharegpt.rows %}"
            "{% endif %}")


def _rejected_role(name: str, accepted: str) -> str:
    return ("{{ raise_exception('" + name + " chat template: role ' + message['role'] + ' is not accepted; accepted: "
            + accepted + "') }}")


_GENERATION = "{% if add_generation_prompt %}{{ __ }}{% endif %}"


def _generation(prompt: str) -> str:
    return _GENERATION.replace("__", jinja_string(prompt))


# ---------------------------------------------------------------------------------------------- Llama 3 / 3.1

_LLAMA3_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"

# Llama 3 Instruct: BOS, then each message as <|start_header_id|>ROLE<|end_header_id|>\n\n TEXT <|eot_id|>, the text
# stripped of surrounding whitespace.
LLAMA_3 = ("{{ bos_token }}"
           "{% for message in messages %}"
           "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
           " + '<|eot_id|>' }}"
           "{% endfor %}"
           + _generation(_LLAMA3_ASSISTANT))

# Llama 3.1 / 3.2 / 3.3 Instruct as Unsloth writes it: always a system turn opening with the knowledge cut-off and a
# date (the `date_string` keyword of apply_chat_template, "26 July 2024" by default), then the system text (the
# first message's if it is a system one); texts are not stripped. Tool calling is not implemented.
LLAMA_31 = ("{% if tools or custom_tools is defined or builtin_tools is defined %}"
            "{{ raise_exception('llama-3.1 chat template: tools are not implemented') }}"
            "{% endif %}"
            "{{ bos_token }}"
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system, turns = messages[0]['content'], messages[1:] %}"
            "{% else %}"
            "{% set system, turns = default_system, messages %}"
            "{% endif %}"
            "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
            " + (date_string if date_string is defined else '26 July 2024') + '\\n\\n' + system + '<|eot_id|>' }}"
            "{% for message in turns %}"
            "{% if message['role'] in ('tool', 'ipython') or message['tool_calls'] %}"
            "{{ raise_exception('llama-3.1 chat template: tool calls and tool results are not implemented') }}"
            "{% endif %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content']"
            " + '<|eot_id|>' }}"
            "{% endfor %}"
            + _generation(_LLAMA3_ASSISTANT))

# ---------------------------------------------------------------------------------------------- Llama 2 / Mistral


def _inst(name: str, *, system_and_user: str, system_alone: str, user: str, assistant: str) -> str:
    """[INST] formats, from the Jinja that writes each kind of turn: a leading system message goes into the first
    [INST] block, with the user message after it (alone when none follows); then user / assistant turns. There is
    no generation prompt: a prompt ends with " [/INST]"."""
    return ("{% set turns = messages %}"
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% if messages | length > 1 and messages[1]['role'] == 'user' %}"
            + system_and_user + "{% set turns = messages[2:] %}"
            "{% else %}"
            + system_alone + "{% set turns = messages[1:] %}"
            "{% endif %}"
            "{% endif %}"
            "{% for message in turns %}"
            "{% if message['role'] == 'user' %}" + user
            + "{% elif message['role'] == 'assistant' %}" + assistant
            + "{% else %}" + _rejected_role(name, "system (first), user, assistant") + "{% endif %}"
            "{% endfor %}")


# Mistral Instruct: one BOS, then "[INST] TEXT [/INST]ANSWER</s>"; a system text goes before the first user text.
MISTRAL = ("{{ bos_token }}"
           + _inst("mistral",
                   system_and_user="{{ '[INST] ' + messages[0]['content'] + ' ' + messages[1]['content']"
                                   " + ' [/INST]' }}",
                   system_alone="{{ '[INST] ' + messages[0]['content'] + ' [/INST]' }}",
                   user="{{ '[INST] ' + message['content'] + ' [/INST]' }}",
                   assistant="{{ message['content'] + eos_token }}"))

# Llama 2 Chat: a BOS before every [INST]; the system text inside <<SYS>> ... <</SYS>>; user texts stripped; answers
# " TEXT </s>" (stripped).
LLAMA_2 = _inst("llama",
                system_and_user="{{ bos_token }}{{ '[INST] <<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n'"
                                " + messages[1]['content'] + ' [/INST]' }}",
                system_alone="{{ bos_token }}{{ '[INST] ' + messages[0]['content'] + ' [/INST]' }}",
                user="{{ bos_token }}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}",
                assistant="{{ ' ' + message['content'] | trim + ' ' + eos_token }}")

# ---------------------------------------------------------------------------------------------- tagged turns

# ChatML: <|im_start|>ROLE\nTEXT<|im_end|>\n, roles other than user / assistant written as system; no BOS.
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + (message['role'] if message['role'] in ('user', 'assistant') else 'system') + '\\n'"
          " + message['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}"
          + _generation("<|im_start|>assistant\n"))

# Zephyr: <|ROLE|>\nTEXT</s>\n, roles other than user / assistant written as system; no BOS.
ZEPHYR = ("{% for message in messages %}"
          "{{ '<|' + (message['role'] if message['role'] in ('user', 'assistant') else 'system') + '|>\\n'"
          " + message['content'] + eos_token + '\\n' }}"
          "{% endfor %}"
          + _generation("<|assistant|>\n"))

# Phi-3 / Phi-3.5: <|ROLE|>\nTEXT<|end|>\n; no BOS.
PHI_3 = ("{% for message in messages %}"
         "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
         "{% endfor %}"
         + _generation("<|assistant|>\n"))

# Phi-4: <|im_start|>ROLE<|im_sep|>TEXT<|im_end|> with no newline; messages of other roles are left out; no BOS.
PHI_4 = ("{% for message in messages %}"
         "{% if message['role'] in ('system', 'user', 'assistant') %}"
         "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
         "{% endif %}"
         "{% endfor %}"
         + _generation("<|im_start|>assistant<|im_sep|>"))

# ---------------------------------------------------------------------------------------------- plain-text prefixes


def _prefixed(name: str, after_system: str, user: tuple[str, str], assistant: tuple[str, str],
              generation: str) -> str:
    """BOS, the system text (the first message's, else the default) + after_system, then user turns as
    user[0] + TEXT + user[1] and assistant turns as assistant[0] + TEXT + EOS + assistant[1]."""
    return ("{{ bos_token }}"
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system, turns = messages[0]['content'], messages[1:] %}"
            "{% else %}"
            "{% set system, turns = default_system, messages %}"
            "{% endif %}"
            "{{ system + " + jinja_string(after_system) + " }}"
            "{% for message in turns %}"
            "{% if message['role'] == 'user' %}"
            "{{ " + jinja_string(user[0]) + " + message['content'] + " + jinja_string(user[1]) + " }}"
            "{% elif message['role'] == 'assistant' %}"
            "{{ " + jinja_string(assistant[0]) + " + message['content'] + eos_token + " + jinja_string(assistant[1])
            + " }}"
            "{% else %}" + _rejected_role(name, "system (first), user, assistant") + "{% endif %}"
            "{% endfor %}"
            + _generation(generation))


UNSLOTH = _prefixed("unsloth", "\n", (">>> User: ", "\n"), (">>> Assistant: ", "\n"), ">>> Assistant: ")
VICUNA = _prefixed("vicuna", " ", ("USER: ", " "), ("ASSISTANT: ", ""), "ASSISTANT:")
VICUNA_OLD = _prefixed("vicuna_old", "\n", ("### Human: ", "\n"), ("### Assistant: ", "\n"), "### Assistant:")
ALPACA = _prefixed("alpaca", "\n\n", ("### Instruction:\n", "\n\n"), ("### Response:\n", "\n\n"), "### Response:\n")

# ---------------------------------------------------------------------------------------------- the names

_LLAMA_31 = ChatFormat(template=LLAMA_31, default_system_message="")
_PHI_3 = ChatFormat(template=PHI_3, stop_word="<|end|>")
_VICUNA_OLD = ChatFormat(template=VICUNA_OLD, default_system_message=(
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."))

FORMATS: dict[str, ChatFormat] = {
    "unsloth": ChatFormat(template=UNSLOTH, default_system_message="You are a helpful assistant to the user"),
    "zephyr": ChatFormat(template=ZEPHYR),
    "chatml": ChatFormat(template=CHATML, stop_word="<|im_end|>", maps_eos=True),
    "mistral": ChatFormat(template=MISTRAL),
    "llama": ChatFormat(template=LLAMA_2),
    "vicuna": ChatFormat(template=VICUNA, default_system_message=(
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.")),
    "vicuna_old": _VICUNA_OLD,
    "vicuna old": _VICUNA_OLD,
    "alpaca": ChatFormat(template=ALPACA, default_system_message=(
        "Below are some instructions that describe some tasks. Write responses that appropriately complete each "
        "request.")),
    "llama-3": ChatFormat(template=LLAMA_3),
    "llama3": ChatFormat(template=LLAMA_3),
    "phi-3": _PHI_3,
    "phi-35": _PHI_3,
    "phi-3.5": _PHI_3,
    "llama-3.1": _LLAMA_31,
    "llama-31": _LLAMA_31,
    "llama-3.2": _LLAMA_31,
    "llama-3.3": _LLAMA_31,
    "llama-32": _LLAMA_31,
    "llama-33": _LLAMA_31,
    "phi-4": ChatFormat(template=PHI_4, stop_word="<|im_end|>"),
}

# Unsloth's other names: formats of model families fastlora_jax does not train (or, for the Qwen / Gemma / gpt-oss
# ones, with reasoning, tool or image parts beyond plain text turns).
NOT_IMPLEMENTED = ("gemma", "gemma_chatml", "gemma2", "gemma2_chatml", "gemma-3", "gemma3", "gemma-3n", "gemma3n",
                   "gemma-4", "gemma4", "gemma-4-thinking", "gemma4-thinking", "qwen-2.5", "qwen-25", "qwen25",
                   "qwen2.5", "qwen-3", "qwen3", "qwen3-instruct", "qwen3-thinking", "gpt-oss", "gptoss", "lfm-2",
                   "lfm-2.5", "starling", "yi-chat")


def chat_format(name: str) -> ChatFormat:
    """The format Unsloth names `name` (names are exact, as Unsloth's); ValueError for the others."""
    if name in FORMATS:
        return FORMATS[name]
    accepted = ", ".join(repr(n) for n in FORMATS)
    if name in NOT_IMPLEMENTED:
        raise ValueError(f"chat_template={name!r} is one of Unsloth's templates that fastlora_jax does not implement "
                         f"(it trains Llama-architecture models); accepted: {accepted}, or a (template, stop_word) "
                         "tuple")
    raise ValueError(f"chat_template={name!r} is not a template name Unsloth knows; accepted: {accepted}, or a "
                     "(template, stop_word) tuple")


# ---------------------------------------------------------------------------------------------- get_chat_template

_SHAREGPT_KEYS = ("role", "content", "user", "assistant")


def get_chat_template(tokenizer, chat_template: str | tuple[str, str] = "chatml", mapping: dict | None = None,
                      map_eos_token: bool = True, system_message: str | None = None):
    """Unsloth's `get_chat_template`: sets `tokenizer.chat_template` to a chat format's Jinja template and returns
    the tokenizer: the same object, changed in place, except where map_eos_token maps the EOS (Unsloth rebuilds the
    tokenizer there): then a copy, the tokenizer passed left as it was.

    chat_template: one of Unsloth's names for a Llama-family or plain-text format (`chat_template_formats.FORMATS`:
    "llama-3" / "llama3", "llama-3.1" / "llama-31" / "llama-3.2" / "llama-3.3" / "llama-32" / "llama-33", "chatml",
    "zephyr", "mistral", "llama" (Llama 2), "alpaca", "vicuna", "vicuna_old", "unsloth", "phi-3" / "phi-3.5",
    "phi-4"), exact as Unsloth's; Unsloth's other names (Gemma, Qwen, ...) raise ValueError. Or a (template,
    stop_word) tuple: a Jinja template of your own, its "{system_message}" filled verbatim with system_message
    (then required), map_eos_token ignored (as Unsloth).
    mapping: {"role": ..., "content": ..., "user": ..., "assistant": ...} for ShareGPT rows ({"from": "human",
    "value": ...}): a conversation whose first message has no "role" key is read through it, so it renders as the
    same conversation in "role"/"content" rows does. (Unsloth rewrites the template's keys instead, so a template
    that writes the role itself, llama-3.1's, writes ShareGPT's "human" / "gpt" there.)
    map_eos_token: as Unsloth, only "chatml" maps its end of turn (<|im_end|>) to the EOS, as Unsloth does it: the
    EOS token keeps its id (and its trained embedding) and is renamed <|im_end|>, so the template's <|im_end|>
    tokenizes to it (Llama 3: <|eot_id|>'s id); where <|im_end|> is a token already, the two tokens swap spellings.
    The vocabulary keeps its size and every special token its id; a pad that was the EOS is renamed with it.
    Needs a fast (tokenizers) tokenizer. Unsloth maps ChatML's EOS even when map_eos_token=False is passed (each of
    its templates fixes the choice); here False keeps the tokenizer's EOS and writes <|im_end|> as given.
    system_message: replaces the format's default system text ("alpaca", "vicuna", "vicuna_old", "unsloth" write
    one when the conversation starts without a system message; "llama-3.1" writes "" after its date lines); for a
    format with none it is ignored with a warning, as Unsloth.
    """
    if not isinstance(map_eos_token, bool):
        raise TypeError(f"map_eos_token={map_eos_token!r}; accepted: True or False")
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(f"tokenizer is a {type(tokenizer).__name__}; accepted: a transformers tokenizer")
    if isinstance(chat_template, (tuple, list)):
        if len(chat_template) != 2 or not all(isinstance(x, str) for x in chat_template):
            raise ValueError(f"chat_template={chat_template!r}; accepted: a name, or a (template, stop_word) tuple "
                             "of two strings")
        template = _custom_system_message(chat_template[0], system_message)
        stop_word = None
    elif isinstance(chat_template, str):
        found = chat_format(chat_template)
        template = found.template
        if found.default_system_message is not None:
            default = found.default_system_message if system_message is None else system_message
            template = system_prelude(default) + template
        elif system_message is not None:
            warnings.warn(f"get_chat_template: the {chat_template!r} template has no default system message, so "
                          "system_message is ignored; put a system message in the conversations", stacklevel=2)
        stop_word = found.stop_word if map_eos_token and found.maps_eos else None
    else:
        raise TypeError(f"chat_template of type {type(chat_template).__name__}; accepted: a template name or a "
                        "(template, stop_word) tuple")
    sharegpt = _sharegpt_mapping(mapping)
    if sharegpt is not None:
        template = sharegpt_prelude(*sharegpt) + template
    if stop_word is not None:
        tokenizer = _with_eos(tokenizer, stop_word, chat_template)
    tokenizer.chat_template = template
    return tokenizer


def _custom_system_message(template: str, system_message: str | None) -> str:
    if "{system_message}" in template:
        if system_message is None:
            raise ValueError("get_chat_template: the template holds {system_message}; pass system_message= to fill it")
        return template.replace("{system_message}", system_message)
    if system_message is not None:
        warnings.warn("get_chat_template: the template holds no {system_message}, so system_message is ignored",
                      stacklevel=3)
    return template


def _sharegpt_mapping(mapping) -> tuple[str, str, str, str] | None:
    """The (role, content, user, assistant) names of `mapping`; None for the identity mapping."""
    if mapping is None:
        return None
    if not isinstance(mapping, dict):
        raise TypeError(f"mapping of type {type(mapping).__name__}; accepted: a dict with the keys {_SHAREGPT_KEYS}")
    missing = [k for k in _SHAREGPT_KEYS if k not in mapping]
    if missing:
        raise ValueError(f"mapping={mapping!r} lacks {missing}; accepted: a dict with the keys {_SHAREGPT_KEYS}, "
                         "e.g. {'role': 'from', 'content': 'value', 'user': 'human', 'assistant': 'gpt'}")
    names = tuple(mapping[k] for k in _SHAREGPT_KEYS)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"mapping={mapping!r}: its values must be strings")
    return None if names == _SHAREGPT_KEYS else names


def _with_eos(tokenizer, stop_word: str, chat_template: str):
    """A copy of `tokenizer` whose EOS token, at the same id, is spelled `stop_word` (Unsloth's map_eos_token): the
    EOS token is renamed, or, where `stop_word` is a token already, the two swap spellings. Every special token keeps
    its id; the vocabulary keeps its size."""
    eos = getattr(tokenizer, "eos_token", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if eos is None or backend is None:
        raise ValueError(f"get_chat_template: map_eos_token=True renames the EOS token to {stop_word!r}, the end of "
                         f"a {chat_template!r} turn, which needs a fast (tokenizers) tokenizer with an EOS; this one "
                         f"is a {type(tokenizer).__name__} with EOS {eos!r}. Pass map_eos_token=False")
    if stop_word == eos:
        return copy.deepcopy(tokenizer)
    swap = {eos: stop_word, stop_word: eos}
    state = json.loads(backend.to_str())
    for token in state["added_tokens"]:
        token["content"] = swap.get(token["content"], token["content"])
    vocab = state["model"].get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        state["model"]["vocab"] = {swap.get(piece, piece): i for piece, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        state["model"]["vocab"] = [[swap.get(piece, piece), *rest] for piece, *rest in vocab]
    state["post_processor"] = _respelled(state.get("post_processor"), swap)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    renamed = copy.deepcopy(tokenizer)
    renamed._tokenizer = type(backend).from_str(json.dumps(state))
    if renamed.backend_tokenizer is not renamed._tokenizer:
        raise RuntimeError(f"get_chat_template: {type(tokenizer).__name__} keeps its tokenizers backend elsewhere "
                           "than _tokenizer; pass map_eos_token=False")
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, str) and value in swap:
            setattr(renamed, name, swap[value])
    moved = {t: i for t, i in ids.items() if renamed.convert_tokens_to_ids(swap.get(t, t)) != i}
    if moved or len(renamed) != len(tokenizer) or renamed.eos_token_id != tokenizer.eos_token_id:
        raise RuntimeError(f"get_chat_template: renaming {eos!r} to {stop_word!r} moved special tokens {moved} or "
                           f"the vocabulary size ({len(tokenizer)} -> {len(renamed)})")
    return renamed


def _respelled(tree, swap: dict[str, str]):
    """`tree` (a post-processor's JSON) with every string that is a key of `swap` replaced by its value."""
    if isinstance(tree, str):
        return swap.get(tree, tree)
    if isinstance(tree, list):
        return [_respelled(x, swap) for x in tree]
    if isinstance(tree, dict):
        return {swap.get(k, k): _respelled(v, swap) for k, v in tree.items()}
    return tree
