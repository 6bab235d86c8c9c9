"""One JSON line per benchmark run, with the command that reproduces it (the recorded runs in benchmarks/results)."""

import argparse
import json
import sys
from pathlib import Path


def command_line(script: str, args: argparse.Namespace) -> str:
    """`python <script>` with every option of `args` as it was parsed (lists space-separated, unset ones left out)."""
    parts = ["python", script]
    for key, value in vars(args).items():
        if value is None or value is False:
            continue
        parts.append(f"--{key.replace('_', '-')}")
        if isinstance(value, (list, tuple)):
            parts += [str(item) for item in value]
        elif value is not True:
            parts.append(str(value))
    return " ".join(parts)


def emit(result: dict, script: str, args: argparse.Namespace, output: Path | None = None) -> None:
    """Add the command to `result`, print it as one JSON line and, given `output`, write the line there too."""
    result["command"] = command_line(script, args)
    line = json.dumps(result)
    print(line, file=sys.stdout, flush=True)
    if output is not None:
        output.write_text(line + "\n")
