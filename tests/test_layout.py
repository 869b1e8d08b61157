"""The house rules a reader relies on: imports run down the layers, no file or function too long to
read, README a short front door whose links all resolve and which links every page in docs/."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src" / "ldmkit"
# Lowest first; a module may import its own layer and the ones below, never one above. The file
# primitives of checkpoints/ sit at the bottom (every layer reads and writes files); the readers of
# whole models sit above models/.
LAYERS = (
    ("errors", "config", "checkpoints.files", "__init__"),
    ("nn",),
    ("models",),
    ("checkpoints", "diffusion", "images", "videos", "bundled"),
    ("data",),
    ("pipelines",),
    ("evaluation",),
    ("training", "server"),
    ("cli", "__main__"),
)
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def layer_of(module: str) -> int:
    """module: dotted, below ldmkit (e.g. "checkpoints.files", "cli.generate")."""
    matches = [
        (len(name), i)
        for i, names in enumerate(LAYERS)
        for name in names
        if module == name or module.startswith(name + ".")
    ]
    assert matches, f"ldmkit.{module} is in no layer: add it to LAYERS"
    return max(matches)[1]  # the most specific name wins


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module below ldmkit) of every ldmkit import, at the top or inside a function."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ldmkit":
            names = [node.module] if node.module != "ldmkit" else [f"ldmkit.{a.name}" for a in node.names]
            out += [(node.lineno, n.removeprefix("ldmkit.")) for n in names if n != "ldmkit"]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.removeprefix("ldmkit.")) for a in node.names if a.name.startswith("ldmkit.")]
    return out


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_imports_run_down_the_layers():
    upward = []
    for path in sources():
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__") or "__init__"
        here = layer_of(module)
        for line, target in imported(ast.parse(path.read_text())):
            if target == "__version__":
                continue
            if layer_of(target) > here:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports ldmkit.{target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_file_or_function_too_long_to_read():
    long = []
    for path in sources():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"over {MAX_FILE_LINES} lines a file, {MAX_FUNCTION_LINES} a function:\n" + "\n".join(long)


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_a_front_door_linking_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {Path(target.split("#")[0]).name for target in LINK.findall(readme) if target.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages README does not link: {sorted(pages - linked)}"
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)}: link to {target}, which does not exist"
