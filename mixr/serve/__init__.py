"""The OpenAI-compatible server (`mixr serve`). Importing it imports FastAPI; `import mixr` does not."""

from mixr.serve.app import build_app, serve

__all__ = ["build_app", "serve"]
