"""Read kuberft manifests from YAML and check them against the API, reporting every problem
with the field path a user must fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from .api import API_VERSION, RESOURCE_BY_KIND, Resource

R = TypeVar("R", bound=Resource)

_FRIENDLY = {
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
}


@dataclass(frozen=True)
class Problem:
    source: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class ManifestError(ValueError):
    """A manifest that does not match the API; `problems` lists each one with its field path."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _join(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def problems_from(error: ValidationError, source: str) -> list[Problem]:
    problems = []
    for err in error.errors():
        # Skip pydantic's union/literal wrappers in the location; keep the field names.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        violations = (err.get("ctx") or {}).get("violations")
        if violations:
            for field_path, message in violations:
                problems.append(Problem(source, (_join(loc) + field_path).lstrip("."), message))
            continue
        message = _FRIENDLY.get(err["type"], err["msg"])
        problems.append(Problem(source, _join(loc), message))
    return problems


def check_document(document: Any, source: str = "") -> tuple[Resource | None, list[Problem]]:
    """Validate one parsed manifest; returns the typed resource or the problems."""
    if not isinstance(document, dict):
        return None, [Problem(source, "", f"a manifest must be a mapping, got {type(document).__name__}")]
    kind = document.get("kind")
    if document.get("apiVersion") != API_VERSION:
        return None, [Problem(source, "apiVersion", f"must be {API_VERSION}, got {document.get('apiVersion')!r}")]
    resource_type = RESOURCE_BY_KIND.get(kind)
    if resource_type is None:
        known = ", ".join(RESOURCE_BY_KIND)
        return None, [Problem(source, "kind", f"must be one of {known}, got {kind!r}")]
    try:
        return resource_type.model_validate(document), []
    except ValidationError as error:
        return None, problems_from(error, source)


def read_documents(path: Path) -> list[tuple[str, Any]]:
    """(source label, parsed document) for each non-empty YAML document in the file."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ManifestError([Problem(str(path), "", f"cannot read: {error.strerror}")]) from error
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise ManifestError([Problem(str(path), "", f"not valid YAML: {error}")]) from error
    if not documents:
        raise ManifestError([Problem(str(path), "", "no manifest in the file")])
    if len(documents) == 1:
        return [(str(path), documents[0])]
    return [(f"{path}#{i}", d) for i, d in enumerate(documents)]


def check_file(path: Path) -> tuple[list[Resource], list[Problem]]:
    try:
        documents = read_documents(path)
    except ManifestError as error:
        return [], error.problems
    resources, problems = [], []
    for source, document in documents:
        resource, found = check_document(document, source)
        problems.extend(found)
        if resource is not None:
            resources.append(resource)
    return resources, problems


def load(path: Path, resource_type: type[R]) -> R:
    """The single resource of `resource_type` in a file, or ManifestError naming every problem."""
    resources, problems = check_file(path)
    if problems:
        raise ManifestError(problems)
    matching = [r for r in resources if isinstance(r, resource_type)]
    if len(matching) != 1:
        raise ManifestError(
            [Problem(str(path), "kind", f"expected exactly one {resource_type.kind_name()}, found {len(matching)}")]
        )
    return matching[0]


def load_spec(path: Path, resource_type: type[Resource]) -> tuple[str | None, Any]:
    """(name or None, spec) from a file holding one `resource_type` manifest, or a bare spec of
    one (the JSON document the operator mounts in a pod); ManifestError names every problem."""
    documents = read_documents(path)
    if len(documents) != 1:
        raise ManifestError([Problem(str(path), "", f"expected one document, found {len(documents)}")])
    source, document = documents[0]
    if isinstance(document, dict) and "kind" in document:
        resource, problems = check_document(document, source)
        if problems:
            raise ManifestError(problems)
        if not isinstance(resource, resource_type):
            raise ManifestError([Problem(source, "kind", f"expected a {resource_type.kind_name()}, got {resource.kind}")])
        return resource.metadata.name, resource.spec
    spec_type = resource_type.model_fields["spec"].annotation
    try:
        return None, spec_type.model_validate(document)
    except ValidationError as error:
        raise ManifestError(problems_from(error, source)) from error
