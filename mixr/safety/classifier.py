"""The input filter's classifier hook from a model directory: a Hugging Face `*ForSequenceClassification`
checkpoint (Llama, Qwen2, ... : any decoder family mixr loads, plus `score.weight` (num_labels, hidden)) run with
mixr's own model code.

Pooling is transformers': the score of the last token that is not `pad_token_id` (the last token when the config
has no pad id). Labels come from config.json's `id2label`; probabilities are a softmax over the labels, or a
sigmoid per label for `problem_type: "multi_label_classification"` (and for a single label).
"""

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from mixr.checkpoint import CheckpointError, _shards, load_model, read_config
from mixr.tokenizer import Tokenizer


def _load_decoder(model_dir: Path, hf: dict, device, dtype):
    """The decoder of a classification checkpoint, through load_model.

    load_model wants an LM head, which a classifier has not; it is given a view of the directory (the same
    weight files, linked) whose config ties the head to the embeddings. The head is never used; `score.weight`,
    which load_model does not know, is read separately."""
    with tempfile.TemporaryDirectory(prefix="mixr-classifier-") as view:
        view = Path(view)
        (view / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
        for f in model_dir.iterdir():
            if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json":
                os.symlink(f.resolve(), view / f.name)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ignored .* tensors the model does not use")
            return load_model(view, device=device, dtype=dtype, progress=False).eval()


class SequenceClassifier:
    """Per-label probabilities of texts, and the FilterConfig classifier hook: calling it with a text gives
    (label, probability) of the likeliest label in `block_labels`, which blocks at the filter's
    classifier_threshold. A text longer than max_length tokens (default: the model's context) is scored in
    consecutive windows and the highest probability counts, so harmful text cannot hide behind padding."""

    def __init__(self, model_dir: str | Path, block_labels: list[str], device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_length: int | None = None, batch_size: int = 16):
        model_dir = Path(model_dir)
        hf = read_config(model_dir)
        id2label = hf.get("id2label")
        if not id2label:
            raise CheckpointError(f"{model_dir / 'config.json'} has no id2label: not a sequence classifier")
        self.labels = [id2label[k] for k in sorted(id2label, key=int)]
        if not block_labels:
            raise ValueError(f"classifier {model_dir}: block_labels is empty; name some of {self.labels}")
        if unknown := sorted(set(block_labels) - set(self.labels)):
            raise ValueError(f"classifier {model_dir}: unknown block_labels {unknown}; its labels are {self.labels}")
        self.block = [self.labels.index(b) for b in block_labels]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = _load_decoder(model_dir, hf, self.device, dtype)
        files = _shards(model_dir)
        if "score.weight" not in files:
            raise CheckpointError(f"{model_dir}: no score.weight tensor: not a sequence classifier checkpoint")
        with safe_open(str(files["score.weight"]), framework="pt", device="cpu") as f:
            score = f.get_tensor("score.weight")
        if tuple(score.shape) != (len(self.labels), hf["hidden_size"]):
            raise CheckpointError(f"{model_dir}: score.weight has shape {tuple(score.shape)}, id2label and "
                                  f"hidden_size imply {(len(self.labels), hf['hidden_size'])}")
        self.score = score.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        self.pad_id = hf.get("pad_token_id")
        self.multi_label = hf.get("problem_type") == "multi_label_classification" or len(self.labels) == 1
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.max_length = max_length or self.model.config.max_position_embeddings
        self.batch_size = batch_size

    def _pool_index(self, ids: list[int]) -> int:
        if self.pad_id is None:
            return len(ids) - 1
        return max((j for j, t in enumerate(ids) if t != self.pad_id), default=0)

    @torch.inference_mode()
    def probabilities_of_ids(self, batch: list[list[int]]) -> torch.Tensor:
        """Token-id sequences (each at most max_length) -> (len(batch), num_labels) float32 probabilities."""
        out = []
        for k in range(0, len(batch), self.batch_size):
            chunk = batch[k:k + self.batch_size]
            if any(not 0 < len(ids) <= self.max_length for ids in chunk):
                raise ValueError(f"classifier inputs must have 1..{self.max_length} tokens")
            width = max(len(ids) for ids in chunk)
            # right padding: attention is causal, so the padding after a sequence does not change it
            x = torch.tensor([ids + [0] * (width - len(ids)) for ids in chunk], device=self.device)  # (B, L)
            h = self.model.hidden_states(x)  # (B, L, hidden)
            rows = torch.arange(len(chunk), device=self.device)
            pooled = h[rows, torch.tensor([self._pool_index(ids) for ids in chunk], device=self.device)]  # (B, H)
            logits = (pooled @ self.score.T).float()  # (B, num_labels)
            out.append(logits.sigmoid() if self.multi_label else logits.softmax(-1))
        return torch.cat(out).cpu()

    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        """Per-label probabilities of each text (tokenized with the checkpoint's tokenizer; at most max_length
        tokens each)."""
        probs = self.probabilities_of_ids([self.tokenizer.encode(t) for t in texts])
        return [dict(zip(self.labels, row.tolist())) for row in probs]

    def __call__(self, text: str) -> tuple[str, float] | None:
        ids = self.tokenizer.encode(text)
        if not ids:
            return None
        windows = [ids[k:k + self.max_length] for k in range(0, len(ids), self.max_length)]
        probs = self.probabilities_of_ids(windows)[:, self.block]  # (windows, blocking labels)
        flat = int(probs.argmax())
        return self.labels[self.block[flat % len(self.block)]], float(probs.flatten()[flat])
