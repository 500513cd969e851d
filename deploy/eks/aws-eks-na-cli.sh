#!/bin/sh
# aws-eks-na-cli on the node (installed to /opt/cni/bin by the chart's install-cli init
# container, where the reference agent's image puts its CLI). The CLI itself lives in
# the node agent's image, next to the Python runtime it needs: this runs it there, in
# the running agent container, with the same arguments.
set -eu
runtime=""
for tool in crictl nerdctl; do
    if command -v "$tool" >/dev/null 2>&1; then runtime="$tool"; break; fi
done
if [ -z "$runtime" ]; then
    echo "aws-eks-na-cli: needs crictl (or nerdctl) on the node to reach the agent container" >&2
    exit 2
fi
id=""
for name in aws-eks-nodeagent agent; do
    if [ "$runtime" = crictl ]; then
        id=$(crictl ps -q --state running --name "^${name}\$" 2>/dev/null | head -n 1)
    else
        id=$(nerdctl -n k8s.io ps -q --filter "label=io.kubernetes.container.name=${name}" 2>/dev/null | head -n 1)
    fi
    [ -n "$id" ] && break
done
if [ -z "$id" ]; then
    echo "aws-eks-na-cli: no running node agent container (aws-eks-nodeagent or agent) on this node" >&2
    exit 2
fi
if [ "$runtime" = crictl ]; then
    exec crictl exec -i "$id" aws-eks-na-cli "$@"
fi
exec nerdctl -n k8s.io exec -i "$id" aws-eks-na-cli "$@"
