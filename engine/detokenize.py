"""Text of a sample's tokens as they come, and stop strings matched on that text.

Decoding every token alone goes wrong twice: a byte-level token may hold part of a UTF-8
character (decoded alone it is U+FFFD), and SentencePiece tokenizers drop a token's leading space
when it starts the decoded span. So each step decodes a short window of the last tokens twice,
with and without the new ones, and takes the difference (the way vLLM's detokenizer does); text
that still ends in U+FFFD waits for the bytes that complete it.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """`add(token)` takes one generated token and says whether a stop string has ended the text;
    `text` is the text so far (without the stop string and what follows it); `take()` returns the
    text not taken before that can no longer change: held back are an incomplete UTF-8 character
    and, while the sample runs, a tail that may be the start of a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string ended the text
        self.finished = False
        self._window = 0  # ids[_window:_read] were decoded as the last window
        self._read = 0
        self._taken = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def add(self, token: int) -> bool:
        if self.finished:
            raise ValueError("this text stream is finished")
        self.ids.append(int(token))
        before = self._decode(self.ids[self._window:self._read])
        after = self._decode(self.ids[self._window:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            searched_from = max(0, len(self.text) - self._hold)
            self.text += after[len(before):]
            self._window, self._read = self._read, len(self.ids)
            if self.stop:
                hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self.stopped = self.finished = True
        return self.stopped

    def finish(self) -> None:
        """The sample ended (not by a stop string): what is left undecoded joins the text as it is."""
        if not self.finished and self._read < len(self.ids):
            before = self._decode(self.ids[self._window:self._read])
            self.text += self._decode(self.ids[self._window:])[len(before):]
            self._read = len(self.ids)
        self.finished = True

    def take(self) -> str:
        end = len(self.text) if self.finished else max(self._taken, len(self.text) - self._hold)
        delta, self._taken = self.text[self._taken:end], end
        return delta
