"""Tokenizers: a byte-level one built in-process (no downloads), or a local Hugging Face one."""

from __future__ import annotations

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then pad = 256, bos = 257, eos = 258 (vocab_size 259)."""

    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """Caption text -> ids, without BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Ids -> text; special ids are dropped, invalid UTF-8 is replaced."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer saved on disk (AutoTokenizer.from_pretrained(path, local_files_only=True)).

    It needs BOS and EOS tokens; pad falls back to EOS, which is safe: padded positions carry no loss
    and are masked from attention.
    """

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self._tok.bos_token_id is None or self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} has no BOS or EOS token; both are needed")
        self.bos_id, self.eos_id = self._tok.bos_token_id, self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | None = None):
    """The byte-level tokenizer, or the one saved at the local ``path``."""
    return ByteTokenizer() if path is None else HFTokenizer(path)
