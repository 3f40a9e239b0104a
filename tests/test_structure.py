"""The code's structure, checked: no module imports one that imports it back; every setting of a training run is
defined once, in the run-config tree, and the command line's flags are exactly its knobs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lcm
from lcm.cli import build_parser
from lcm.config.knobs import flag_of, leaves
from lcm.config.run import RunConfig

SRC = Path(lcm.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    files = {_module(p): p for p in SRC.rglob("*.py")}
    graph = {m: _imports(p, set(files)) - {m} for m, p in files.items()}
    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, set())})
    circles = [c for c in circles if not c[1].startswith(c[0] + ".")]  # a package's __init__ naming its own modules
    assert not circles, circles


def _actions(command: str) -> dict[str, object]:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a for a in sub._actions}


def test_the_training_flags_are_exactly_the_trees_knobs():
    for command in ("distill", "finetune", "tune"):
        actions = _actions(command)
        knobs = {path: f for path, f, _ in leaves(RunConfig(command=command))}
        flags = {dest for dest in actions if "." in dest}
        assert flags == set(knobs), (command, flags ^ set(knobs))
        for path, f in knobs.items():
            action = actions[path]
            assert flag_of(f) in action.option_strings
            assert f.metadata["knob"].help in action.help.replace("%%", "%")


def test_the_sampling_and_serving_flags_are_exactly_their_knobs():
    from lcm.config.knobs import knobs
    from lcm.config.sampling import SampleConfig
    from lcm.serve.protocol import Limits

    for command, cls, prefix in (("sample", SampleConfig, "sample."), ("serve", Limits, "limits.")):
        actions = _actions(command)
        assert {d for d in actions if d.startswith(prefix)} == {prefix + f.name for f, _, _ in knobs(cls)}
        for f, k, _ in knobs(cls):
            assert flag_of(f) in actions[prefix + f.name].option_strings and k.help in actions[prefix + f.name].help


def test_the_skipping_grid_default_is_written_once():
    """N = 50 (diffusers' original_inference_steps) lives in lcm.maths.timesteps.DEFAULT_NUM_SOLVER_STEPS alone."""
    pattern = re.compile(r"(num_solver_steps|original_inference_steps|original_steps)\W{1,6}50\b|\b50\)?\s*#.*grid")
    hits = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) or re.search(r"get\(\"original_inference_steps\", 50\)", line)
    ]
    assert not hits, hits
    assert len(re.findall(r"^DEFAULT_NUM_SOLVER_STEPS = 50$", (SRC / "maths" / "timesteps.py").read_text(), re.M)) == 1


def test_every_function_has_a_caller_outside_the_tests():
    """A function of src/ that nothing in src/, scripts/ or benchmarks/ names is dead code (framework hooks and
    functions a decorator registers, such as a web route, are called by name elsewhere)."""
    hooks = {"extra_repr"}  # torch.nn.Module's
    texts = [
        p.read_text() for d in (SRC, SRC.parents[1] / "scripts", SRC.parents[1] / "benchmarks") for p in d.rglob("*.py")
    ]
    words = re.findall(r"\w+", "\n".join(texts))
    counts = {w: 0 for w in words}
    for w in words:
        counts[w] += 1
    unused = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("__"):
                continue
            registered = any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) for d in node.decorator_list)
            if counts[node.name] <= 1 and not registered and node.name not in hooks:
                unused.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not unused, unused


def test_the_command_line_functions_stay_short():
    """cli/ parses and dispatches: no function of it runs over 60 lines (the work lives in the library)."""
    long = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name}"
        for path in (SRC / "cli").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long
