"""A tiny DeepSeek-R1-style byte-level BPE tokenizer, trained in milliseconds for demos and tests.

Imports only `tokenizers` and the stdlib: mixr builds its demo checkpoint with it at run time.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# DeepSeek-R1's template without the tool-call branches (the tiny vocab has no tool tokens). Like R1, it
# keeps only the answer of earlier assistant turns (the text after `</think>`), and the generation prompt
# opens a think block.
DEEPSEEK_R1_TEMPLATE = (
    "{% set ns = namespace(system_prompt='', first=true) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = ns.system_prompt + ('' if ns.first else '\\n\\n') + message['content'] %}"
    "{% set ns.first = false %}"
    "{% endif %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] != 'system' %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
_THINGS = ["apple", "book", "cat", "dog", "egg", "flower", "game", "house", "key", "lamp"]
_VERBS = ["has", "buys", "sees", "finds", "gives away", "wants"]


def demo_corpus() -> list[str]:
    """A few hundred deterministic lines of English and arithmetic, so merges cover digits and words."""
    lines = []
    for i, name in enumerate(_NAMES):
        for j, thing in enumerate(_THINGS):
            n = (3 * i + 7 * j) % 20 + 1
            verb = _VERBS[(i + j) % len(_VERBS)]
            lines.append(f"{name} {verb} {n} {thing}{'s' if n != 1 else ''}.")
            lines.append(f"How many {thing}s does {name} have? {name} has {n}.")
    for a in range(3, 100, 9):
        for b in range(1, 60, 11):
            lines.append(f"{a}+{b}={a + b}")
            lines.append(f"What is {a} times {b}? Let me think step by step. {a}*{b}={a * b}. The answer is {a * b}.")
            if a >= b:
                lines.append(f"{a}-{b}={a - b}")
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "Okay, so the user wants a short answer. First, I should check the numbers again.",
        "Wait, that is not right. Let me try again.",
    ]
    return lines


def build_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
    chat_template: str | None = None,
    split_digits: bool = False,
) -> None:
    """Train a byte-level BPE on `corpus` (a built-in one by default) and write `tokenizer.json` and
    `tokenizer_config.json` to `out_dir`. The whole vocabulary, added tokens included, fits in `vocab_size`
    (fewer ids when the corpus has no more merges to offer). split_digits: every digit is its own token, so
    a number's digits line up with the columns a scratchpad works on (the default model's tokenizer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # leave room for <think> and </think>
        special_tokens=[BOS, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text round-trips
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else demo_corpus(), trainer=trainer)
    # The think markers are ordinary text to the model (decode keeps them), but must stay one token each.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    # Like DeepSeek's tokenizer.json, the post-processor is what makes add_special_tokens=True prepend bos.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tok.save(str(out_dir / "tokenizer.json"))

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,  # DeepSeek pads with eos
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 16384,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template if chat_template is not None else DEEPSEEK_R1_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
