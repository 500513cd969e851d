#!/usr/bin/env bash
# Bring up the dev stack: a kind cluster, the np-node-agent image loaded into its node,
# the chart installed with the resolver on, and the walkthrough's workloads.
# Run by `docker compose up` (service "kind"); idempotent.
set -euo pipefail
CLUSTER=${CLUSTER:-np-dev}
IMAGE=${IMAGE:-np-node-agent:dev}
export KUBECONFIG=${KUBECONFIG:-/work/kube/config}

if ! kind get clusters | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config /work/deploy/kind-config.yaml --wait 120s
fi
kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG"
kind load docker-image "$IMAGE" --name "$CLUSTER"
helm upgrade --install np-node-agent /work/charts/np-node-agent \
    --namespace kube-system --values /work/deploy/values-kind.yaml --wait --timeout 5m
kubectl apply -f /work/examples/walkthrough/00-apps.yaml
kubectl wait --for=condition=Available deployment --all -n default --timeout=180s
kubectl wait --for=condition=Available deployment --all -n another-ns --timeout=180s
cat <<MSG
np-node-agent is running on kind cluster "$CLUSTER" (kubeconfig: ./.kube/config).
Walk through the policies:
  export KUBECONFIG=\$PWD/.kube/config
  kubectl exec deploy/client-one -- curl -sm3 demo-app
  kubectl apply -f examples/walkthrough/01-deny-all-ingress.yaml
  kubectl exec deploy/client-one -- curl -sm3 demo-app    # times out
  docker exec $CLUSTER-control-plane crictl ps | grep np-  # the agent's containers
Tear down: docker compose run --rm kind /work/deploy/down.sh
MSG
