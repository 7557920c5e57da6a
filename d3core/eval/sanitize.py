"""The peers' code ``sanitize`` step: keep a response's imports and the definitions its entry point needs.

What the d3LLM / Fast-dLLM / Dream post-processing (``sanitize.py``, applied before HF
``code_eval``) does, re-implemented here:

1. normalise the text (tabs to 4 spaces, ``\\r\\n`` / ``\\r`` to ``\\n``, stripped, one final newline);
2. among the first :data:`MAX_LINES` lines, find the contiguous span of lines that parses as Python
   and has the most non-blank lines (the earliest such span on ties);
3. from that span's top level keep the imports, the classes, the functions that contain a
   ``return``, and plain ``name = ...`` assignments; a later definition of a name replaces an
   earlier one but keeps its place;
4. with an entry point, keep only the definitions reachable from it through the names their
   bodies mention (of an attribute chain ``a.b.c`` only ``c``); the imports are always kept;
5. write the kept nodes back out with :func:`ast.unparse`, one per line, imports first.

A response with no parsable span gives ``""`` (a program that defines nothing, so it fails).
"""

from __future__ import annotations

import ast

MAX_LINES = 100  # lines of the response searched for code, as the peers' step does
TAB = "    "


def normalise(text: str) -> str:
    return text.replace("\t", TAB).replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def longest_valid_span(text: str, max_lines: int = MAX_LINES) -> str:
    """The contiguous lines of ``text`` (its first ``max_lines``) that parse and have the most non-blank lines."""
    lines = text.splitlines()[:max_lines]
    nonblank = [0]
    for line in lines:
        nonblank.append(nonblank[-1] + bool(line.strip()))
    best, best_count = "", 0
    for i in range(len(lines)):
        # a span can only win if it has more non-blank lines than the best so far: skip the rest cheaply
        for j in range(len(lines), i, -1):
            count = nonblank[j] - nonblank[i]
            if count <= best_count:
                break
            snippet = "\n".join(lines[i:j])
            if _parses(snippet):
                best, best_count = snippet, count
                break
    return best


def _has_return(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Return) for n in ast.walk(node))


def _definition_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.ClassDef):
        return node.name
    if isinstance(node, ast.FunctionDef):  # as the peers' step: not async functions
        return node.name if _has_return(node) else None
    if isinstance(node, ast.Assign) and node.targets and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def _mentions(node: ast.AST) -> set[str]:
    """Names and attribute names below ``node``; as the peers' step, ``a.b.c`` counts only ``c``."""
    found, todo = set(), [node]
    while todo:
        for child in ast.iter_child_nodes(todo.pop()):
            if isinstance(child, ast.Name):
                found.add(child.id)
            elif isinstance(child, ast.Attribute):
                found.add(child.attr)
            else:
                todo.append(child)
    return found


def _reachable(entry_point: str, uses: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [entry_point]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(uses.get(name, set()) - seen)
    return seen


def sanitize(text: str, entry_point: str | None = None) -> str:
    """The program the peers judge for ``text`` (see the module docstring)."""
    code = longest_valid_span(normalise(text))
    if not code:
        return ""
    tree = ast.parse(code)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    definitions: dict[str, ast.stmt] = {}
    for node in tree.body:
        name = _definition_name(node)
        if name is not None:
            definitions[name] = node
    if entry_point:
        keep = _reachable(entry_point, {name: _mentions(node) for name, node in definitions.items()})
        definitions = {name: node for name, node in definitions.items() if name in keep}
    return "\n".join(ast.unparse(node) for node in [*imports, *definitions.values()])
