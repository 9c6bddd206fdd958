"""Split a reasoning model's output into its reasoning and its answer, as the DeepSeek API does: the text of the
leading `<think>...</think>` block is `reasoning_content`, the rest is `content`.

Pure string work, incremental: `feed(delta)` returns the (reasoning, content) pieces that delta completes and
holds back what could still be the start of a tag (a tag may arrive split across deltas), so the pieces of a
stream join to the pieces of the whole text fed at once.
"""


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (a tag that may be arriving)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """in_reasoning: the prompt already opened the think block (DeepSeek-R1's template ends with `<think>\\n`), so
    the output starts inside it and only closes it. Otherwise the output is reasoning only if it opens with the
    start tag. Only the first think block is reasoning; whitespace around the reasoning and before the answer is
    dropped. A think block never closed (max_tokens reached) leaves all of the text as reasoning."""

    def __init__(self, in_reasoning: bool = False, start: str = "<think>", end: str = "</think>"):
        self.start, self.end = start, end
        self.state = "reasoning" if in_reasoning else "start"  # start -> reasoning -> content, or start -> content
        self._buf = ""  # text held back: a possible partial tag, or whitespace that may precede `end`
        self._section_started = False  # leading whitespace of the reasoning and of the answer is dropped

    def feed(self, delta: str) -> tuple[str, str]:
        """The reasoning and content text that delta completes (either may be empty)."""
        self._buf += delta
        reasoning = content = ""
        if self.state == "start":
            head = self._buf.lstrip()
            if head.startswith(self.start):
                self.state, self._buf = "reasoning", head[len(self.start):]
            elif self.start.startswith(head):
                return "", ""  # whitespace, or the start tag arriving
            else:  # no think block: all of it is the answer, exactly as generated
                self.state, self._section_started = "content", True
        if self.state == "reasoning":
            i = self._buf.find(self.end)
            if i < 0:
                # hold back a partial end tag and trailing whitespace (dropped if `end` follows)
                keep = len(self._buf) - _partial_tag_len(self._buf, self.end)
                keep = len(self._buf[:keep].rstrip())
                reasoning, self._buf = self._lead(self._buf[:keep]), self._buf[keep:]
                return reasoning, ""
            reasoning = self._lead(self._buf[:i].rstrip())
            self.state, self._section_started, self._buf = "content", False, self._buf[i + len(self.end):]
        if self.state == "content":
            content, self._buf = self._lead(self._buf), ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Release what is held back at the end of the output."""
        buf, self._buf = self._buf, ""
        if self.state == "start":  # only whitespace or part of the start tag came: that is the answer
            self.state = "content"
            return "", buf
        if self.state == "reasoning":
            return self._lead(buf.rstrip()), ""
        return "", ""

    def _lead(self, text: str) -> str:
        if not self._section_started:
            text = text.lstrip()
            self._section_started = bool(text)
        return text

    def parse(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of a whole output."""
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        return r1 + r2, c1 + c2
