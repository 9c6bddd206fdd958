"""Deployment safety layer: input and streaming output filters, response audit, text watermark.

Server hook: build a `SafetyConfig` (from_file / from_dict), then per request
`check_input(messages, cfg.filter, tokenizer)` before queueing; `cfg.apply(params)` to add the watermark;
`StreamFilter(cfg.filter)` over the text deltas (stop -> finish_reason "content_filter");
`audit_response(logprobs, token_ids, tokenizer, text, cfg.audit)` when the response ends; and
`AuditLog(cfg.audit.log_path, secrets=api_keys + cfg.secrets()).write(...)`.
"""

from mixr.safety.audit import AuditConfig, AuditLog, AuditStats, Span, audit_response, scrub, token_entropy
from mixr.safety.config import SafetyConfig
from mixr.safety.filter import FilterConfig, FilterDecision, StreamFilter, check_input, prompt_text
from mixr.safety.watermark import Detection, WatermarkConfig, detect, green_mask, is_green

__all__ = ["AuditConfig", "AuditLog", "AuditStats", "Span", "audit_response", "scrub", "token_entropy",
           "SafetyConfig", "FilterConfig", "FilterDecision", "StreamFilter", "check_input", "prompt_text",
           "Detection", "WatermarkConfig", "detect", "green_mask", "is_green"]
