"""A deterministic pseudo-tokenizer for the SGLang **simulator** (no real vocabulary).

ASCII text is cut into pieces of up to :data:`CHARS_PER_TOKEN` characters (about what
Llama-2's tokenizer averages on English), each mapped to a stable hashed id. Another
character of the Basic Multilingual Plane is a token of its own (Llama-2 knows most
letters and common CJK characters singly). A character beyond it (emoji, rare CJK)
becomes one token per UTF-8 byte, as Llama-2's SentencePiece byte fallback does for
characters outside its vocabulary — one character, four tokens — so a client that
assumes "one character is at least one token" overflows the context here as it would
on a real checkpoint.
Ids follow Llama-2's layout: 0-2 ``<unk>``, ``<s>``, ``</s>``; 3-258 the byte tokens
``<0x00>``-``<0xFF>``; pieces above.

Pieces are cut from the text's start, so the tokenizer is concatenation-friendly: a
prompt that extends an earlier prompt shares all of the earlier prompt's full pieces,
which is what the simulated prefix cache needs. Counts are used for
``prompt_tokens``/``completion_tokens``, context-length checks and latency.
"""

from __future__ import annotations

import bisect
import collections
import functools
import hashlib
import re
from collections.abc import Sequence

__all__ = ["BOS_TOKEN_ID", "CHARS_PER_TOKEN", "EOS_TOKEN_ID", "PseudoTokenizer", "VOCAB_SIZE"]

CHARS_PER_TOKEN = 4
VOCAB_SIZE = 32000
UNK_TOKEN_ID = 0
BOS_TOKEN_ID = 1
#: Llama-2's end-of-sequence id, reported as ``finish_reason.matched`` when a continuation ends naturally.
EOS_TOKEN_ID = 2
_FIRST_BYTE_ID = 3
_FIRST_PIECE_ID = _FIRST_BYTE_ID + 256
#: What ``_tokenize`` cuts a text into first: runs of ASCII, and single other characters.
_RUN = re.compile("[\\x00-\\x7f]+|[^\\x00-\\x7f]")
#: Texts a :class:`PseudoTokenizer` remembers having registered the pieces of (see ``encode``).
_REGISTERED_TEXTS = 256


@functools.lru_cache(maxsize=65536)
def _piece_id(piece: str) -> int:
    digest = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return _FIRST_PIECE_ID + int.from_bytes(digest, "big") % (VOCAB_SIZE - _FIRST_PIECE_ID)


@functools.lru_cache(maxsize=256)
def _tokenize(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Token ids and, for each token, the character offset where the text it completes ends."""
    ids: list[int] = []
    ends: list[int] = []
    for match in _RUN.finditer(text):
        run, start, end = match.group(), match.start(), match.end()
        if run.isascii():  # pieces of CHARS_PER_TOKEN characters from the run's start
            ids.extend(map(_piece_id, [run[i : i + CHARS_PER_TOKEN] for i in range(0, len(run), CHARS_PER_TOKEN)]))
            ends.extend(range(start + CHARS_PER_TOKEN, end, CHARS_PER_TOKEN))
            ends.append(end)
        elif ord(run) <= 0xFFFF:
            ids.append(_piece_id(run))
            ends.append(end)
        else:
            encoded = run.encode("utf-8", "surrogatepass")
            ids.extend(_FIRST_BYTE_ID + byte for byte in encoded)
            # A character's text is out only with its last byte token.
            ends.extend([start] * (len(encoded) - 1) + [end])
    return tuple(ids), tuple(ends)


class PseudoTokenizer:
    """Hashed ids for ASCII pieces and other BMP characters, byte tokens beyond; remembers pieces to decode them."""

    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}
        # The last texts whose pieces went into ``_pieces``: registering a text again changes
        # nothing (the first text of an id wins), and the simulator sees the same prompts
        # over and over, so a repeat skips the walk over its tokens. Bounded LRU.
        self._registered: collections.OrderedDict[str, None] = collections.OrderedDict()

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (no BOS token is added)."""
        ids, ends = _tokenize(text)
        if text in self._registered:
            self._registered.move_to_end(text)
        else:
            self._register(text, ids, ends)
        return list(ids)

    def _register(self, text: str, ids: tuple[int, ...], ends: tuple[int, ...]) -> None:
        """Remember the text of each piece of ``text`` (for ``decode``), unless its id has one already."""
        start = 0
        for token_id, end in zip(ids, ends, strict=True):
            if token_id >= _FIRST_PIECE_ID:
                self._pieces.setdefault(token_id, text[start:end])
            start = end
        self._registered[text] = None
        if len(self._registered) > _REGISTERED_TEXTS:
            self._registered.popitem(last=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``; special tokens are skipped, byte runs decode as UTF-8, unknown ids as U+FFFD."""
        out: list[str] = []
        pending = bytearray()
        for token_id in ids:
            if _FIRST_BYTE_ID <= token_id < _FIRST_PIECE_ID:
                pending.append(token_id - _FIRST_BYTE_ID)
                continue
            if pending:
                out.append(pending.decode("utf-8", "replace"))
                pending.clear()
            if token_id >= _FIRST_PIECE_ID:
                out.append(self._pieces.get(token_id, "\ufffd"))
        if pending:
            out.append(pending.decode("utf-8", "replace"))
        return "".join(out)

    @staticmethod
    def count(text: str) -> int:
        """Number of tokens ``text`` encodes to."""
        return len(_tokenize(text)[0])

    @staticmethod
    def text_through(text: str, tokens: int) -> str:
        """The text that is out after the first ``tokens`` tokens of ``text``."""
        if tokens <= 0:
            return ""
        ends = _tokenize(text)[1]
        return text if tokens >= len(ends) else text[: ends[tokens - 1]]

    @staticmethod
    def tokens_through(text: str, char_end: int) -> int:
        """How many tokens of ``text`` must be generated before its first ``char_end`` characters are out."""
        if char_end <= 0:
            return 0
        ends = _tokenize(text)[1]
        return bisect.bisect_left(ends, char_end) + 1
