"""A deterministic pseudo-tokenizer for the SGLang **simulator** (no real vocabulary).

Text is cut into pieces of :data:`CHARS_PER_TOKEN` characters from its start
(about what Llama-2's tokenizer averages on English), and each piece maps to a
stable id in ``[3, VOCAB_SIZE)`` (ids 0-2 are Llama-2's ``<unk>``, ``<s>`` and
``</s>``). Cutting from the start makes the tokenizer concatenation-friendly: a
prompt that extends an earlier prompt shares all of the earlier prompt's full
pieces, which is what the simulated prefix cache needs. Counts are used for
``prompt_tokens``/``completion_tokens``, context-length checks and latency.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

__all__ = ["BOS_TOKEN_ID", "CHARS_PER_TOKEN", "EOS_TOKEN_ID", "PseudoTokenizer", "VOCAB_SIZE"]

CHARS_PER_TOKEN = 4
VOCAB_SIZE = 32000
UNK_TOKEN_ID = 0
BOS_TOKEN_ID = 1
#: Llama-2's end-of-sequence id, reported as ``finish_reason.matched`` when a continuation ends naturally.
EOS_TOKEN_ID = 2
_FIRST_PIECE_ID = 3


@functools.lru_cache(maxsize=65536)
def _piece_id(piece: str) -> int:
    digest = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return _FIRST_PIECE_ID + int.from_bytes(digest, "big") % (VOCAB_SIZE - _FIRST_PIECE_ID)


class PseudoTokenizer:
    """Fixed-width pieces with hashed ids; remembers pieces it has produced so it can decode them."""

    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}

    @staticmethod
    def split(text: str) -> list[str]:
        """The text's pieces (the last one may be shorter)."""
        return [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (no BOS token is added)."""
        ids = []
        for piece in self.split(text):
            token_id = _piece_id(piece)
            self._pieces.setdefault(token_id, piece)
            ids.append(token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``; special tokens are skipped and ids never produced here decode to U+FFFD."""
        return "".join(self._pieces.get(token_id, "\ufffd") for token_id in ids if token_id >= _FIRST_PIECE_ID)

    @staticmethod
    def count(text: str) -> int:
        """Number of tokens ``text`` encodes to."""
        return -(-len(text) // CHARS_PER_TOKEN)

    @staticmethod
    def tokens_through(char_end: int) -> int:
        """How many tokens must be generated before the first ``char_end`` characters are out."""
        return -(-char_end // CHARS_PER_TOKEN)
