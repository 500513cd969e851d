# np-node-agent image: the four processes (np-agent, np-conntrack, np-flowlogs,
# np-resolver) and the CLIs (np-cli, aws-eks-na-cli) on a Python runtime with the
# system libbpf. The BPF objects are the prebuilt ones committed under bpf/ (CO-RE:
# they load on any kernel with BTF); no compiler in the image.
#
#   docker build -t np-node-agent:dev .
#
# The chart runs one container per process from this image, sharing /sys/fs/bpf and
# the socket directory (see charts/np-node-agent). The entrypoint, /controller, runs the
# node's processes in one container instead: the aws-eks-nodeagent slot of EKS's aws-node
# DaemonSet, which starts the image with the reference agent's flags and no command.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bpf/ bpf/
COPY common/ common/
COPY agent/ agent/
COPY cli/ cli/
COPY resolver/ resolver/
COPY conntrack/ conntrack/
COPY flowlogs/ flowlogs/
# every dependency ships a wheel: nothing is compiled here either
RUN python -m venv /opt/np \
 && /opt/np/bin/pip install --only-binary=:all: --no-compile . \
 && /opt/np/bin/python -m compileall -q /opt/np/lib \
 && /opt/np/bin/python -c "import bpf.datapath, bpf.layout; from bpf.datapath import object_path; open(object_path(), 'rb').close()"

FROM ${PYTHON_IMAGE}
# libbpf1 loads the objects; util-linux gives the bpffs init container `mountpoint`;
# nftables: the strict-mode gate (agent/gate.py)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libbpf1 util-linux nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/np /opt/np
# the node-side CLI wrapper the chart's install-cli init container copies to the host
COPY deploy/eks/aws-eks-na-cli.sh /opt/np/share/aws-eks-na-cli
# the reference image's layout: /controller (the entrypoint EKS runs with the reference
# flags in the aws-eks-nodeagent container) and /aws-eks-na-cli
RUN ln -s /opt/np/bin/np-controller /controller \
 && ln -s /opt/np/bin/aws-eks-na-cli /aws-eks-na-cli
ENV PATH=/opt/np/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="np-node-agent" \
      org.opencontainers.image.description="NetworkPolicy node agent enforcing PolicyEndpoints with eBPF"
ENTRYPOINT ["/controller"]
CMD ["--help"]
