"""Reading a kernel completion without running it: extract the program from its tags, then
analyse its syntax tree for the format reward, for constructs the sandbox forbids, for known
reward hacks, and for features the CPU interpreter cannot check. Imports nothing heavy;
the list of real `tl.` functions comes from `triton.language` itself (no torch needed)."""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field

# Modules a kernel program may import (a prefix match on the dotted name).
ALLOWED_IMPORTS = (
    "torch", "triton", "math", "typing", "functools", "itertools", "dataclasses", "collections", "numbers",
    "enum", "__future__",
)
# Parts of torch that run foreign code, reach the network or spawn processes.
FORBIDDEN_TORCH_MODULES = (
    "torch.utils.cpp_extension", "torch.distributed", "torch.multiprocessing", "torch.hub", "torch.library",
    "torch.ops", "torch.package", "torch.compile", "torch.jit", "torch.utils.data", "torch.backends",
)
FORBIDDEN_BUILTINS = frozenset(
    {
        "eval", "exec", "compile", "__import__", "globals", "locals", "vars", "getattr", "setattr", "delattr",
        "breakpoint", "__builtins__", "__loader__", "__spec__", "open",
    }
)
"""Introspection, dynamic code, and `open` (which takes a file descriptor number: the result
channel's): the ways around every other check. Names such as `input` or `exit` are not here: a
parameter called `input` is common in kernel libraries, and what such builtins do is the
sandbox's business."""
ALLOWED_DUNDERS = frozenset({"__init__", "__name__"})
ALLOCATION_CALLS = frozenset(
    {"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "full", "full_like", "new_empty", "new_zeros", "new_full", "ones", "ones_like"}
)
"""Host calls that allocate an output buffer for a kernel (format credit)."""
ESCAPE_MODULES = frozenset(
    {
        "os", "sys", "builtins", "ctypes", "inspect", "gc", "importlib", "subprocess", "multiprocessing", "threading",
        "_thread", "signal", "socket", "pickle", "marshal", "shutil", "pathlib", "io", "posix", "resource", "mmap",
        "fcntl", "pty", "tempfile", "runpy", "code", "codeop", "types", "weakref", "traceback", "linecache",
        "faulthandler", "atexit", "sysconfig", "site", "platform", "numpy", "np", "pydoc", "dis", "copyreg",
    }
)
"""Modules that other modules expose as plain attributes (`torch.os`, `torch.sys.modules`,
`torch.builtins.exec`, `torch.ctypes`, `triton.language.core.np`): reaching one is reaching
past the program's allowed imports, so an attribute of that name is refused wherever it appears."""
KERNEL_BODY_FORBIDDEN_NODES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda, ast.Try, ast.ClassDef, ast.Yield, ast.Global, ast.Nonlocal)
"""Python constructs the Triton compiler refuses inside a `@triton.jit` function (the CPU
interpreter would run them)."""

# Features the Triton CPU interpreter cannot execute faithfully.
INTERPRETER_UNSUPPORTED = {
    "inline_asm_elementwise": "inline assembly",
    "bfloat16": "bfloat16 arithmetic",
}


@dataclass
class FormatCheck:
    name: str
    weight: float
    passed: bool
    detail: str


@dataclass
class ProgramReport:
    """What the static analysis found in one program."""

    source: str
    syntax_error: str | None = None
    forbidden: list[str] = field(default_factory=list)
    """Constructs the sandbox refuses to run (imports, introspection...)."""
    hacks: list[str] = field(default_factory=list)
    """Tampering with the evaluator's environment (assigning to attributes of imported modules).
    Whether torch does the kernel's work is observed at run time (`host_guard`), not here."""
    not_triton: list[str] = field(default_factory=list)
    """Kernel bodies the real Triton compiler would refuse (torch or Python objects inside
    `@triton.jit`), which the CPU interpreter would run anyway."""
    unverifiable: list[str] = field(default_factory=list)
    """Features the CPU interpreter cannot check."""
    format_checks: list[FormatCheck] = field(default_factory=list)

    @property
    def format_score(self) -> float:
        return round(sum(c.weight for c in self.format_checks if c.passed), 6)


# --------------------------------------------------------------------------- extraction


