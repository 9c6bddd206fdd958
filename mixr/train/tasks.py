"""Reasoning tasks with verifiable answers: multi-digit arithmetic, Countdown, GSM8K-style word problems.

Plain Python (no torch). Each task makes `Item`s from a `random.Random` and scores completions with a pure
`reward(completion, answer) -> RewardResult`.

Completion format (what the model writes after the R1 generation prompt `<｜Assistant｜><think>\\n`):

    <reasoning>
    </think>

    \\boxed{<answer>}

  - the reasoning may start with `<think>` (when the prompt did not open the block) and must not be empty;
  - exactly one `</think>` and no further `<think>`; after it exactly one `\\boxed{...}` (other text is allowed);
  - `format` is 1.0 when all of this holds, else 0.0.
  - `correct` is read from the last `\\boxed{...}` after `</think>` (or anywhere, when `</think>` is missing, so
    correctness is measured apart from format): 1.0 or 0.0, or None when there is no `\\boxed{}` or its content
    does not parse (not an integer; for Countdown, not an arithmetic expression).
  - `total` = correct (None counts 0) + FORMAT_WEIGHT * format.

Held-out split: every item has a `key` naming the underlying problem (operands, not wording: a word problem
with other names is the same problem). sha256(task:key) puts each key in "train" or "test" once and for all,
and `generate` rejects items of the other split, so the splits never overlap whatever the seeds.
"""

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

FORMAT_WEIGHT = 0.1
TEST_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class Item:
    task: str
    prompt: str      # the user message
    answer: int | dict  # what reward() compares against; Countdown: {"numbers": [...], "target": n}
    solution: str    # a reference completion in the format above: the SFT target
    key: str         # the problem's identity, hashed for the train/test split


@dataclass(frozen=True, slots=True)
class RewardResult:
    total: float
    format: float
    correct: float | None  # None: no answer could be parsed


# ---------------------------------------------------------------- format and answer extraction

def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} in text, braces matched (so \\boxed{{1}} gives "{1}")."""
    out, start = [], 0
    while (i := text.find("\\boxed{", start)) >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:  # unclosed: nothing after it can be a complete box either
            break
        out.append(text[i + len("\\boxed{"):j - 1])
        start = j
    return out


def check_format(completion: str) -> bool:
    """`[<think>] reasoning </think> ... \\boxed{...} ...` with non-empty reasoning and exactly one box."""
    text = completion.lstrip().removeprefix("<think>")
    if text.count("</think>") != 1 or "<think>" in text:
        return False
    reasoning, tail = text.split("</think>")
    return bool(reasoning.strip()) and len(_boxed_contents(tail)) == 1


def extract_answer(completion: str) -> str | None:
    """The last \\boxed{} content after `</think>` (anywhere when there is no `</think>`), stripped."""
    tail = completion.rsplit("</think>", 1)[-1]
    boxes = _boxed_contents(tail)
    return boxes[-1].strip() if boxes else None


_INT = re.compile(r"[+-]?\d{1,3}(,\d{3})+|[+-]?\d+(\.0*)?")


def parse_int(text: str) -> int | None:
    """"42", "-7", "1,234", "12.0", "$15" -> int; anything else (units, words, fractions) -> None."""
    text = text.strip().replace(" ", "").removeprefix("$")
    if not _INT.fullmatch(text):
        return None
    return int(text.replace(",", "").split(".")[0])


def _result(completion: str, correct: float | None) -> RewardResult:
    fmt = 1.0 if check_format(completion) else 0.0
    return RewardResult(total=(correct or 0.0) + FORMAT_WEIGHT * fmt, format=fmt, correct=correct)


def integer_reward(completion: str, answer: int) -> RewardResult:
    """Reward for tasks whose answer is one integer."""
    boxed = extract_answer(completion)
    value = None if boxed is None else parse_int(boxed)
    return _result(completion, None if value is None else float(value == answer))


def _completion(steps: list[str], answer: str) -> str:
    return "\n".join(steps) + "\n</think>\n\n\\boxed{" + answer + "}"


# ---------------------------------------------------------------- split

def split_of(task: str, key: str, test_fraction: float = TEST_FRACTION) -> str:
    """"train" or "test", fixed by the hash of the problem's key."""
    h = int.from_bytes(hashlib.sha256(f"{task}:{key}".encode()).digest()[:8], "big")
    return "test" if h < test_fraction * 2**64 else "train"


