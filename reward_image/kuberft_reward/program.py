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
        "eval", "exec", "compile", "__import__", "open", "globals", "locals", "vars", "getattr", "setattr",
        "delattr", "breakpoint", "input", "exit", "quit", "memoryview", "help", "__builtins__", "__loader__",
        "__spec__",
    }
)
ALLOWED_DUNDERS = frozenset({"__init__", "__name__"})

# torch functions host code may call: allocation, metadata and parameter set-up, never the math.
HOST_TORCH_ALLOWED = frozenset(
    {
        "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
        "rand", "randn", "randint", "rand_like", "randn_like", "arange", "tensor", "as_tensor", "from_numpy",
        "manual_seed", "no_grad", "inference_mode", "is_tensor", "is_floating_point", "device", "Size", "finfo",
        "iinfo", "get_default_dtype", "promote_types", "result_type", "broadcast_shapes", "set_grad_enabled",
        "numel", "Generator",
    }
)
# Tensor methods that compute (in host code they mean torch does the kernel's job).
HOST_COMPUTE_METHODS = frozenset(
    {
        "sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "softmax", "log_softmax", "matmul", "mm",
        "bmm", "addmm", "relu", "relu_", "sigmoid", "tanh", "exp", "exp_", "log", "log_", "pow", "sqrt", "rsqrt",
        "abs", "clamp", "clamp_", "clip", "norm", "cumsum", "cumprod", "prod", "std", "var", "mul", "mul_", "add",
        "add_", "sub", "sub_", "div", "div_", "neg", "square", "erf", "gelu", "silu", "logsumexp", "layer_norm",
        "softplus", "where", "masked_fill", "einsum", "dot", "outer", "conv1d", "conv2d", "sort", "topk", "maximum",
        "minimum", "reciprocal", "sin", "cos", "floor", "ceil", "round", "sign", "mv", "baddbmm", "lerp",
        "clamp_min", "clamp_max", "clamp_min_", "clamp_max_", "addcmul", "addcdiv", "sigmoid_", "tanh_", "exp2",
        "expm1", "log1p", "log2", "log10", "floor_divide", "remainder", "fmod", "true_divide", "multiply",
        "subtract", "divide", "negative", "var_mean", "std_mean", "median", "mode", "kthvalue", "cummax", "cummin",
        "logcumsumexp", "nansum", "nanmean", "count_nonzero", "triu", "tril", "trace", "matrix_power", "kron",
        "renorm", "dist", "hardtanh", "leaky_relu", "elu", "selu", "softmin", "normalize", "erfinv", "cross",
        "tensordot", "matrix_exp", "pdist", "cdist", "pow_", "sqrt_", "abs_", "neg_", "square_", "exp_", "div_",
    }
)
# Features the Triton CPU interpreter cannot execute faithfully.
INTERPRETER_UNSUPPORTED = {
    "libdevice": "libdevice functions",
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
    """Reward-hacking patterns: torch doing the work, the reference Model, monkey-patching."""
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
    import triton
    import triton.language as tl

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


def _is_jit_decorator(node: ast.AST, aliases: dict[str, str]) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    chain = _dotted(target)
    if not chain:
        return False
    full = ".".join([aliases.get(chain[0], chain[0])] + chain[1:])
    return full in ("triton.jit", "triton.runtime.jit.jit", "triton.runtime.jit")


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
    for fn in jit_functions:
        jit_nodes.update(id(n) for n in ast.walk(fn))

    def resolve(chain: list[str]) -> str:
        return ".".join([aliases.get(chain[0], chain[0])] + chain[1:])

    # layers created in __init__ (self.fc = nn.Linear(...)): calling them in forward is torch doing the work
    torch_layers: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            chain = _dotted(node.value.func)
            if chain and resolve(chain).startswith("torch.nn.") and resolve(chain).split(".")[-1] not in (
                "Parameter", "ParameterList", "ParameterDict", "Module", "ModuleList", "ModuleDict",
            ):
                for target in node.targets:
                    tchain = _dotted(target)
                    if tchain and len(tchain) == 2 and tchain[0] == "self":
                        torch_layers.add(tchain[1])

    bad_tl: list[str] = []
    loads_stores: list[tuple[str, bool, int]] = []
    launched: set[str] = set()
    for node in ast.walk(tree):
        in_kernel = id(node) in jit_nodes
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS and isinstance(node.ctx, ast.Load):
            report.forbidden.append(f"line {node.lineno}: uses {node.id}()")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_") and node.attr not in ALLOWED_DUNDERS:
                report.forbidden.append(f"line {node.lineno}: accesses the private attribute .{node.attr}")
            chain = _dotted(node)
            if chain and isinstance(node.ctx, (ast.Store, ast.Del)) and chain[0] in aliases:
                report.hacks.append(f"line {node.lineno}: monkey-patches {resolve(chain)}")
        elif isinstance(node, ast.Global) or isinstance(node, ast.Nonlocal):
            pass
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id == "Model":
                    report.hacks.append(f"line {node.lineno}: {node.name} inherits from the reference Model")
        elif isinstance(node, ast.Try) and not in_kernel:
            body_calls = [n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)]
            if body_calls and node.handlers:
                report.hacks.append(f"line {node.lineno}: falls back when a kernel launch fails (try/except around the launch)")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult) and not in_kernel:
            report.hacks.append(f"line {node.lineno}: computes a matrix product with @ in host code")
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
            if chain == ["Model"] or full.endswith(".Model"):
                report.hacks.append(f"line {node.lineno}: calls the reference Model")
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
            else:
                if full.startswith(("torch.nn.functional.", "torch.special.", "torch.linalg.", "torch.fft.")):
                    report.hacks.append(f"line {node.lineno}: calls {full} in host code; the work must be done in Triton kernels")
                elif full.startswith("torch.") and full.count(".") == 1 and full.split(".")[1] not in HOST_TORCH_ALLOWED:
                    report.hacks.append(f"line {node.lineno}: calls {full} in host code; the work must be done in Triton kernels")
                elif len(chain) >= 2 and chain[-1] in HOST_COMPUTE_METHODS and chain[0] not in aliases and chain[0] != "math":
                    report.hacks.append(f"line {node.lineno}: calls .{chain[-1]}() on a tensor in host code; the work must be done in Triton kernels")
                elif len(chain) == 2 and chain[0] == "self" and chain[1] in torch_layers:
                    report.hacks.append(f"line {node.lineno}: calls the torch layer self.{chain[1]} instead of a kernel")
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
    host_hacks = [h for h in report.hacks if "host code" in h or "reference Model" in h or "torch layer" in h]
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
        FormatCheck("allocation", 0.15, not host_hacks, "" if not host_hacks else host_hacks[0]),
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
