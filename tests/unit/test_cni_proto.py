"""The CNI's wire contract: what the VPC CNI's Go client sends must parse here, and what
we answer must parse there. The bytes below are built by hand from the field numbers of
the VPC CNI's rpc/rpc.proto (tag = field << 3 | wire type), not from our own messages."""

from __future__ import annotations

from agent.cni import generate
from agent.cni import rpc_pb2 as pb
from agent.cni.service import CONFIG_BACKEND, NP_BACKEND, path
from agent.hostnet import cni_veth_name


def _string(field: int, text: str) -> bytes:
    data = text.encode()
    return bytes([field << 3 | 2, len(data)]) + data


def _varint(field: int, value: int) -> bytes:
    return bytes([field << 3 | 0, value])


def test_generated_messages_are_fresh() -> None:
    assert generate.stale() == [], "run: python -m agent.cni.generate"


def test_enforce_request_as_the_cni_sends_it() -> None:
    wire = _string(1, "web-2") + _string(2, "kube-system") + _string(3, "strict") + _varint(4, 2)
    req = pb.EnforceNpRequest.FromString(wire)
    assert (req.K8S_POD_NAME, req.K8S_POD_NAMESPACE) == ("web-2", "kube-system")
    assert (req.NETWORK_POLICY_MODE, req.InterfaceCount) == ("strict", 2)
    assert req.SerializeToString() == wire


def test_delete_request_and_replies() -> None:
    req = pb.DeleteNpRequest.FromString(_string(1, "a") + _string(2, "b"))
    assert (req.K8S_POD_NAME, req.K8S_POD_NAMESPACE) == ("a", "b")
    assert pb.EnforceNpReply(Success=True).SerializeToString() == _varint(1, 1)
    assert pb.DeleteNpReply(Success=True).SerializeToString() == _varint(1, 1)


def test_ipamd_config_reply_fields() -> None:
    wire = (
        _string(1, "standard")
        + _varint(2, 1)
        + _string(3, "10.0.0.5")
        + _string(4, "fd00::5")
        + _string(5, "i-0abc")
        + _string(6, "us-west-2")
    )
    reply = pb.NetworkPolicyAgentConfigReply.FromString(wire)
    assert reply.NetworkPolicyMode == "standard"
    assert reply.MultiNICEnabled is True
    assert (reply.NodeIPv4, reply.NodeIPv6) == ("10.0.0.5", "fd00::5")
    assert (reply.InstanceID, reply.Region) == ("i-0abc", "us-west-2")


def test_method_paths() -> None:
    assert path(NP_BACKEND, "EnforceNpToPod") == "/rpc.NPBackend/EnforceNpToPod"
    assert path(NP_BACKEND, "DeletePodNp") == "/rpc.NPBackend/DeletePodNp"
    assert (
        path(CONFIG_BACKEND, "GetNetworkPolicyConfigs")
        == "/rpc.ConfigServerBackend/GetNetworkPolicyConfigs"
    )


def test_host_veth_names_match_the_cni_test_vectors() -> None:
    # cmd/routed-eni-cni-plugin/cni_test.go (empty pod args): "eni" + podHash, and the
    # second network card's "enice799470a46"
    assert cni_veth_name("eni", "", "") == "eni3a52ce78095"
    assert cni_veth_name("eni", "", "", 1) == "enice799470a46"
    assert cni_veth_name("vlan", "", "") == "vlan3a52ce78095"
    assert len(cni_veth_name("eni", "kube-system", "web-2")) == 14
