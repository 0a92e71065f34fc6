"""GGUF (llama.cpp) vocabularies <-> transformers tokenizers: read a file's byte-level BPE tokenizer, write one.

Reading rebuilds `tokenizer.ggml.*` metadata as a `PreTrainedTokenizerFast` exactly as transformers' GGUF loader
does (no torch needed); vocabularies other than byte-level BPE are left to transformers. Writing stores a
transformers byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary with its chat template.
`fastlora_jax.converters.gguf` re-exports every name here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _field_value(field: Any) -> Any:
    """A GGUFReader field as a Python value: str, int, float, bool or a list of those."""
    import gguf

    types = field.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


# --- reading ----------------------------------------------------------------------------------------------------

# llama.cpp's `tokenizer.ggml.pre` names whose pre-tokenizer splits text with Llama 3's regex (as transformers maps
# them); other byte-level names use GPT-2's split, except the ones transformers maps to other regexes, which we
# leave to transformers itself.
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
              "jina-v5-nano", "dbrx", "smaug-bpe")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_OTHER_SPLIT_PRE = ("tekken", "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "qwen35", "gpt-4o",
                    "llama4", "kanana2", "talkie", "minimax-m2")
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tokenizer_metadata(reader: Any) -> dict[str, Any]:
    return {key[len("tokenizer."):]: _field_value(field) for key, field in reader.fields.items()
            if key.startswith("tokenizer.")}


def load_gguf_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer a GGUF file describes, with its chat template; None when it holds none.

    Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`, Llama 3, SmolLM) are rebuilt here with the
    `tokenizers` library exactly as transformers' GGUF loader builds them, with no torch needed; other vocabularies
    (SentencePiece "llama", ...) are left to `AutoTokenizer.from_pretrained(dir, gguf_file=name)`.
    """
    import gguf

    return _tokenizer_from_reader(gguf.GGUFReader(path, "r"), Path(path))


def _tokenizer_from_reader(reader: Any, path: Path):
    md = _tokenizer_metadata(reader)
    if "ggml.tokens" not in md:
        return None
    if md.get("ggml.model") != "gpt2" or md.get("ggml.pre") in _OTHER_SPLIT_PRE:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _byte_level_tokenizer(md)


def _byte_level_tokenizer(md: dict[str, Any]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = md["ggml.tokens"]
    types: list[int] = md.get("ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in md.get("ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    if md.get("ggml.pre") in LLAMA3_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Control tokens whole and special; user-defined ones whole but not special (llama.cpp matches both whole).
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel and is left out.
    backend.add_special_tokens([AddedToken(tok, normalized=False, special=True)
                                for tok, kind in zip(tokens, types)
                                if kind == TOKEN_CONTROL and set(tok) <= alphabet])
    backend.add_tokens([AddedToken(tok, normalized=False, special=False)
                        for tok, kind in zip(tokens, types) if kind == TOKEN_USER_DEFINED and tok in vocab])

    def special(key: str) -> str | None:
        token_id = md.get(f"ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_bos, add_eos = bool(md.get("ggml.add_bos_token", False)), bool(md.get("ggml.add_eos_token", False))
    single = " ".join([*([f"{bos}:0"] if add_bos and bos else []), "$A:0", *([f"{eos}:0"] if add_eos and eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if add_bos and bos else []), "$B:1",
                                    *([f"{eos}:1"] if add_eos and eos else [])])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t in {bos, eos} if t and (add_bos or add_eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=special("unknown_token_id"),
        pad_token=special("padding_token_id"), add_bos_token=add_bos, add_eos_token=add_eos,
        chat_template=md.get("chat_template"), clean_up_tokenization_spaces=False,
    )


# --- writing ----------------------------------------------------------------------------------------------------


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, cfg: dict[str, Any]) -> None:
    """Writes a transformers byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary, with its chat template."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = state["model"], state.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or (state.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"only byte-level BPE tokenizers are written to GGUF; this one has a "
                         f"{model.get('type')} model and a {(state.get('decoder') or {}).get('type')} decoder")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        pre_name = "gpt-2"
    elif (pre.get("type") == "Sequence" and len(pre["pretokenizers"]) == 2
          and pre["pretokenizers"][0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT):
        pre_name = "llama-bpe"
    else:
        raise ValueError(f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name here; supported: GPT-2's "
                         f"byte-level split ('gpt-2') and Llama 3's split ('llama-bpe')")
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i]["special"]
                         else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{attr}_token_id", None)
        token_id = token_id if token_id is not None else cfg.get(f"{attr}_token_id")
        if isinstance(token_id, int):
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": name, "template": t} for name, t in template.items()]
    if template:
        writer.add_chat_template(template)
