"""`kuberft validate` and `kuberft crds`: the API from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    validate = subparsers.add_parser(
        "validate",
        help="check RFTJob/TurboDeployment manifests against the API",
        description="Check manifests against the kuberft API (the same rules as the CRDs). Every problem is "
        "printed with its field path, e.g. `spec.grpo.epsilonHigh: ...`; the exit status is 1 if any file has one.",
    )
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE", help="YAML manifests (several documents per file allowed)")
    validate.set_defaults(handler=_validate)

    crds = subparsers.add_parser(
        "crds",
        help="print the CustomResourceDefinitions generated from the API",
        description="Print the CRDs (apiextensions.k8s.io/v1) generated from the API models, ready for "
        "`kubectl apply -f -`, or write one file per CRD with --output-dir.",
    )
    crds.add_argument("--output-dir", type=Path, help="write <plural>.kuberft.io.yaml files here instead of printing")
    crds.set_defaults(handler=_crds)


def _validate(args: argparse.Namespace) -> int:
    from kuberft_core.manifests import check_file

    failed = False
    for path in args.files:
        resources, problems = check_file(path)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            failed = True
        else:
            names = ", ".join(f"{r.kind}/{r.metadata.name}" for r in resources)
            print(f"{path}: ok ({names})")
    return 1 if failed else 0


def _crds(args: argparse.Namespace) -> int:
    from .crdgen import crd_files, write_crds

    if args.output_dir:
        for path in write_crds(args.output_dir):
            print(f"wrote {path}")
    else:
        sys.stdout.write("---\n".join(crd_files().values()))
    return 0
