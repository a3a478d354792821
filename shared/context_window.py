"""How much of the context window a prompt may take, counted without a tokenizer.

Llama-2's tokenizer falls back to bytes for characters outside its vocabulary (emoji,
rare CJK: one character, several tokens), so the only tokenizer-free bound that holds
is one token per UTF-8 byte. The LLM step uses these bounds to skip ``/tokenize`` for
prompts that cannot be too long and to cut prompts where no ``/tokenize`` exists; the
gateway uses :func:`prompt_budget` to refuse a task whose output budget leaves no room.
"""

from __future__ import annotations

__all__ = [
    "MIN_PROMPT_TOKENS",
    "PROMPT_OVERHEAD_TOKENS",
    "PromptDoesNotFit",
    "cut_text_to_tokens",
    "max_prompt_tokens",
    "prompt_budget",
]

#: Tokens a prompt may take beyond one per UTF-8 byte: the BOS token and SentencePiece's
#: dummy-prefix space, which can stand as a token of its own.
PROMPT_OVERHEAD_TOKENS = 2
#: The least room a task must leave its prompt: the instructions that follow the history in
#: every α-UMi template take about 50 tokens, and a prompt cut shorter is not worth sending.
MIN_PROMPT_TOKENS = 64


class PromptDoesNotFit(ValueError):
    """The output budget leaves no room for a prompt in the context window."""


def prompt_budget(context_length: int, max_new_tokens: int) -> int:
    """Tokens left for the prompt; :class:`PromptDoesNotFit` when fewer than :data:`MIN_PROMPT_TOKENS`."""
    budget = context_length - max_new_tokens
    if budget < MIN_PROMPT_TOKENS:
        raise PromptDoesNotFit(
            f"max_new_tokens {max_new_tokens} leaves {max(budget, 0)} of the {context_length}-token context for the "
            f"prompt; at least {MIN_PROMPT_TOKENS} are needed (lower max_new_tokens)"
        )
    return budget


def max_prompt_tokens(text: str) -> int:
    """An upper bound on the tokens ``text`` takes with a Llama-2-style tokenizer.

    Byte fallback turns a character outside the vocabulary into one token per UTF-8
    byte, so a token covers at least one byte — not one character (an emoji is four).
    """
    return len(text.encode("utf-8", "surrogatepass")) + PROMPT_OVERHEAD_TOKENS


def cut_text_to_tokens(text: str, budget: int) -> str:
    """The longest tail of ``text`` that cannot take more than ``budget`` tokens (cut on a character boundary)."""
    keep = max(budget - PROMPT_OVERHEAD_TOKENS, 0)
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= keep:
        return text
    # Dropping the continuation bytes of a character cut in half keeps the rest valid UTF-8.
    return encoded[len(encoded) - keep :].decode("utf-8", "ignore")
