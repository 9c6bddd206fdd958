"""mixr: DeepSeek-style Mixture-of-Experts models in PyTorch: load, generate, serve, train."""

__version__ = "0.1.0"

from mixr.checkpoint import CheckpointError, load_model, save_model  # noqa: E402
from mixr.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput  # noqa: E402
from mixr.llm import LLM  # noqa: E402
from mixr.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "load_model", "save_model", "CheckpointError"]
