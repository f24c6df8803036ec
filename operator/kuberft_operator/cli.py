"""The `kuberft` command. Each component adds its subcommands through a `register(subparsers)`
function in its own `cli` module; those modules import nothing heavy at module level so
`kuberft --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# Component command modules, in the order their commands appear in `kuberft --help`.
COMMAND_MODULES = ("kuberft_operator.cli_run", "kuberft_operator.cli_api", "kuberft_operator.cli_operator", "kuberft_trainer.cli", "kuberft_reward.cli", "kuberft_serve.cli")

DESCRIPTION = """\
kuberft: Reinforcement Fine-Tuning (GRPO + LoRA) on Kubernetes.

Describe a job in an RFTJob manifest (a base model, a dozen prompts, reward functions),
then `kubectl apply` it on a cluster running the kuberft operator, or run the same file
on this machine. Serve the trained adapter with a TurboDeployment.
"""

EPILOG = """\
examples:
  kuberft validate examples/*.yaml       check manifests, print every problem with its field path
  kuberft crds | kubectl apply -f -      install the CustomResourceDefinitions
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kuberft", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kuberft {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
