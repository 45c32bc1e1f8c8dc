"""The inputs the real-model suite runs on each real model (one home for the tests, the golden
script and the benchmark): strings to tokenize, prompts to continue greedily, the logits prompt."""

from __future__ import annotations

from typing import Final

#: varied strings for tokenizer agreement: words, code, numbers, whitespace runs, accents,
#: CJK, emoji, byte-fallback material and text that looks like special tokens
TOKENIZE_STRINGS: Final = (
    "Hello world",
    " Hello world",
    "Hello  world\n\n\tand\r\nmore   spaces   ",
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "3.14159 1,000,000 2026-12-05 0x1F $42.50 100%",
    "Ünïcödé façade naïve coöperate Straße",
    "日本語のテキストと中文文本",
    "emoji 🎉🚀👍🏽 and ✓ ✗",
    "Привет, мир! Γειά σου κόσμε",
    "<|im_start|>user\nhi<|im_end|> <start_of_turn>model",
    "a" * 40,
    "\u200b zero\u200dwidth \ufeff",
    "I'm can't we'll they've it's",
    "   leading and trailing   ",
)

#: prompts continued greedily (argmax, no penalty) for GREEDY_TOKENS tokens
GREEDY_PROMPTS: Final = (
    "The capital of France is",
    "def add(a, b):\n",
    "Once upon a time, there was a",
)
GREEDY_TOKENS: Final = 24

#: the prompt whose logits are compared at every position (tokenized with BOS, cut to 64 ids)
LOGITS_TEXT: Final = (
    "Water boils at one hundred degrees Celsius at sea level, but at higher altitudes the "
    "air pressure is lower, so it boils at a lower temperature. This is why cooking pasta "
    "in the mountains takes longer. Scientists measure pressure in pascals, and one "
    "atmosphere is about 101325 pascals, which"
)
LOGITS_TOKENS: Final = 64
