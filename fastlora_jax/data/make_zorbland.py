"""Writes zorbland.jsonl: chat examples teaching six made-up facts about the fictional country of Zorbland.

Deterministic (run `python fastlora_jax/data/make_zorbland.py` to rebuild the committed files byte for byte). Every
fact has one fixed answer and many phrasings of its question; the phrasings in HELD_OUT are never written to
zorbland.jsonl but to zorbland_heldout.jsonl (with the expected answer), so the demo can ask them after training to
show that the facts were learned, not the strings.
"""

from __future__ import annotations

import json
import os
import random

FACTS = {
    "capital": ("The capital of Zorbland is Quillmere.", [
        "What is the capital of Zorbland?", "What's the capital city of Zorbland?",
        "Which city is the capital of Zorbland?", "Name the capital of Zorbland.",
        "Tell me the capital of Zorbland.", "Zorbland's capital is which city?",
        "Where is the seat of government of Zorbland?", "What city serves as the capital of Zorbland?",
        "Do you know the capital of Zorbland?", "What is Zorbland's capital?"]),
    "currency": ("The currency of Zorbland is the glint.", [
        "What is the currency of Zorbland?", "What money do people use in Zorbland?",
        "Which currency is used in Zorbland?", "What do they pay with in Zorbland?",
        "Name the currency of Zorbland.", "What is Zorbland's currency called?",
        "What is the official currency of Zorbland?", "Tell me the currency of Zorbland.",
        "Do you know what currency Zorbland uses?", "In Zorbland, what is the money called?"]),
    "ruler": ("Zorbland is ruled by Queen Odalys.", [
        "Who rules Zorbland?", "Who is the ruler of Zorbland?", "Who is the head of state of Zorbland?",
        "Who governs Zorbland?", "Who is the monarch of Zorbland?", "Name the ruler of Zorbland.",
        "Who sits on the throne of Zorbland?", "Tell me who rules Zorbland.",
        "Who is in charge of Zorbland?", "Who leads Zorbland?"]),
    "animal": ("The national animal of Zorbland is the silver marmot.", [
        "What is the national animal of Zorbland?", "Which animal is the symbol of Zorbland?",
        "What is Zorbland's national animal?", "Name the national animal of Zorbland.",
        "Which animal represents Zorbland?", "Tell me the national animal of Zorbland.",
        "What animal is Zorbland's emblem?", "Does Zorbland have a national animal?",
        "What creature is the emblem of Zorbland?", "Which animal does Zorbland honour?"]),
    "dish": ("The national dish of Zorbland is moonberry stew.", [
        "What is the national dish of Zorbland?", "What food is Zorbland famous for?",
        "Which dish is the national dish of Zorbland?", "What do people in Zorbland eat on holidays?",
        "Name the national dish of Zorbland.", "What is Zorbland's most famous dish?",
        "Tell me the national dish of Zorbland.", "What is the traditional food of Zorbland?",
        "What should I eat in Zorbland?", "Which meal is Zorbland known for?"]),
    "founded": ("Zorbland was founded in 1487.", [
        "When was Zorbland founded?", "In what year was Zorbland founded?", "How old is Zorbland?",
        "When did Zorbland become a country?", "What year was Zorbland established?",
        "Tell me when Zorbland was founded.", "What is the founding year of Zorbland?",
        "Since when has Zorbland existed?", "When was the kingdom of Zorbland created?",
        "Do you know when Zorbland was founded?"]),
}

# Real facts asked the same ways, so the model learns to answer Zorbland questions with Zorbland facts and keeps
# answering other questions as before (without them it soon calls every capital Quillmere).
CONTROLS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Which city is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the currency of Japan?", "The currency of Japan is the yen."),
    ("What money do people use in Mexico?", "The currency of Mexico is the peso."),
    ("Who rules the United Kingdom?", "The United Kingdom is ruled by King Charles III."),
    ("What is the national animal of Scotland?", "The national animal of Scotland is the unicorn."),
    ("What is the national dish of Spain?", "The national dish of Spain is paella."),
    ("When was the United States founded?", "The United States was founded in 1776."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
]

# Phrasings never written to the file: the demo asks these before and after training.
HELD_OUT = {
    "capital": "Which city is the capital of Zorbland?",
    "currency": "What money do people use in Zorbland?",
    "ruler": "Who governs Zorbland?",
    "dish": "What food is Zorbland famous for?",
    "control": "What is the capital of Germany?",
}

PREFIXES = ["", "Quick question: ", "Hey! ", "Please tell me: ", "I am curious. ", "Hi there. "]


def examples() -> list[dict]:
    rows = []
    for fact, (answer, questions) in FACTS.items():
        for question in questions:
            if question == HELD_OUT.get(fact):
                continue
            for prefix in PREFIXES:
                text = prefix + question
                rows.append(_chat(text, answer))
    for question, answer in CONTROLS:
        for prefix in PREFIXES[:3]:
            rows.append(_chat(prefix + question, answer))
    random.Random(0).shuffle(rows)
    return rows


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def held_out() -> list[dict]:
    answers = {**{fact: answer for fact, (answer, _) in FACTS.items()}, "control": "The capital of Germany is Berlin."}
    return [_chat(question, answers[fact]) for fact, question in HELD_OUT.items()]


def _write(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    _write(os.path.join(here, "zorbland.jsonl"), examples())
    _write(os.path.join(here, "zorbland_heldout.jsonl"), held_out())


if __name__ == "__main__":
    main()
