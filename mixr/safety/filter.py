"""Input filter (keywords, regexes, length limits, a classifier hook) and the output-side streaming filter.

Rules are plain data (FilterConfig, loadable from a dict or a JSON/TOML/YAML file through SafetyConfig) so a
deployment changes them without code. Keywords match case-insensitively as whole words ("kill" does not block
"skill"); regexes match as written (add (?i) for case-insensitive ones).
"""

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Classifier = Callable[[str], "tuple[str, float] | None"]
MODES = ("error", "refusal")


@dataclass(slots=True)
class Rule:
    category: str
    name: str  # "keyword:<word>" or "regex:<pattern>": what a decision reports
    regex: re.Pattern
    max_len: int  # longest text it is meant to match: the streaming hold-back bound


@dataclass(slots=True)
class FilterConfig:
    """keywords / patterns: category -> list of words / regexes. A regex entry is a string or
    {"regex": ..., "max_len": N}; max_len (default max_match_chars) bounds the match length the stream filter
    guarantees to catch before any of it is emitted. max_prompt_chars / max_prompt_tokens: None is no limit
    (tokens need a tokenizer). classifier: a callable text -> (category, score) or None, "module:function", or
    a sequence-classifier model directory as {"model_dir": ..., "block_labels": [...], "device": ...} (the
    arguments of mixr.safety.classifier.SequenceClassifier); it blocks at score >= classifier_threshold (input
    side only). mode: how the server answers a blocked
    request: "error" (HTTP 400, code "content_filter") or "refusal" (a normal response whose text is
    refusal_message). filter_output: the same keywords/patterns also stop generated streams."""

    keywords: dict[str, list[str]] = field(default_factory=dict)
    patterns: dict[str, list] = field(default_factory=dict)
    max_prompt_chars: int | None = None
    max_prompt_tokens: int | None = None
    classifier: Classifier | str | dict | None = None
    classifier_threshold: float = 0.5
    mode: str = "error"
    refusal_message: str = "I can't help with that request."
    filter_output: bool = True
    max_match_chars: int = 64
    rules: list[Rule] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"filter mode must be one of {MODES}, got {self.mode!r}")
        for name in ("max_prompt_chars", "max_prompt_tokens"):
            if (v := getattr(self, name)) is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if self.max_match_chars < 1:
            raise ValueError(f"max_match_chars must be >= 1, got {self.max_match_chars}")
        if isinstance(self.classifier, str):  # "package.module:function", from a config file
            mod, _, fn = self.classifier.partition(":")
            self.classifier = getattr(importlib.import_module(mod), fn)
        elif isinstance(self.classifier, dict):  # a model directory, from a config file
            from mixr.safety.classifier import SequenceClassifier  # imports the model code only when used
            self.classifier = SequenceClassifier(**self.classifier)
        self.rules = []
        for cat, words in self.keywords.items():
            for w in words:
                if not w.strip():
                    raise ValueError(f"empty keyword in category {cat!r}")
                # whole word: not preceded or followed by a word character
                rx = re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE)
                self.rules.append(Rule(cat, f"keyword:{w}", rx, len(w)))
        for cat, pats in self.patterns.items():
            for p in pats:
                src, max_len = (p["regex"], p.get("max_len", self.max_match_chars)) if isinstance(p, dict) \
                    else (p, self.max_match_chars)
                try:
                    rx = re.compile(src)
                except re.error as e:
                    raise ValueError(f"bad regex {src!r} in category {cat!r}: {e}") from None
                self.rules.append(Rule(cat, f"regex:{src}", rx, max_len))


@dataclass(slots=True)
class FilterDecision:
    allowed: bool
    category: str | None = None
    rule: str | None = None
    message: str | None = None  # the refusal text for a blocked request
    score: float | None = None  # the classifier's score when it decided

    def error_body(self) -> dict:
        """The OpenAI-style error object for mode "error" (the server sends it with HTTP 400)."""
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": None,
                          "code": "content_filter"}}