def generate(task, n: int, seed: int = 0, split: str = "train", unique: bool = True) -> list[Item]:
    """n items of `task` from `split` ("train" or "test"), reproducible from seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{task.name}:{split}:{seed}")
    items, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(items) == n:
            return items
        item = task.sample(rng)
        if split_of(task.name, item.key) != split or (unique and item.key in seen):
            continue
        seen.add(item.key)
        items.append(item)
    raise ValueError(f"{task.name}: could not find {n} distinct {split} items (the task's problem space is too "
                     f"small; widen its ranges or pass unique=False)")


# ---------------------------------------------------------------- arithmetic

def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]  # least significant first


def _add_steps(a: int, b: int) -> list[str]:
    steps, carry = [f"Add {a} and {b} column by column from the right."], 0
    da, db = _digits(a), _digits(b)
    for i in range(max(len(da), len(db))):
        x, y = da[i] if i < len(da) else 0, db[i] if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}, write {s % 10}"
                     + (", carry 1" if s >= 10 else ""))
        carry = s // 10
    if carry:
        steps.append("write the carry 1")
    steps.append(f"So {a}+{b}={a + b}.")
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    steps, borrow = [f"Subtract {b} from {a} column by column from the right."], 0
    da, db = _digits(a), _digits(b)
    for i in range(len(da)):
        x, y = da[i], db[i] if i < len(db) else 0
        x -= borrow
        borrow = int(x < y)
        d = x + 10 * borrow - y
        steps.append(f"{x + 10 * borrow}-{y}={d}" + (", borrow 1" if borrow else ""))
    steps.append(f"So {a}-{b}={a - b}.")
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    parts = [(d * 10**i, a * d * 10**i) for i, d in enumerate(_digits(b)) if d]
    steps = [f"Split {b} by place value: {a}*{b} = " + " + ".join(f"{a}*{p}" for p, _ in parts) + "."]
    steps += [f"{a}*{p}={v}" for p, v in parts]
    total = parts[0][1] if parts else 0
    for _, v in parts[1:]:
        steps.append(f"{total}+{v}={total + v}")
        total += v
    steps.append(f"So {a}*{b}={a * b}.")
    return steps


@dataclass(frozen=True)
class Arithmetic:
    """a op b with multi-digit operands; the scratchpad works column by column (or by partial products)."""

    min_digits: int = 1
    max_digits: int = 3
    ops: tuple[str, ...] = ("+", "-", "*")
    name: str = field(default="arithmetic", init=False)

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)

    def sample(self, rng: random.Random) -> Item:
        op = rng.choice(self.ops)
        a, b = self._operand(rng), self._operand(rng)
        if op == "-" and a < b:  # non-negative answers keep the borrow scratchpad simple
            a, b = b, a
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        steps = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}[op](a, b)
        return Item(self.name, f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}.", answer,
                    _completion(steps, str(answer)), f"{a}{op}{b}")

    def reward(self, completion: str, answer: int) -> RewardResult:
        return integer_reward(completion, answer)


# ---------------------------------------------------------------- countdown

class _ExprError(ValueError):
    pass


def parse_expression(text: str, max_len: int = 200) -> tuple[Fraction, list[int]]:
    """Evaluate an expression of non-negative integers, + - * / and parentheses exactly (fractions), returning
    (value, the integers it uses). Recursive descent over a token list: nothing is ever eval'd.
    Raises ValueError on anything else (other characters, unary minus, unbalanced parentheses, x/0)."""
    if len(text) > max_len:  # bounds the recursion depth too
        raise _ExprError("expression too long")
    tokens = re.findall(r"\d+|[-+*/()]|\S", text)
    if any(not (t.isdigit() or t in "+-*/()") for t in tokens):
        raise _ExprError(f"unexpected character in {text!r}")
    pos, used = 0, []

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr() -> Fraction:  # expr := term (('+' | '-') term)*
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term() -> Fraction:  # term := factor (('*' | '/') factor)*
        value = factor()
        while peek() in ("*", "/"):
            op, rhs = take(), factor()
            if op == "/" and rhs == 0:
                raise _ExprError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor() -> Fraction:  # factor := INT | '(' expr ')'
        t = peek()
        if t is None:
            raise _ExprError("unexpected end of expression")
        take()
        if t.isdigit():
            used.append(int(t))
            return Fraction(int(t))
        if t == "(":
            value = expr()
            if peek() != ")":
                raise _ExprError("missing )")
            take()
            return value
        raise _ExprError(f"unexpected {t!r}")

    value = expr()
    if pos != len(tokens):
        raise _ExprError(f"unexpected {tokens[pos]!r}")
    return value, used


@dataclass(frozen=True)
class Countdown:
    """Reach `target` from 3-4 numbers with + - * / and parentheses, each number used at most once.

    The boxed answer is the expression alone, e.g. \\boxed{(3+5)*2}. Items are made by combining all the
    numbers at random (exact division only, no negative intermediate results), so each has a solution."""

    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 50
    max_target: int = 200
    name: str = field(default="countdown", init=False)

    def sample(self, rng: random.Random) -> Item:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            pool = [(n, str(n), True) for n in numbers]  # (value, expression, is a bare number)
            steps = []
            while len(pool) > 1:
                (x, ex, bx), (y, ey, by) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
                if x < y:
                    (x, ex, bx), (y, ey, by) = (y, ey, by), (x, ex, bx)
                ops = ["+", "*", "-"] + (["/"] if y and x % y == 0 else [])
                op = rng.choice(ops)
                value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
                steps.append(f"{x}{op}{y}={value}")
                pool.append((value, f"{ex if bx else '(' + ex + ')'}{op}{ey if by else '(' + ey + ')'}", False))
            target, expression, _ = pool[0]
            if 1 <= target <= self.max_target:
                break
        shown = sorted(numbers)
        prompt = (f"Using the numbers {shown}, each at most once, and + - * / with parentheses, make {target}. "
                  "Put the expression in \\boxed{}.")
        return Item(self.name, prompt, {"numbers": shown, "target": target},
                    _completion(steps + [f"So {expression}={target}."], expression),
                    f"{','.join(map(str, shown))}->{target}")

    def reward(self, completion: str, answer: dict) -> RewardResult:
        boxed = extract_answer(completion)
        if boxed is None:
            return _result(completion, None)
        try:
            value, used = parse_expression(boxed)
        except _ExprError as e:
            # x/0 is a well-formed but wrong answer; anything else did not parse.
            return _result(completion, 0.0 if "division by zero" in str(e) else None)
        ok = value == answer["target"] and not Counter(used) - Counter(answer["numbers"])
        return _result(completion, float(ok))


# ---------------------------------------------------------------- GSM8K-style word problems

_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar"]
_PRONOUN = {"Alice": "she", "Bob": "he", "Carol": "she", "Dave": "he", "Erin": "she", "Frank": "he",
            "Grace": "she", "Heidi": "she", "Ivan": "he", "Judy": "she", "Mallory": "she", "Oscar": "he"}
_ITEMS = ["apple", "pencil", "marble", "sticker", "cookie", "book", "card", "shell"]


def _word_problem(rng: random.Random, kind: int) -> tuple[str, list[str], int, tuple]:
    """One templated problem: (question, reasoning steps, answer, the numbers that identify it)."""
    name, other = rng.sample(_NAMES, 2)
    she, item = _PRONOUN[name], rng.choice(_ITEMS)
    if kind == 0:  # have, receive, give away
        a, b = rng.randint(5, 60), rng.randint(2, 40)
        c = rng.randint(1, a + b)
        q = (f"{name} has {a} {item}s. {other} gives {name} {b} more. Then {she} gives away {c} {item}s. "
             f"How many {item}s does {name} have now?")
        return q, [f"{a}+{b}={a + b}", f"{a + b}-{c}={a + b - c}"], a + b - c, (a, b, c)
    if kind == 1:  # change from a bill
        n, p = rng.randint(2, 9), rng.randint(2, 15)
        bill = next(b for b in (10, 20, 50, 100, 200) if b >= n * p)
        q = (f"{name} buys {n} {item}s at ${p} each and pays with a ${bill} bill. "
             f"How many dollars of change does {name} get?")
        return q, [f"{n}*{p}={n * p}", f"{bill}-{n * p}={bill - n * p}"], bill - n * p, (n, p, bill)
    if kind == 2:  # two rates over two periods
        a, d, b, e = rng.randint(3, 30), rng.randint(2, 7), rng.randint(3, 30), rng.randint(2, 7)
        q = (f"{name} reads {a} pages a day for {d} days, then {b} pages a day for {e} days. "
             f"How many pages does {she} read in total?")
        return q, [f"{a}*{d}={a * d}", f"{b}*{e}={b * e}", f"{a * d}+{b * e}={a * d + b * e}"], a * d + b * e, \
            (a, d, b, e)
    if kind == 3:  # boxes, take some out
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c = rng.randint(1, a * b)
        q = (f"There are {a} boxes with {b} {item}s in each box. {name} takes out {c} {item}s. "
             f"How many {item}s are left in the boxes?")
        return q, [f"{a}*{b}={a * b}", f"{a * b}-{c}={a * b - c}"], a * b - c, (a, b, c)
    if kind == 4:  # share equally, then add
        k, a, b = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 10)
        q = (f"{name} shares {a * k} {item}s equally among {k} bags, then adds {b} more {item}s to each bag. "
             f"How many {item}s are in each bag?")
        return q, [f"{a * k}/{k}={a}", f"{a}+{b}={a + b}"], a + b, (a * k, k, b)
    # kind 5: save each week, then spend
    a, w = rng.randint(3, 25), rng.randint(2, 10)
    s = rng.randint(1, a * w)
    q = f"{name} saves ${a} each week for {w} weeks, then spends ${s}. How many dollars does {she} have left?"
    return q, [f"{a}*{w}={a * w}", f"{a * w}-{s}={a * w - s}"], a * w - s, (a, w, s)


@dataclass(frozen=True)
class WordProblems:
    """GSM8K-style templated word problems of 2-3 arithmetic steps with an integer answer."""

    name: str = field(default="gsm8k", init=False)

    def sample(self, rng: random.Random) -> Item:
        kind = rng.randrange(6)
        question, steps, answer, numbers = _word_problem(rng, kind)
        return Item(self.name, question + " Put the final answer in \\boxed{}.", answer,
                    _completion(steps + [f"The answer is {answer}."], str(answer)),
                    f"{kind}:{','.join(map(str, numbers))}")

    def reward(self, completion: str, answer: int) -> RewardResult:
        return integer_reward(completion, answer)


TASKS = {"arithmetic": Arithmetic(), "countdown": Countdown(), "gsm8k": WordProblems()}
