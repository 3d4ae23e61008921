"""How a replica stops without losing a request: Kubernetes' termination contract, in figures.

On a pod's deletion (a rolling update, a scale-down, a drained node) every container gets SIGTERM
after its preStop hook, and is killed `TERMINATION_GRACE_S` after the deletion. A replica is
tritonserver plus the OpenAI gateway beside it; the gateway is what the balancer routes to:

1. t=0: the gateway gets SIGTERM and starts draining: /health answers 503 (the balancer's check or
   the readiness probe takes the replica out) while it still serves every request that arrives.
2. t=DRAIN_S: it stops accepting connections and waits up to GATEWAY_GRACE_S for the requests it
   accepted (streams included) to finish; one still running after that gets an error.
3. t=TRITON_PRESTOP_S: tritonserver gets SIGTERM (its preStop hook sleeps until then, so the
   gateway's last requests reach it), refuses new requests and waits up to EXIT_TIMEOUT_S for the
   inferences it holds.
"""

# The balancer's check of the gateway's /health (the gateway container's readinessProbe; haproxy's
# `check inter fall` in tritonkit.replicas): a draining replica is out after PERIOD x FAILURES.
READINESS_PERIOD_S = 1
READINESS_FAILURES = 1
DRAIN_S = 5  # > that detection, and kube-proxy's endpoint updates lag a few seconds more
GATEWAY_GRACE_S = 30
TRITON_PRESTOP_S = DRAIN_S + 2
EXIT_TIMEOUT_S = 30  # tritonserver --exit-timeout-secs
# Every stage above ends within the grace period, with a margin for the processes' own exits.
TERMINATION_GRACE_S = max(DRAIN_S + GATEWAY_GRACE_S, TRITON_PRESTOP_S + EXIT_TIMEOUT_S) + 8