def prompt_text(prompt: str | list[dict]) -> str:
    """The text of a prompt or of OpenAI-style messages (string or [{"type": "text", "text": ...}] content)."""
    if isinstance(prompt, str):
        return prompt
    parts = []
    for m in prompt:
        content = m.get("content") or ""
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [p.get("text", "") for p in content if isinstance(p, dict)]
    return "\n".join(parts)


def _blocked(cfg: FilterConfig, category: str, rule: str, score: float | None = None) -> FilterDecision:
    return FilterDecision(False, category, rule, cfg.refusal_message, score)


def check_input(prompt: str | list[dict], cfg: FilterConfig, tokenizer=None) -> FilterDecision:
    """Decide on a prompt (text or chat messages): length limits, then rules in order, then the classifier."""
    text = prompt_text(prompt)
    if cfg.max_prompt_chars is not None and len(text) > cfg.max_prompt_chars:
        return _blocked(cfg, "length", "max_prompt_chars")
    if cfg.max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer")
        if len(tokenizer.encode(text, add_special_tokens=False)) > cfg.max_prompt_tokens:
            return _blocked(cfg, "length", "max_prompt_tokens")
    for r in cfg.rules:
        if r.regex.search(text):
            return _blocked(cfg, r.category, r.name)
    if cfg.classifier is not None and (verdict := cfg.classifier(text)) is not None:
        category, score = verdict
        if score >= cfg.classifier_threshold:
            return _blocked(cfg, category, "classifier", float(score))
    return FilterDecision(True)


class StreamFilter:
    """Output-side filter over text deltas: feed(delta) -> (text safe to emit now, stop).

    It holds back the last L-1 characters (L: the longest keyword or regex max_len), so no part of a blocked
    match of length <= L is ever emitted, even when it spans deltas. A match that ends exactly at the end of
    the text so far is not final (the next delta could extend it, or break a keyword's word boundary), so
    text from its start is held too until the next delta or finish(). On a match, everything before it is
    emitted and stop is True: the caller ends the stream with finish_reason "content_filter" (see .decision).
    Regex matches longer than their max_len are still caught, but their beginning may have been emitted."""

    def __init__(self, cfg: FilterConfig):
        self.rules = cfg.rules if cfg.filter_output else []
        self.window = max((r.max_len for r in self.rules), default=1)  # L
        self.text = ""
        self.emitted = 0
        self.decision: FilterDecision = FilterDecision(True)
        self.refusal = cfg.refusal_message

    @property
    def stopped(self) -> bool:
        return not self.decision.allowed

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += delta
        return self._scan(final=False)

    def finish(self) -> tuple[str, bool]:
        """The end of the stream: release what was held back (unless it completes a match)."""
        if self.stopped:
            return "", True
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, bool]:
        text, n = self.text, len(self.text)
        # A match of length <= L that includes unemitted text starts after emitted - L.
        start = max(0, self.emitted - self.window)
        held = n  # text from the start of an undecided match on is held
        hit = None
        for r in self.rules:
            m = r.regex.search(text, start)  # pos keeps look-behind context (unlike slicing)
            if m is None:
                continue
            if m.end() == n and not final:  # could still grow or vanish: hold it
                held = min(held, m.start())
            elif hit is None or m.start() < hit[0].start():
                hit = (m, r)
        if hit is not None:  # emit all before the match, stop
            m, r = hit
            release = min(held, m.start())
            self.decision = FilterDecision(False, r.category, r.name, self.refusal)
        else:
            release = min(held, n if final else n - (self.window - 1))
        release = max(self.emitted, release)
        out = text[self.emitted:release]
        self.emitted = release
        if len(self.text) > 4 * self.window + 4096:  # keep the buffer bounded on long streams
            cut = max(0, self.emitted - self.window - 64)
            self.text, self.emitted = self.text[cut:], self.emitted - cut
        return out, self.stopped
