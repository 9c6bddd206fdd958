"""The settings of a pretraining/SFT run: one dataclass, read from YAML or TOML (flat keys, as below)."""

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TrainConfig:
    # run
    mode: str = "sft"                    # "pretrain": loss on every token; "sft": on the completion only
    out_dir: str = "runs/train"          # checkpoint-<step>/ directories and log.jsonl
    resume_from: str | None = None       # a checkpoint-<step>/ directory of an earlier run with these settings
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"               # "bfloat16": autocast the forward; weights and optimizer stay float32
    # model: a directory to start from, or config.json keys for a model built from scratch
    model: str | None = None
    model_config: dict | None = None
    init_std: float = 0.02
    tokenizer: str | None = None         # defaults to `model`; required with model_config
    # data: a JSONL file of {"prompt", "completion"} or {"text"} rows, or the task suite's reference solutions
    data: str | None = None
    tasks: dict[str, float] = field(default_factory=dict)  # task name -> share of num_examples
    num_examples: int = 10_000
    max_len: int = 512
    # optimisation
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1            # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0               # 0: off
    # moe load balancing
    bias_update_speed: float = 1e-3      # gamma of the aux-loss-free bias update (noaux_tc routers); 0: off
    seq_aux_alpha: float = 0.0           # DeepSeek-V3 sequence-wise balance loss weight, summed over MoE layers
    z_loss_coef: float = 0.0             # router z-loss weight, summed over MoE layers
    # logging and checkpoints
    log_every: int = 1
    save_every: int = 0                  # 0: only at the end
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.mode not in ("pretrain", "sft"):
            raise ValueError(f"mode must be 'pretrain' or 'sft', got {self.mode!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if (self.model is None) == (self.model_config is None) and self.resume_from is None:
            raise ValueError("give exactly one of model (a directory) and model_config (config.json keys)")
        if self.model_config is not None and self.tokenizer is None and self.resume_from is None:
            raise ValueError("a model built from model_config needs a tokenizer directory")
        if (self.data is None) == (not self.tasks):
            raise ValueError("give exactly one of data (a JSONL file) and tasks (task name -> weight)")
        for name in ("steps", "batch_size", "grad_accum", "max_len", "num_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """Read a TrainConfig from .yaml/.yml or .toml; unknown keys are an error. `overrides` win over the file."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml
        raw = yaml.safe_load(path.read_text()) or {}
    elif path.suffix == ".toml":
        raw = tomllib.loads(path.read_text())
    else:
        raise ValueError(f"{path}: config must be .yaml, .yml or .toml")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    raw |= overrides
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return TrainConfig(**raw)
