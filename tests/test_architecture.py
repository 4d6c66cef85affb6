"""The rules of the house, read from the code's own imports (with `ast`), so they stay true.

- the layers (docs/architecture.md, "Layers") import only down or within themselves;
- the rules engine imports nothing of the portal client, the fake portal nothing of the service;
- no import cycle between modules;
- `app` imports `workers` in one place only, the module that assembles the service;
- the fake portal is imported only by the demo, tests and benchmarks.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers")
ASSEMBLY = "app.service"  # the one module of `app` that may import `workers`
FAKE_PORTAL = "app.fakeportal"
MAY_IMPORT_THE_FAKE = ("app.demo", "app.fakeportal")  # besides tests/ and benchmarks/


# Top to bottom; a module belongs to the layer of the longest prefix that names it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli/api/intake", ("app.cli", "app.api", "app.intake", "app.__main__", "workers.__main__",
                        "app.service", "app.web", "app.demo", "app.fakeportal")),
    ("workers", ("workers",)),
    ("rebind", ("app.rebind",)),
    ("bitrix and rules", ("app.bitrix", "app.rules", "app.live_rules")),
    ("store", ("app.store", "app.logs")),
    ("settings", ("app.settings", "app.redis_url", "app.portal_config", "app.crm", "app.words", "app.loop")),
)


def layer_of(module: str) -> int:
    if module in PACKAGES:  # `from app import demo` names the empty package root too: it holds nothing
        return len(LAYERS) - 1
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS and to docs/architecture.md"
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The project's modules that `path` imports, at any depth (a function-level import counts too)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from app import service` imports the module app.service, `from app.x import Y` imports app.x
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                yield name


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports_of(path, known)) - {name} for name, path in known.items()}


def upward_imports() -> list[str]:
    return sorted(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                  for name, targets in graph().items() for target in targets
                  if layer_of(target) < layer_of(name))


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_layers_import_only_down() -> None:
    """A lower layer never imports a higher one: " > ".join of LAYERS is the order."""
    assert upward_imports() == [], "upward imports, against " + " > ".join(name for name, _ in LAYERS)


def test_the_rules_engine_imports_nothing_of_the_portal_client() -> None:
    edges = graph()
    assert sorted(f"{name} -> {t}" for name, targets in edges.items() if name.startswith("app.rules")
                  for t in targets if t.startswith("app.bitrix")) == []


def test_the_fake_portal_imports_nothing_of_the_service() -> None:
    assert sorted(f"{name} -> {t}" for name, targets in graph().items() if name.startswith(FAKE_PORTAL)
                  for t in targets if not t.startswith(FAKE_PORTAL)) == []


def test_no_module_imports_itself_back_through_others() -> None:
    edges = graph()
    # A package's __init__ importing its own modules is not a cycle a reader trips on: leave those edges out.
    edges = {name: {t for t in targets if not (name and t.startswith(name + "."))} for name, targets in edges.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_app_imports_workers_only_where_the_service_is_assembled() -> None:
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "workers")
                 for name, targets in graph().items() if name.split(".")[0] == "app" and name != ASSEMBLY}
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_the_fake_portal_is_imported_only_by_the_demo_tests_and_benchmarks() -> None:
    importers = sorted(name for name, targets in graph().items()
                       if any(t == FAKE_PORTAL or t.startswith(FAKE_PORTAL + ".") for t in targets)
                       and not name.startswith(MAY_IMPORT_THE_FAKE))
    assert importers == []


def test_the_checks_see_the_imports_they_guard() -> None:
    """A rule that sees nothing passes for nothing: the graph must hold the edges the service is built on."""
    edges = graph()
    assert "workers.main" in edges[ASSEMBLY]
    assert FAKE_PORTAL in edges["app.demo.portal"]
    assert any(t.startswith("app.") for t in edges["workers.tasks"])
    # the layers are told apart: a worker's job reads facts one layer down, and the store sits below both
    assert "app.rebind.reading" in edges["workers.tasks"]
    assert layer_of("workers.tasks") < layer_of("app.rebind.reading") < layer_of("app.store.jobs")


def test_code_cites_the_official_docs_not_notes_readers_do_not_have() -> None:
    files = [p for package in (*PACKAGES, "docs") for p in (ROOT / package).rglob("*") if p.suffix in (".py", ".md")]
    citing = [str(p.relative_to(ROOT)) for p in [*files, ROOT / "README.md"]
              if "shared/bitrix24" in p.read_text(encoding="utf-8")]
    assert citing == [], "cite GitHub bitrix24/b24restdocs by path instead"


def test_only_the_factory_builds_a_portals_session() -> None:
    """Built elsewhere, a session misses an application portal's tokens or the shared request budget."""
    # the factory, RestClient's own constructor, and the batcher, which makes its portal's one transport
    builders = {"app.bitrix.connect", "app.bitrix.client", "app.bitrix.batcher"}
    built = sorted(f"{name}:{node.lineno}" for name, path in modules().items() if name not in builders
                   for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                   and node.func.id in ("RestClient", "PortalBatcher", "PortalTransport", "OAuthSession"))
    assert built == [], "build a portal's client with app.bitrix.connect (portal_batcher, portal_client)"
