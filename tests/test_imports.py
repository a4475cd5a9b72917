"""The import rule: sharding/ -> models/ -> checkpoints/ -> engine/, imports only pointing down, and
no module using another module's private names (AST walk over the four packages)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("sharding", "models", "checkpoints", "engine")  # bottom to top


def _modules(root: pathlib.Path) -> dict[str, ast.Module]:
    return {f"{package}/{path.name}": ast.parse(path.read_text(), str(path))
            for package in LAYERS for path in sorted((root / package).glob("*.py"))}


def _private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, module and class attributes, self._x."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def violations(root: pathlib.Path = ROOT) -> list[str]:
    modules = _modules(root)
    defined = {name: _private_names(tree) for name, tree in modules.items()}
    out = []
    for name, tree in modules.items():
        layer = LAYERS.index(name.split("/")[0])
        project_aliases = set()  # local names bound to a project module
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, a.asname or a.name.split(".")[0], None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [(node.module, a.asname or a.name, a.name) for a in node.names]
            for module, alias, imported in targets:
                parts = module.split(".")
                if parts[0] != "shardlm" or len(parts) < 2:
                    continue
                if parts[1] not in LAYERS:
                    out.append(f"{name}:{node.lineno}: imports {module}, which is no project package")
                    continue
                if LAYERS.index(parts[1]) > layer:
                    out.append(f"{name}:{node.lineno}: imports {module} (up: {parts[1]} is above {name.split('/')[0]})")
                owner = f"{parts[1]}/{parts[2]}.py" if len(parts) > 2 else None
                if imported is not None and imported.startswith("_") and owner != name:
                    out.append(f"{name}:{node.lineno}: imports the private name {imported} from {module}")
                if imported is None or len(parts) == 2:
                    project_aliases.add(alias)
                elif (root / parts[1] / f"{imported}.py").exists():
                    project_aliases.add(alias)
        own = defined[name]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            on_module = isinstance(base, ast.Name) and base.id in project_aliases
            elsewhere = any(node.attr in names for other, names in defined.items() if other != name)
            if on_module or (elsewhere and node.attr not in own):
                out.append(f"{name}:{node.lineno}: uses {ast.unparse(node)}, a private name of another module")
    return sorted(set(out))


def test_imports_point_down_and_private_names_stay_home():
    assert violations() == []


def test_the_check_finds_each_kind_of_violation(tmp_path):
    """The same walk over a tree with one of each violation reports all of them, naming file and line."""
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "sharding" / "rules.py").write_text("_ACTIVE = None\n\n\ndef _check():\n    pass\n")
    (tmp_path / "sharding" / "collectives.py").write_text(
        "from shardlm.engine.engine import step\nfrom shardlm.sharding import rules\n\nx = rules._ACTIVE\n")
    (tmp_path / "models" / "llama.py").write_text("from shardlm.sharding.rules import _check\n")
    (tmp_path / "checkpoints" / "tokenizer.py").write_text("class Tokenizer:\n    def __init__(self):\n"
                                                          "        self._tok = 1\n")
    (tmp_path / "checkpoints" / "orbax_io.py").write_text("def save(tokenizer):\n    return tokenizer._tok\n")
    (tmp_path / "engine" / "engine.py").write_text("def step():\n    pass\n")
    found = violations(tmp_path)
    assert any(v.startswith("sharding/collectives.py:1: imports shardlm.engine.engine (up") for v in found), found
    assert any(v.startswith("sharding/collectives.py:4: uses rules._ACTIVE") for v in found), found
    assert any(v.startswith("models/llama.py:1: imports the private name _check") for v in found), found
    assert any(v.startswith("checkpoints/orbax_io.py:2: uses tokenizer._tok") for v in found), found
    assert len(found) == 4, found
