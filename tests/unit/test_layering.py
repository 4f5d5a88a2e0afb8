"""Imports flow one way (docs/architecture.md), and only megamoe/platform.py patches third-party modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "megamoe"
LAYER = {"__init__": 0, "config": 0, "utils": 0, "platform": 1, "profiling": 1, "parallel": 1, "moe": 2, "models": 3,
         "data": 3, "hf": 3, "train": 4, "studies": 5, "convert": 5}
"""A module may import megamoe modules of its own layer or below. studies (benchmarks, the variant comparison) and
convert (Hugging Face export and import, upcycling) use the training run; the training run never uses them."""
LAYER["cli"] = max(LAYER.values()) + 1
"""megamoe/cli.py, the start-up of the entry points (tools/, launchers/), sits above every layer: no library module
uses it."""
# A variant's folder spans layers: its declaration is read by the config layer (no torch), its layer is plain
# PyTorch, its megatron hook is a model part, its study runs training.
VARIANT_MODULE_LAYER = {"__init__": 0, "base": 0, "shapes": 0, "megatron": 3, "study": 5}
VARIANT_DEFAULT_LAYER = 2
BANNED = {"config": {"torch", "megatron", "deepspeed", "numpy"}, "moe": {"megatron", "deepspeed"},
          "hf": {"megatron", "deepspeed"}, "parallel": {"deepspeed"}, "platform": {"deepspeed"},
          "models": {"deepspeed"}, "data": {"deepspeed"}, "utils": {"megatron", "deepspeed"}}
BANNED_BY_LAYER = {0: {"torch", "megatron", "deepspeed", "numpy"}, 2: {"megatron", "deepspeed"}, 3: {"deepspeed"}}
"""For the variants' modules, by their layer."""
TRAINING_RUN = {"__init__", "checkpoint", "deepspeed", "flops", "integrity", "loop", "metrics", "optim", "pipeline",
                "preemption", "preflight", "profile", "reshard", "saving", "startup", "timers", "watchdog"}
"""megamoe/train holds the training run only: a benchmark, study, planner or converter goes elsewhere."""
SIBLINGS_APART = {("data", "hf"), ("hf", "data")}
# Third-party modules confined to single files inside their package.
CONFINED = {"deepspeed": {"megamoe/train/deepspeed.py"},
            "megatron": {"megamoe/platform.py", "megamoe/parallel/initialize.py", "megamoe/models",
                         "megamoe/data", "megamoe/train", "megamoe/studies", "megamoe/convert"}}