def extract_program(completion: str, tag: str = "triton") -> str | None:
    """The program between `<tag>` and `</tag>` (the last complete block), without a
    surrounding Markdown code fence; None when there is no complete block."""
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", completion, flags=re.DOTALL)
    if not matches:
        return None
    body = matches[-1].strip("\n")
    fenced = re.fullmatch(r"\s*```[a-zA-Z0-9_+-]*\s*\n(.*?)\n\s*```\s*", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    return body if body.strip() else None


# --------------------------------------------------------------------------- tl names


@functools.lru_cache(maxsize=1)
def _triton_modules():
    import importlib

    import triton
    import triton.language as tl

    for extra in ("triton.language.extra.libdevice", "triton.language.extra.cuda.libdevice", "triton.language.extra.hip.libdevice"):
        try:  # so that tl.extra.libdevice.log resolves as it does where a kernel was compiled
            importlib.import_module(extra)
        except ImportError:
            pass
    return triton, tl


def _resolves(root, chain: list[str]) -> bool:
    obj = root
    for name in chain:
        if name.startswith("_") or not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


# --------------------------------------------------------------------------- analysis


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _root_name(node: ast.AST) -> str | None:
    """The name an attribute/subscript/call chain starts from (`torch` in `torch.nn.F(x).y[0]`)."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call, ast.Starred)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _may_be_module(value: ast.AST, module_aliases: set[str]) -> bool:
    """Whether an assigned value may be an imported module or something in one: a plain chain
    from a module (`torch.nn.functional`), or a value the analysis cannot follow (`[torch][0]`,
    `(lambda: torch)()`). A call of a module's function (`torch.zeros(3)`) makes a new object."""
    if isinstance(value, (ast.Name, ast.Attribute)):
        return _root_name(value) in module_aliases
    if isinstance(value, ast.Call):
        return _root_name(value.func) is None
    if isinstance(value, (ast.Subscript, ast.Starred)):
        return _root_name(value) is None or _root_name(value) in module_aliases
    if isinstance(value, (ast.IfExp, ast.BoolOp, ast.Lambda)):
        return any(isinstance(n, ast.Name) and n.id in module_aliases for n in ast.walk(value))
    return False


def _is_triton_decorator(node: ast.AST, aliases: dict[str, str]) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    chain = _dotted(target)
    return bool(chain) and aliases.get(chain[0], chain[0]).startswith("triton")


def _signature_arity(fn: ast.FunctionDef) -> int:
    args = fn.args
    return len(args.posonlyargs) + len(args.args) - 1 + (1 if args.vararg else 0)


def _class_method(tree: ast.Module, class_name: str, method: str) -> ast.FunctionDef | None:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return item
    return None


def analyze(source: str, reference_source: str | None = None, *, found_tags: bool = True) -> ProgramReport:
    """Analyse a kernel program. `reference_source` (the task) lets the format reward compare
    the constructor and forward signatures with the reference `Model`."""
    report = ProgramReport(source=source)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        report.syntax_error = f"{type(e).__name__}: {e}"
        report.format_checks = _format_checks_without_tree(found_tags)
        return report

    aliases: dict[str, str] = {}  # local name -> module path
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported.add(alias.name)
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                report.forbidden.append(f"line {node.lineno}: relative import")
                continue
            module = node.module or ""
            for alias in node.names:
                imported.add(f"{module}.{alias.name}")
                aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
            imported.add(module)

    for name in sorted(imported):
        root = name.split(".")[0]
        if root not in ALLOWED_IMPORTS:
            report.forbidden.append(f"imports {name} (a kernel program may import only {', '.join(ALLOWED_IMPORTS[:-1])})")
        elif any(name == m or name.startswith(m + ".") for m in FORBIDDEN_TORCH_MODULES):
            report.forbidden.append(f"imports {name}, which the sandbox does not allow")
        elif any(part.startswith("_") and part != "__future__" for part in name.split(".")):
            report.forbidden.append(f"imports the private module {name}")

    jit_functions: list[ast.FunctionDef] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(_is_triton_decorator(d, aliases) for d in node.decorator_list):
            jit_functions.append(node)
    jit_names = {fn.name for fn in jit_functions}
    jit_nodes: set[int] = set()
    for fn in jit_functions:  # the body only: a decorator may build its configs with a comprehension
        for statement in fn.body:
            jit_nodes.update(id(n) for n in ast.walk(statement))

    def resolve(chain: list[str]) -> str:
        return ".".join([aliases.get(chain[0], chain[0])] + chain[1:])

    # Names bound to imported modules or to anything reached through them (`T = torch`,
    # `F = torch.nn.functional`, `Tensor = torch.Tensor`): assigning to their attributes changes
    # the evaluator's torch and triton.
    module_aliases = set(aliases)
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None and _may_be_module(node.value, module_aliases):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
                    for name in names:
                        if isinstance(name, ast.Name) and name.id not in module_aliases:
                            module_aliases.add(name.id)
                            changed = True

    plain_functions = {
        node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in jit_names
    }
    bad_tl: list[str] = []
    loads_stores: list[tuple[str, bool, int]] = []
    launched: set[str] = set()
    allocates = False
    for node in ast.walk(tree):
        in_kernel = id(node) in jit_nodes
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS and isinstance(node.ctx, ast.Load):
            report.forbidden.append(f"line {node.lineno}: uses {node.id}()")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_") and node.attr not in ALLOWED_DUNDERS:
                report.forbidden.append(f"line {node.lineno}: accesses the private attribute .{node.attr}")
            elif node.attr in ESCAPE_MODULES:
                report.forbidden.append(f"line {node.lineno}: reaches the module {node.attr} through .{node.attr}")
            elif node.attr == "handle":
                report.forbidden.append(f"line {node.lineno}: reads .handle (the CPU interpreter's internals behind a Triton value)")
            chain = _dotted(node)
            if chain and chain[0] in aliases:
                full = resolve(chain)
                if any(full == m or full.startswith(m + ".") for m in FORBIDDEN_TORCH_MODULES):
                    report.forbidden.append(f"line {node.lineno}: uses {full}, which the sandbox does not allow")
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                root = _root_name(node)
                if root in module_aliases:
                    report.hacks.append(f"line {node.lineno}: monkey-patches {resolve(chain) if chain and chain[0] in aliases else ast.unparse(node)}")
                elif root is None:
                    report.hacks.append(f"line {node.lineno}: assigns to an attribute of a computed object ({ast.unparse(node)}); only the program's own objects may be changed")
        if in_kernel:
            if isinstance(node, KERNEL_BODY_FORBIDDEN_NODES):
                report.not_triton.append(f"line {node.lineno}: {type(node).__name__} inside a @triton.jit function")
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in aliases and aliases[node.id].split(".")[0] in ("torch", "numpy"):
                report.not_triton.append(f"line {node.lineno}: {aliases[node.id]} used inside a @triton.jit function")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in plain_functions:
                report.not_triton.append(f"line {node.lineno}: calls the plain Python function {node.func.id} inside a @triton.jit function (the compiler calls only @triton.jit functions)")
        if isinstance(node, ast.Call):
            chain = _dotted(node.func)
            if chain is None and isinstance(node.func, ast.Subscript):
                target = _dotted(node.func.value)
                if target:
                    launched.add(target[-1])
                continue
            if chain is None:
                continue
            full = resolve(chain)
            if not in_kernel and chain[-1] in ALLOCATION_CALLS and (full.startswith("torch.") or len(chain) >= 2):
                allocates = True
            if in_kernel:
                if full.startswith("triton.language."):
                    short = full[len("triton.language.") :]
                    if short.split(".")[-1] in ("load", "store"):
                        keywords = {k.arg for k in node.keywords}
                        masked = bool(keywords & {"mask", "boundary_check"}) or len(node.args) >= 2
                        loads_stores.append((short, masked, node.lineno))
                for word, what in INTERPRETER_UNSUPPORTED.items():
                    if word in full.split("."):
                        report.unverifiable.append(f"line {node.lineno}: {what} ({full})")
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = _dotted(node)
            if chain and chain[0] in aliases:
                full = resolve(chain)
                for word, what in INTERPRETER_UNSUPPORTED.items():
                    if word in full.split(".") and in_kernel:
                        report.unverifiable.append(f"line {node.lineno}: {what} ({full})")
                if full.startswith("triton.language.") or full == "triton.language":
                    rest = full.split(".")[2:]
                    if rest and not _resolves(_triton_modules()[1], rest):
                        bad_tl.append(f"tl.{'.'.join(rest)} (line {node.lineno})")
                elif full.startswith("triton.") and not full.startswith("triton.language"):
                    rest = full.split(".")[1:]
                    if not _resolves(_triton_modules()[0], rest):
                        bad_tl.append(f"{full} (line {node.lineno})")

    report.forbidden = _unique(report.forbidden)
    report.hacks = _unique(report.hacks)
    report.not_triton = _unique(report.not_triton)
    report.unverifiable = _unique(report.unverifiable)
    bad_tl = _unique(_outermost(bad_tl))

    # ---- format checks
    imports_ok = any(n == "triton" or n.startswith("triton.") for n in imported) and (
        "triton.language" in imported or any(v == "triton.language" for v in aliases.values())
    )
    launched_kernels = sorted(jit_names & launched)
    model_new = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ModelNew"), None)
    model_new_detail = ""
    model_new_ok = False
    if model_new is None:
        model_new_detail = "no class ModelNew"
    elif not any((_dotted(b) or [""])[-1] == "Module" for b in model_new.bases):
        model_new_detail = "ModelNew does not subclass nn.Module"
    elif _class_method(tree, "ModelNew", "forward") is None:
        model_new_detail = "ModelNew has no forward method"
    else:
        model_new_ok = True
        if reference_source:
            model_new_ok, model_new_detail = _same_signatures(tree, reference_source)
    unmasked = [f"tl.{name} (line {line})" for name, masked, line in loads_stores if not masked]
    report.format_checks = [
        FormatCheck("tags", 0.15, found_tags, "" if found_tags else "no <triton>...</triton> block"),
        FormatCheck("imports", 0.1, imports_ok, "" if imports_ok else "does not import triton and triton.language"),
        FormatCheck(
            "jit",
            0.15,
            bool(launched_kernels),
            "" if launched_kernels else ("no @triton.jit kernel" if not jit_names else "no @triton.jit kernel is launched with kernel[grid](...)"),
        ),
        FormatCheck("tl_names", 0.15, bool(jit_names) and not bad_tl, "" if not bad_tl else "not Triton functions: " + ", ".join(bad_tl[:4])),
        FormatCheck(
            "masks",
            0.15,
            bool(loads_stores) and not unmasked,
            "" if loads_stores and not unmasked else ("no tl.load/tl.store" if not loads_stores else "no mask on " + ", ".join(unmasked[:4])),
        ),
        FormatCheck("allocation", 0.15, allocates, "" if allocates else "host code allocates no output buffer (torch.empty, torch.zeros, .new_empty...)"),
        FormatCheck("model_new", 0.15, model_new_ok, model_new_detail),
    ]
    return report


def _format_checks_without_tree(found_tags: bool) -> list[FormatCheck]:
    names = ("imports", "jit", "tl_names", "masks", "allocation", "model_new")
    checks = [FormatCheck("tags", 0.15, found_tags, "" if found_tags else "no <triton>...</triton> block")]
    weights = {"imports": 0.1}
    return checks + [FormatCheck(n, weights.get(n, 0.15), False, "the program does not parse") for n in names]


def _same_signatures(tree: ast.Module, reference_source: str) -> tuple[bool, str]:
    try:
        ref = ast.parse(reference_source)
    except SyntaxError:
        return True, ""
    for method in ("__init__", "forward"):
        mine, theirs = _class_method(tree, "ModelNew", method), _class_method(ref, "Model", method)
        if theirs is None:
            continue
        mine_arity = _signature_arity(mine) if mine else 0
        if mine_arity != _signature_arity(theirs) and not (mine and (mine.args.vararg or mine.args.kwarg)):
            return False, (
                f"ModelNew.{method} takes {mine_arity} argument(s), Model.{method} takes {_signature_arity(theirs)}"
            )
    return True, ""


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _outermost(names: list[str]) -> list[str]:
    """Drop `tl.a.b` when `tl.a` is already reported."""
    keep = []
    for name in names:
        stem = name.split(" (")[0]
        if not any(stem.startswith(other.split(" (")[0] + ".") for other in names):
            keep.append(name)
    return keep


def format_reason(report: ProgramReport) -> str:
    failed = [c for c in report.format_checks if not c.passed]
    if not failed:
        return "all format checks pass"
    return "; ".join(f"{c.name}: {c.detail}" for c in failed)
