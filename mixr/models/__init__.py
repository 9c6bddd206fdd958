from mixr.models.deepseek import DeepseekConfig
from mixr.models.llama import DENSE_TYPES, MOE_TYPES, LlamaConfig

CONFIG_CLASSES = {"deepseek_v2": DeepseekConfig, "deepseek_v3": DeepseekConfig,
                  **{t: LlamaConfig for t in MOE_TYPES + DENSE_TYPES}}


def config_from_hf(hf: dict) -> DeepseekConfig | LlamaConfig:
    kind = hf.get("model_type")
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unsupported model_type {kind!r}; supported: {', '.join(sorted(CONFIG_CLASSES))}")
    config = CONFIG_CLASSES[kind].from_hf(hf)
    config.hf = hf  # the original config.json, written back unchanged when saving
    return config
