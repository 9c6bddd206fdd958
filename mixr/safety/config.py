"""SafetyConfig: the filter, audit and watermark settings of one deployment, from a dict or a file.

File layout (JSON, TOML or YAML, by extension), every section optional:

    [filter]                       # FilterConfig fields
    mode = "error"                 # or "refusal"
    max_prompt_chars = 20000
    [filter.keywords]
    weapons = ["nerve agent"]
    [filter.patterns]
    pii = ['\\b\\d{3}-\\d{2}-\\d{4}\\b', {regex = 'sk-[A-Za-z0-9]{20,}', max_len = 80}]
    [audit]                        # AuditConfig fields
    log_path = "audit.jsonl"
    [watermark]                    # WatermarkConfig fields; absent: no watermark
    key = "..."
    gamma = 0.25
    delta = 2.0
"""

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mixr.safety.audit import AuditConfig
from mixr.safety.filter import FilterConfig
from mixr.safety.watermark import WatermarkConfig


def _build(cls, d: dict | None, section: str):
    d = d or {}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    if unknown := sorted(set(d) - names):
        raise ValueError(f"unknown key(s) in [{section}]: {unknown}; expected some of {sorted(names)}")
    return cls(**d)


@dataclass(slots=True)
class SafetyConfig:
    filter: FilterConfig = field(default_factory=FilterConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    watermark: WatermarkConfig | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SafetyConfig":
        if unknown := sorted(set(d) - {"filter", "audit", "watermark"}):
            raise ValueError(f"unknown safety config section(s): {unknown}")
        wm = d.get("watermark")
        return cls(_build(FilterConfig, d.get("filter"), "filter"), _build(AuditConfig, d.get("audit"), "audit"),
                   None if wm is None else _build(WatermarkConfig, wm, "watermark"))

    @classmethod
    def from_file(cls, path: str | Path) -> "SafetyConfig":
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml  # optional: only YAML configs need PyYAML
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: safety config must be .json, .toml, .yaml or .yml")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def apply(self, params):
        """SamplingParams with this deployment's watermark (unchanged when there is none)."""
        return params if self.watermark is None else dataclasses.replace(params, watermark=self.watermark)

    def secrets(self) -> list[str]:
        """Values the audit log must never contain (give the server's API keys to AuditLog as well)."""
        return [str(self.watermark.key)] if self.watermark is not None else []
