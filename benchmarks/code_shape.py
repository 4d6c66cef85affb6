"""The code's shape: the longest functions, the largest modules and the median module, in app/ and workers/.

    .venv/bin/python -m benchmarks.code_shape            # figures and the ten longest of each
    .venv/bin/python -m benchmarks.code_shape --top 30   # more of them

Issue 23's goals: every function under 40 lines, every module under 400. A function's length counts
its lines from `def` (decorators included) to its last line, docstring and comments too: what a reader
reads in one sitting. A module's size is its line count. Nested functions count on their own and
inside the function that holds them.
"""
from __future__ import annotations

import argparse
import ast
import statistics
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers")
FUNCTION_GOAL = 40
MODULE_GOAL = 400


@dataclass(frozen=True)
class Sized:
    where: str
    lines: int


def python_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def module_sizes(files: list[Path]) -> list[Sized]:
    return [Sized(str(path.relative_to(ROOT)), len(path.read_text(encoding="utf-8").splitlines())) for path in files]


def function_lengths(files: list[Path]) -> list[Sized]:
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                found.append(Sized(where, node.end_lineno - first + 1))
    return found


def report(top: int) -> list[str]:
    files = python_files()
    modules = sorted(module_sizes(files), key=lambda m: -m.lines)
    functions = sorted(function_lengths(files), key=lambda f: -f.lines)
    sizes = [m.lines for m in modules if m.lines > 0]  # empty __init__ files are not modules a reader reads
    lines = [
        f"modules: {len(sizes)} (and {len(modules) - len(sizes)} empty __init__), functions: {len(functions)}",
        f"longest function: {functions[0].lines} lines ({functions[0].where}); goal < {FUNCTION_GOAL}; "
        f"{sum(f.lines >= FUNCTION_GOAL for f in functions)} at or over it",
        f"largest module: {modules[0].lines} lines ({modules[0].where}); goal < {MODULE_GOAL}; "
        f"{sum(m.lines >= MODULE_GOAL for m in modules)} at or over it",
        f"median module: {statistics.median(sizes):g} lines (mean {statistics.mean(sizes):.0f})",
        "",
        f"longest functions (top {top}):",
        *(f"  {f.lines:4d}  {f.where}" for f in functions[:top]),
        "",
        f"largest modules (top {top}):",
        *(f"  {m.lines:4d}  {m.where}" for m in modules[:top]),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--top", type=int, default=10, help="how many of the longest to list (default 10)")
    print("\n".join(report(parser.parse_args().top)))


if __name__ == "__main__":
    main()
