"""The settings of a pretraining/SFT run: one dataclass, read from YAML or TOML (flat keys, as below)."""

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TrainConfig:
    # run
    mode: str = "sft"                    # "pretrain": loss on every token; "sft": on the completion only;
                                         # "lora": sft of LoRA adapters; "dpo": preference pairs (mixr.train.dpo)
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
    # lora (modes "lora" and "dpo"): adapters on a frozen base; the routers and their bias stay as they are
    lora_r: int = 0                      # 0: train every weight (mode "lora" needs > 0)
    lora_alpha: float | None = None      # scale alpha / r; default 2 * lora_r
    lora_target_modules: list[str] | None = None     # nn.Linear names; default: every attention projection
    lora_target_parameters: list[str] | None = None  # expert stacks; default: experts.gate_up_proj, down_proj
    # dpo: data rows {"prompt", "chosen", "rejected"}
    dpo_beta: float = 0.1
    ref_model: str | None = None         # the frozen reference; default `model` (with LoRA: the base, adapters off)
    # logging and checkpoints
    log_every: int = 1
    save_every: int = 0                  # 0: only at the end
    progress: bool = True
    time_limit_s: float = 0.0            # > 0: stop (and save) when one more step would end past it

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.mode not in ("pretrain", "sft", "lora", "dpo"):
            raise ValueError(f"mode must be 'pretrain', 'sft', 'lora' or 'dpo', got {self.mode!r}")
        if self.mode == "lora" and self.lora_r < 1:
            raise ValueError("mode 'lora' needs lora_r >= 1 (the adapters' rank, e.g. 16)")
        if self.mode in ("pretrain", "sft") and self.lora_r:
            raise ValueError(f"lora_r is for modes 'lora' and 'dpo', not {self.mode!r}")
        if self.mode in ("lora", "dpo") and self.model is None:
            raise ValueError(f"mode {self.mode!r} needs model: the directory of the model to start from")
        if self.mode == "dpo" and self.data is None:
            raise ValueError('mode "dpo" needs data: a JSONL file of {"prompt", "chosen", "rejected"} rows')
        if self.dpo_beta <= 0:
            raise ValueError(f"dpo_beta must be > 0, got {self.dpo_beta}")
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


@dataclass
class GRPOConfig:
    """The settings of a GRPO run (mixr.train.grpo): rollouts from the engine on the task suite's train split,
    group-normalised advantages, the clipped token-level policy loss with an optional k3 KL penalty."""

    # run
    out_dir: str = "runs/grpo"           # checkpoint-<step>/ directories, log.jsonl, curve.svg
    resume_from: str | None = None       # a checkpoint-<step>/ directory of an earlier run with these settings
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"               # the policy's forward: "bfloat16" autocasts; weights and optimizer float32
    serve_dtype: str | None = None       # the engine's own copy of the weights; default bfloat16 on cuda, else float32
    time_limit_s: float = 0.0            # > 0: stop (and save) when one more step would end past it
    # model: the policy's starting point, and the KL reference (loaded only when beta > 0)
    model: str | None = None
    # prompts: the task suite's train split, task name -> share
    tasks: dict[str, float] = field(default_factory=lambda: {"arithmetic": 1.0, "countdown": 1.0, "gsm8k": 1.0})
    num_prompts: int = 20_000            # size of the pool prompts are drawn from
    # rollouts
    prompts_per_step: int = 64
    group_size: int = 8                  # G samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    # loss
    clip_eps: float = 0.2
    clip_eps_high: float | None = None   # DAPO's clip-higher; default clip_eps
    beta: float = 0.0                    # k3 KL weight; 0: no reference model at all
    aggregation: str = "token-mean"      # "token-mean", "seq-mean", or "dr-grpo" (constant normaliser max_tokens)
    scale_rewards: bool | None = None    # divide advantages by the group std; default: yes, except for dr-grpo
    drop_zero_variance: bool = True      # leave groups whose rewards are all equal (zero advantage) out of the update
    ppo_epochs: int = 1                  # passes over each batch of rollouts (the clipped ratio matters from the 2nd)
    num_minibatches: int = 1             # optimizer steps per pass
    micro_batch_size: int = 64           # sequences per forward/backward (gradient accumulation)
    # optimisation
    steps: int = 100
    lr: float = 1e-5
    min_lr_ratio: float = 1.0            # 1: constant after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0               # 0: off
    # engine
    max_num_seqs: int = 512
    kv_cache_bytes: int | None = None    # default: the engine's (a share of free GPU memory; 2 GiB on a CPU)
    gpu_memory_utilization: float = 0.5  # the policy, its optimizer and activations share the GPU with the engine
    cuda_graphs: bool = True
    # held-out evaluation during the run (greedy): eval_examples per task every eval_every steps; 0: off
    eval_every: int = 0
    eval_examples: int = 100
    # logging and checkpoints
    log_every: int = 1
    save_every: int = 0                  # 0: only at the end
    progress: bool = True

    def __post_init__(self):
        from mixr.train.losses import AGGREGATIONS
        self.betas = tuple(self.betas)
        if self.model is None and self.resume_from is None:
            raise ValueError("give model: the directory of the model to start from")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.serve_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"serve_dtype must be float32, bfloat16 or float16, got {self.serve_dtype!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.scale_rewards is None:
            self.scale_rewards = self.aggregation != "dr-grpo"
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare the samples of a prompt), "
                             f"got {self.group_size}")
        for name in ("steps", "prompts_per_step", "max_tokens", "ppo_epochs", "num_minibatches", "micro_batch_size",
                     "num_prompts", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_step % self.num_minibatches:
            raise ValueError(f"num_minibatches={self.num_minibatches} must divide prompts_per_step="
                             f"{self.prompts_per_step} (minibatches hold whole groups)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (GRPO needs different samples per prompt), "
                             f"got {self.temperature}")
        if self.beta < 0 or self.clip_eps <= 0:
            raise ValueError(f"beta must be >= 0 and clip_eps > 0, got {self.beta} and {self.clip_eps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | Path, config_class: type = TrainConfig, **overrides):
    """Read a TrainConfig (or another settings dataclass, e.g. GRPOConfig) from .yaml/.yml or .toml; unknown keys
    are an error. `overrides` win over the file."""
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
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return config_class(**raw)
