"""The local API's worker-thread side: what it reads from the datapath's maps.

:class:`MapReader` runs on the datapath worker thread only (agent.worker); agent.api
(event loop) calls it there and builds its answers from the typed results.
"""

from __future__ import annotations

import ipaddress

from agent.verdict import Snapshot, trie_policy_ids
from bpf import layout as lay
from bpf.codec import policy_ids
from bpf.datapath import Datapath
from bpf.ruleset import Portset
from common.apimodels import DirectionView, ExplainRequest, PortRuleView, RuleView


class MapReader:
    def __init__(self, dp: Datapath) -> None:
        self.dp = dp

    def directions(self, ifindex: int) -> tuple[DirectionView | None, DirectionView | None]:
        """Both directions of a pod as the maps hold them."""
        rec = self.dp.pod_record(ifindex)
        if rec is None:
            return None, None
        return (
            self._direction(rec.ingress_state, rec.ingress_trie),
            self._direction(rec.egress_state, rec.egress_trie),
        )

    def _direction(self, state: int, trie_id: int) -> DirectionView:
        view = DirectionView(state=lay.STATE_NAMES.get(state, str(state)), trie_id=trie_id)
        if state == lay.NP_STATE_POLICIES_APPLIED:
            trie = self.dp.read_trie(trie_id)
            if trie is not None:
                view.rules = [
                    RuleView(cidr=str(p), ports=self._ports(ps), other=self._other(ps))
                    for p, ps in sorted(trie.entries.items())
                ]
        return view

    def _ports(self, ps: Portset) -> list[PortRuleView]:
        if ps.any_policy is not None:
            return [
                PortRuleView(
                    protocol="ANY",
                    start_port=0,
                    end_port=65535,
                    policy=self.dp.policy_name(ps.any_policy),
                )
            ]
        return [
            PortRuleView(
                protocol=lay.PROTOCOL_NAMES.get(r.protocol, str(r.protocol)),
                start_port=r.start,
                end_port=r.end,
                policy=self.dp.policy_name(r.policy_id) if r.policy_id else "",
                tier=lay.TIER_NAMES.get(r.tier, str(r.tier)),
                verdict="DENY" if r.deny else "ALLOW",
            )
            for r in ps.rules
        ]

    def _other(self, ps: Portset) -> PortRuleView | None:
        d = ps.other
        if d is None:
            return None
        return PortRuleView(
            protocol="ANY",
            start_port=0,
            end_port=65535,
            policy=self.dp.policy_name(d.policy_id) if d.policy_id else "",
            tier=lay.TIER_NAMES.get(d.tier, str(d.tier)),
            verdict="ALLOW" if d.allowed else "DENY",
        )

    def snapshot(self, req: ExplainRequest, ifindex: int) -> Snapshot:
        """What explain's decision reads from the live maps."""
        rec = self.dp.pod_record(ifindex)
        trie = None
        learned = None
        peer = ipaddress.ip_address(req.peer)
        if rec is not None:
            ingress = req.direction == "ingress"
            state = rec.ingress_state if ingress else rec.egress_state
            if state == lay.NP_STATE_POLICIES_APPLIED:
                trie = self.dp.read_trie(rec.ingress_trie if ingress else rec.egress_trie)
                if not ingress and rec.flags & lay.NP_POD_F_LEARNED:
                    learned = self.dp.learned_decision(ifindex, peer)
        names = {pid: self.dp.policy_name(pid) for pid in trie_policy_ids(trie)} if trie else {}
        if learned is not None:
            names.update({pid: self.dp.policy_name(pid) for pid in policy_ids(learned)})
        return Snapshot(
            ifindex=ifindex,
            record=rec,
            peer_is_host=self.dp.is_host_address(peer),
            trie=trie,
            policy_names=names,
            learned=learned,
        )