CONFINED_NAMES = {"megatron": "megatron.py"}
"""...and to modules of this name (a variant's megatron hook)."""
THIRD_PARTY = {"torch", "megatron", "deepspeed", "numpy", "transformers", "sentencepiece"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def layer_of(module: str) -> int:
    """The layer of a megamoe module, by its dotted name ('megamoe.variants.peer.layer')."""
    parts = module.split(".")[1:]
    if parts[0] != "variants":
        return LAYER[parts[0]]
    name = parts[-1] if len(parts) == 3 or parts[-1] in VARIANT_MODULE_LAYER else "__init__"
    return VARIANT_MODULE_LAYER.get(name, VARIANT_DEFAULT_LAYER)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


def import_problems(rel: str, module: str, names: list[str]) -> list[str]:
    """Why module `module` (file `rel`) may not import each of `names` (empty: all allowed)."""
    pkg, layer, problems = module.split(".")[1], layer_of(module), []
    banned = BANNED_BY_LAYER.get(layer, set()) if pkg == "variants" else BANNED.get(pkg, set())
    for name in names:
        top, *rest = name.split(".")
        if top == "megamoe" and rest:
            if layer_of(name) > layer:
                problems.append(f"{rel} (layer {layer}) must not import {name} (layer {layer_of(name)})")
            if (pkg, rest[0]) in SIBLINGS_APART:
                problems.append(f"{rel} must not import {name}")
        if top in banned:
            problems.append(f"{rel} must not import {top}")
        if top in CONFINED and not (any(rel.startswith(allowed) for allowed in CONFINED[top])
                                    or rel.endswith("/" + CONFINED_NAMES.get(top, "-"))):
            problems.append(f"{rel} must not import {top}")
    return problems


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_import_direction(path):
    pkg, rel = package_of(path), str(path.relative_to(ROOT))
    names = imports(path)
    assert not import_problems(rel, module_name(path), names)
    for name in names:
        top = name.split(".")[0]
        if pkg == "config":
            assert top in sys.stdlib_module_names or top in {"yaml", "megamoe", "__future__"}, \
                f"{rel}: config imports only stdlib and yaml, not {top}"


def test_the_direction_check_catches_forbidden_imports():
    """The check is not vacuous: the training run importing a study or a converter, a variant's declaration
    importing torch or its own layer, and the config layer importing a variant's layer all fail."""
    assert import_problems("megamoe/train/loop.py", "megamoe.train.loop", ["megamoe.studies.compare"])
    assert import_problems("megamoe/train/checkpoint.py", "megamoe.train.checkpoint", ["megamoe.convert.export"])
    assert import_problems("megamoe/variants/peer/__init__.py", "megamoe.variants.peer", ["torch"])
    assert import_problems("megamoe/variants/peer/__init__.py", "megamoe.variants.peer",
                           ["megamoe.variants.peer.layer"])
    assert import_problems("megamoe/config/loader.py", "megamoe.config.loader", ["megamoe.variants.topk.layer"])
    assert import_problems("megamoe/variants/topk/layer.py", "megamoe.variants.topk.layer", ["megatron.core"])
    assert not import_problems("megamoe/variants/dynamic/megatron.py", "megamoe.variants.dynamic.megatron",
                               ["megatron.core", "megamoe.variants.dynamic.layer", "megamoe.models.norms"])
    assert not import_problems("megamoe/studies/compare.py", "megamoe.studies.compare", ["megamoe.train.loop"])


def test_train_holds_the_training_run_only():
    held = {p.stem for p in (PACKAGE / "train").glob("*.py")}
    assert held == TRAINING_RUN, f"megamoe/train holds {sorted(held - TRAINING_RUN)} beyond the training run " \
        f"(benchmarks and studies go to megamoe/studies, converters to megamoe/convert, planning to megamoe/moe)"


def _third_party_aliases(tree: ast.AST) -> set[str]:
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in THIRD_PARTY:
                    aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
            aliases |= {alias.asname or alias.name for alias in node.names}
    return aliases


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def patch_sites(source: str) -> list[str]:
    """Lines of `source` that assign to (or setattr on) an attribute of an imported third-party module."""
    tree = ast.parse(source)
    aliases = _third_party_aliases(tree)
    sites = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        sites += [f"line {node.lineno}: {ast.unparse(t)}" for t in targets
                  if isinstance(t, ast.Attribute) and _root_name(t) in aliases]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args \
                and _root_name(node.args[0]) in aliases:
            sites.append(f"line {node.lineno}: setattr")
    return sites


@pytest.mark.parametrize("path", [p for p in modules() if p.name != "platform.py"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_only_platform_patches_third_party_code(path):
    assert not patch_sites(path.read_text()), "patches belong in megamoe/platform.py"


def test_the_scan_catches_a_patch():
    """The scan is not vacuous."""
    assert patch_sites("import torch\ntorch.cuda.current_device = lambda: 0\n") == [
        "line 2: torch.cuda.current_device"]
    assert patch_sites("from megatron.core import utils as u\nsetattr(u, 'x', 1)\n") == ["line 2: setattr"]


REMOTE = PACKAGE / "hf" / "remote"


@pytest.mark.parametrize("path", sorted(REMOTE.glob("*.py")), ids=lambda p: p.name)
def test_hf_custom_code_is_self_contained(path):
    """Exports ship these files: a user loading them has torch and transformers, not megamoe."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:  # `from .x import y`, or `from . import x`
            siblings = [node.module] if node.module else [a.name for a in node.names]
            for sibling in siblings:
                assert (REMOTE / f"{sibling}.py").is_file(), f"{path.name}: .{sibling} is not shipped with it"
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top in {"torch", "transformers", "__future__"}, \
                f"{path.name} imports {name}: HF custom code may import torch, transformers and its siblings only"


def shell_string_calls(source: str) -> list[str]:
    """Lines that run a shell on a string: os.system/os.popen, or subprocess with shell=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("os.system", "os.popen") or any(
                k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords):
            found.append(f"line {node.lineno}: {name}")
    return found


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tools").glob("*.py"),
                                         *(ROOT / "launchers").glob("*.py")]), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shell_strings(path):
    """Commands are argument lists: nothing a user types is ever parsed by a shell."""
    assert not shell_string_calls(path.read_text())


def test_the_shell_scan_catches_a_shell_string():
    assert shell_string_calls("import os, subprocess\nos.system(x)\nsubprocess.run(x, shell=True)\n") == [
        "line 2: os.system", "line 3: subprocess.run"]


def test_reading_a_config_imports_no_torch():
    """The config layer reads the variant registry (every variant's config class and checks) without torch: tools
    that only plan or check a config start in a fraction of a second."""
    import subprocess

    code = ("import sys; from megamoe import config, variants; "
            "cfg = config.load(None, ['data.data_path=[x]', 'data.tokenizer_model=t', 'model.num_layers=2', "
            "'model.hidden_size=64', 'model.num_attention_heads=4', 'train.train_iters=1', 'moe.variant=mpo', "
            "'moe.num_experts=4']); "
            "config.validate(cfg, config.Environment(world_size=1, cuda_available=False, tokenizer_vocab_size=None, "
            "check_files=False)); "
            "print(sorted(variants.VARIANTS), type(cfg.moe).__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["MPOEMoEConfig", "False"], out.stdout


# Where a built-in variant may be named in the library besides its own folder and the registry: the HF custom code
# shipped with exports (self-contained: it cannot import megamoe) and the variant's own benchmark.
NAMED_ELSEWHERE = {"dynamic": {"megamoe/hf/remote/"}, "peer": {"megamoe/hf/remote/", "megamoe/studies/bench_peer.py"},
                   "cartesian": {"megamoe/hf/remote/"}, "mpo": {"megamoe/hf/remote/", "megamoe/studies/bench_mpo.py"}}


def variant_mentions(source: str, key: str, class_names: set[str]) -> list[int]:
    """Lines of code naming a variant: its classes, its key as a string ('peer', "moe.variant=peer"), or an import
    of its modules. Comments and docstrings do not count."""
    import io
    import re
    import tokenize

    tree = ast.parse(source)
    docstrings = {node.body[0].lineno for node in ast.walk(tree) if isinstance(
        node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body and isinstance(
        node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}

    def names_it(tok: tokenize.TokenInfo) -> bool:
        if tok.type == tokenize.NAME:
            return tok.string in class_names
        return tok.type == tokenize.STRING and tok.start[0] not in docstrings and bool(
            re.fullmatch(rf"[rbfu]*(['\"]){key}\1", tok.string) or re.search(rf"variant=\W?{key}\b", tok.string))

    lines = [tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline) if names_it(tok)]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and re.search(rf"\.variants\.{key}(\.|$)", node.module):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("key", sorted(NAMED_ELSEWHERE))
def test_a_variant_is_named_only_in_its_folder(key):
    """A variant is one plug-in: nothing else in the library branches on it (docs/architecture.md)."""
    from megamoe import variants

    variant = variants.VARIANTS[key]
    layer = variants.resolve(variant.layer)
    classes = {variant.config.__name__, layer.__name__}
    found = []
    for path in modules():
        rel = str(path.relative_to(ROOT))
        if rel.startswith((f"megamoe/variants/{key}/", "megamoe/variants/__init__.py", *NAMED_ELSEWHERE[key])):
            continue
        found += [f"{rel}:{n}" for n in variant_mentions(path.read_text(), key, classes)]
    assert not found, f"moe.variant={key} is named outside its folder: {found}"


def test_the_mention_scan_sees_names_and_not_prose():
    source = ('x = "peer"\n"""PEER in prose."""\nfrom megamoe.variants.peer.layer import PEERMoE\n'
              'y = "moe.variant=peer"\n')
    assert variant_mentions(source, "peer", {"PEERMoE"}) == [1, 3, 4, 3]
