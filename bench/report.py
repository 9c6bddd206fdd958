"""How every bench script reports: its result as JSON on stdout and, given --out, in that file."""

import json
from pathlib import Path


def save(result: dict, out: str | None, indent: int = 2, **dumps) -> None:
    """Write result to out (when given). Benches also call this between stages, so a run cut short keeps what it
    measured."""
    if out:
        Path(out).write_text(json.dumps(result, indent=indent, **dumps) + "\n")


def emit(result: dict, out: str | None, indent: int = 2, **dumps) -> None:
    """Print result and save it: the end of a bench run."""
    print(json.dumps(result, indent=indent, **dumps), flush=True)
    save(result, out, indent, **dumps)
