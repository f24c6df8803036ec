"""`kuberft operator`: run the controller that reconciles RFTJobs and TurboDeployments."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .controller import OperatorConfig

DESCRIPTION = """\
Run the kuberft operator against the cluster of the current kubeconfig (or, inside a pod, its
service account). For each RFTJob it creates the job ConfigMap, the sandboxed reward pool
(Deployment, Service, NetworkPolicy) and, once the pool is ready, the trainer Job; it keeps the
RFTJob's status (phase, conditions, restarts, times) and posts an Event for every transition.
For each TurboDeployment it runs `kuberft serve` pods behind a Service (and an HPA).

Several replicas may run: they elect a leader through a Lease and only the leader reconciles;
the others stand by and take over when its lease runs out (or at once when it shuts down).
/metrics and /healthz are served on --metrics-port. Without credentials, an API server that
answers, or the RBAC it needs, it exits at once (status 1) with one line that says which.
"""

EPILOG = """\
examples:
  kuberft operator                                   watch every namespace
  kuberft operator -n team-a -n team-b               watch two namespaces
  kuberft operator --image-registry registry.local/kuberft --image-tag 0.1.0
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the operator that reconciles RFTJobs and TurboDeployments in a cluster",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-n", "--namespace", dest="namespaces", action="append", default=[], metavar="NS",
        help="namespace to watch (repeat for several; default: all namespaces)",
    )
    parser.add_argument("--workers", type=int, default=16, help="reconciles that may run at the same time (default: 16)")
    parser.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics and /healthz; 0 turns the server off (default: 8080)")
    images = parser.add_argument_group("images", "container images of the pods the operator creates")
    images.add_argument("--image-registry", default="ghcr.io/kuberft", help="registry and path of the default images (default: ghcr.io/kuberft)")
    images.add_argument("--image-tag", default=__version__, help=f"tag of the default images (default: {__version__})")
    images.add_argument("--trainer-image", help="trainer image (default: <registry>/trainer:<tag>); spec.trainer.image overrides it per job")
    images.add_argument("--reward-image", help="reward pool image (default: <registry>/reward:<tag>); spec.rewardPool.placement.image overrides it")
    images.add_argument("--image-pull-secret", action="append", default=[], metavar="NAME",
                        help="an image pull Secret every pod the operator creates names (repeatable; the Secret must exist in each job's namespace)")
    images.add_argument("--serve-image", help="serving image (default: <registry>/serve:<tag>); spec.placement.image overrides it")
    election = parser.add_argument_group("leader election", "only the replica holding the Lease reconciles")
    election.add_argument("--no-leader-election", dest="leader_election", action="store_false", help="reconcile without taking the Lease (a single replica only)")
    election.add_argument(
        "--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the Lease (default: $POD_NAMESPACE, else default)",
    )
    election.add_argument("--lease-name", default="kuberft-operator", help="name of the Lease (default: kuberft-operator)")
    election.add_argument("--lease-duration", type=float, default=15.0, help="seconds a standby waits for a silent leader (default: 15)")
    election.add_argument("--renew-period", type=float, default=5.0, help="seconds between the leader's renewals (default: 5)")
    election.add_argument("--identity", default=os.environ.get("POD_NAME"), help="this replica's name in the Lease (default: $POD_NAME, else host-pid)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every reconcile and kopf's own messages")
    parser.set_defaults(handler=_operator)


def _operator(args: argparse.Namespace) -> int:
    import asyncio

    from .builders import Images
    from .controller import OperatorConfig, run

    if args.workers < 1:
        raise SystemExit("kuberft operator: --workers must be at least 1")
    if args.leader_election and args.renew_period >= args.lease_duration:
        raise SystemExit("kuberft operator: --renew-period must be shorter than --lease-duration")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    defaults = Images.for_version(args.image_registry, args.image_tag)
    config = OperatorConfig(
        namespaces=tuple(args.namespaces),
        images=Images(
            trainer=args.trainer_image or defaults.trainer,
            reward=args.reward_image or defaults.reward,
            serve=args.serve_image or defaults.serve,
            pull_secrets=tuple(args.image_pull_secret),
        ),
        workers=args.workers,
        metrics_port=args.metrics_port,
        leader_election=args.leader_election,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        lease_seconds=args.lease_duration,
        renew_seconds=args.renew_period,
    )
    if args.identity:
        config.identity = args.identity
    problem = asyncio.run(_start_problem(config))
    if problem:
        raise SystemExit(f"kuberft operator: {problem}")
    return asyncio.run(run(config))


RBAC_HINT = (
    "The operator needs the RBAC its Helm chart grants: a Role in each watched namespace (watchNamespaces), "
    "or a ClusterRole with watchAllNamespaces=true."
)


async def _start_problem(config: OperatorConfig) -> str | None:
    """Why the operator cannot start, in one sentence, or None. Asked once with the operator's own
    first requests (list RFTJobs and TurboDeployments where it watches, read its Lease), so that
    missing credentials, an unreachable API server or missing RBAC end the process with that
    sentence (exit status 1), not with a traceback or a replica standing by forever on a Lease
    it may not read."""
    import asyncio

    import aiohttp
    import kopf
    from kuberft_core.api import API_VERSION

    from .controller import connection_info
    from .kube import ApiError, Credentials, KubeClient, resource_path

    try:
        credentials = Credentials.from_connection_info(connection_info())
    except kopf.LoginError as error:
        return f"cannot log in to Kubernetes: {error}"
    client = KubeClient(credentials, max_connections=2)
    try:
        for namespace in config.namespaces or (None,):
            for kind in ("RFTJob", "TurboDeployment"):
                await client.request("GET", resource_path(API_VERSION, kind, namespace), params={"limit": "1"})
        if config.leader_election:
            await client.get("coordination.k8s.io/v1", "Lease", config.lease_namespace, config.lease_name)
    except ApiError as error:
        if error.status == 401:
            return f"the Kubernetes API server at {credentials.server} rejects the operator's credentials ({error})"
        if error.status == 403:
            return f"the Kubernetes API server at {credentials.server} refuses the operator's requests ({error}). {RBAC_HINT}"
        if error.status == 404:
            # kopf reads which resources are served once, at start (it does not follow CRDs: that
            # would need a cluster-wide grant), so starting before the CRDs would watch nothing.
            return (f"the Kubernetes API server at {credentials.server} does not serve {API_VERSION} RFTJobs and TurboDeployments "
                    "(the CRDs are not installed): install them (the Helm chart does with crds.install=true; or "
                    "`kubectl apply --server-side -f crds/`), then start the operator")
        return None  # anything else is the controller's to report and retry
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
        return f"cannot reach the Kubernetes API server at {credentials.server} ({error or type(error).__name__})"
    finally:
        await client.close()
    return None
