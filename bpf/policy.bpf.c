// SPDX-License-Identifier: Apache-2.0
/*
 * policy.bpf.c - NetworkPolicy enforcement on a pod's host-side veth.
 *
 * One pair of programs serves every pod on the node: np_ingress runs on the veth's tc
 * egress hook (traffic towards the pod), np_egress on its tc ingress hook (traffic from
 * the pod). Each finds its pod by the veth's ifindex in np_pods, whose record names the
 * pod's per-direction state and rule tries; replacing that record switches the pod's
 * whole rule set in one map write.
 *
 * Verdict for an IP packet:
 *   1. tracked flow (np_ct, either direction) or ICMP error about one -> pass;
 *   2. peer is a node address -> pass;
 *   3. direction state DEFAULT_ALLOW -> pass, DEFAULT_DENY -> drop;
 *   4. POLICIES_APPLIED: longest-prefix match of the peer in the direction's trie, then
 *      the port rules of that prefix (already merged with those of broader prefixes).
 *      With ClusterNetworkPolicy rules the trie holds every tier already folded into
 *      one decision per prefix and port range (see np.h, "Which tier decided"): a
 *      rule may deny, and a prefix's other ports get its "other" decision.
 * Every allowed new flow is recorded in np_ct so its replies pass even if the pod is
 * isolated later; decisions are reported on np_events when np_config asks for them.
 *
 * Tracked flows outlive a policy change (an established connection keeps going), but a
 * revoked peer cannot use a warm entry for *new* traffic. A tracked flow's packet is
 * judged by policy again, in the direction that created the entry, when:
 *   - TCP: it is a SYN without ACK (a new connection) and the entry saw a FIN or RST,
 *     or has been idle for NP_CT_SYN_IDLE_NS (a reused source port);
 *   - any other protocol (UDP, SCTP, ICMP: no end is visible): NP_CT_LEASE_NS after the
 *     flow was last judged, however busy it is (a revoked peer that keeps one source
 *     port busy is cut within the lease).
 * Allowed: the entry is renewed. Denied: the entry is removed and the packet dropped.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "np.h"
#include "parse.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Structs reached only through pointers (the map-in-map inner prototype) or only on the
 * stack (ring-buffer events) get no complete BTF of their own. Anchor them, so that the
 * object's BTF describes every shared struct: libbpf needs the inner map's key size and
 * the layout test checks every Python mirror. libbpf does not load this section. */
struct np_btf_anchor {
	struct np_lpm_key lpm_key;
	struct np_lpm_value lpm_value;
	struct np_event event;
	struct np_sweep_args sweep_args; /* sweep.bpf.c's context: one BTF for every mirror */
};
struct np_btf_anchor np_btf_anchor SEC(".np_btf") __attribute__((used));

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* replaced records are freed after RCU */
	__type(key, __u32);
	__type(value, struct np_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_pods SEC(".maps");

struct np_trie {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct np_lpm_key);
	__type(value, struct np_lpm_value);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, NP_MAX_TRIES);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct np_trie); /* must be last: a flexible array */
} np_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_PORTSETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct np_portset);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_portsets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_CT_DEFAULT_ENTRIES);
	__type(key, struct np_ct_key);
	__type(value, struct np_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_FRAG_ENTRIES);
	__type(key, struct np_frag_key);
	__type(value, struct np_frag_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_MAX_LEARNED);
	__type(key, struct np_learned_key);
	__type(value, struct np_learned_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_learned SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_HOST_ADDRS);
	__type(key, struct np_addr);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_host_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct np_host_filter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_host_filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct np_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct np_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, NP_EVENTS_DEFAULT_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_PODS);
	__type(key, __u32);
	__type(value, struct np_pod_drops);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_pod_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct np_pod_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_pod_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_POLICIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct np_policy_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct np_pod_inputs);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_pod_inputs SEC(".maps");

struct np_decision {
	__u32 policy_id;
	__u8 verdict;
	__u8 reason;
	__u8 tier;
};

/* The clock of np_ct's timestamps: CLOCK_MONOTONIC_COARSE (one tick's resolution, a
 * fraction of the cost of bpf_ktime_get_ns). The idle and lease times it measures are
 * seconds; the conntrack cleaner reads the same clock. */
static __always_inline __u64 np_ct_clock(void)
{
	return bpf_ktime_get_coarse_ns();
}

static __always_inline struct np_stats *np_stats_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&np_stats, &zero);
}

static __always_inline __u32 np_config_flags(void)
{
	__u32 zero = 0;
	struct np_config *cfg = bpf_map_lookup_elem(&np_config, &zero);

	return cfg ? cfg->flags : 0;
}

/* A decision packed in 64 bits, so that a global function can return it:
 * policy id (bits 0-31), verdict (32-39), tier (40-47), reason (48-55). */
#define NP_DECISION(policy, verdict, tier, reason)                                  \
	((__u64)(policy) | ((__u64)(verdict) << 32) | ((__u64)(tier) << 40) |        \
	 ((__u64)(reason) << 48))
#define NP_NO_PORT_MATCH \
	NP_DECISION(0, NP_VERDICT_DENY, NP_TIER_NETWORK_POLICY, NP_REASON_NO_PORT_MATCH)

/* What port set `portset_id` decides for (protocol, port). With the port unknown (a
 * later fragment whose first fragment was not seen) only a rule covering every port
 * can decide: user space writes full coverage of a protocol as one rule 0..65535.
 *
 * A global function with scalar arguments, so the verifier checks it once on its own.
 * The loop body is a single condition over values loaded in the iteration: the
 * verifier then keeps one state per iteration (12k instructions verified in all,
 * against 270k+ for a body that branches on the arguments or a binary search whose
 * indices it must track precisely). */
__noinline __u64 np_ports_decide(__u32 portset_id, __u32 protocol, __u32 port,
				 __u32 port_known)
{
	struct np_portset *set;
	__u32 count, lo, hi, has_rules;
	int i;

	if (portset_id == NP_PORTSET_NONE)
		return NP_NO_PORT_MATCH;
	set = bpf_map_lookup_elem(&np_portsets, &portset_id);
	if (!set)
		return NP_NO_PORT_MATCH;
	if (set->flags & NP_PORTSET_F_ANY)
		return NP_DECISION(set->other_policy, NP_VERDICT_ALLOW, NP_TIER_NETWORK_POLICY,
				   NP_REASON_RULE);
	count = set->count;
	lo = port_known ? port : 0;
	hi = port_known ? port : 65535;
	for (i = 0; i < NP_MAX_PORT_RULES; i++) {
		const struct np_port_rule *rule;

		if (i >= count)
			break;
		rule = &set->rules[i];
		if (rule->protocol == protocol && rule->start_port <= lo && rule->end_port >= hi)
			return NP_DECISION(rule->policy_id,
					   rule->deny ? NP_VERDICT_DENY : NP_VERDICT_ALLOW,
					   rule->tier ? rule->tier : NP_TIER_NETWORK_POLICY,
					   rule->reason ? rule->reason : NP_REASON_RULE);
	}
	if (!(set->flags & NP_PORTSET_F_OTHER))
		return NP_NO_PORT_MATCH;
	if (!port_known) {
		has_rules = protocol == NP_PROTO_TCP	? NP_PORTSET_F_RULES_TCP
			    : protocol == NP_PROTO_UDP	? NP_PORTSET_F_RULES_UDP
			    : protocol == NP_PROTO_SCTP ? NP_PORTSET_F_RULES_SCTP
							: 0;
		if (set->flags & has_rules)
			return NP_DECISION(0, NP_VERDICT_DENY, NP_TIER_ERROR,
					   NP_REASON_NO_PORT_MATCH);
	}
	return NP_DECISION(set->other_policy, set->other_verdict, set->other_tier,
			   set->other_reason);
}

/* The decision a trie value (or a learned address's) stands for: inline, or by its
 * port set. */
static __always_inline void np_decide_value(__u32 value, const struct np_ct_key *flow,
					    __u16 rule_port, __u8 port_known,
					    struct np_decision *d)
{
	__u64 decided;

	if (value & NP_LPM_INLINE) {
		d->policy_id = value & NP_LPM_INLINE_POLICY_MASK;
		d->verdict = (value >> 30) & 1;
		d->tier = (value >> 26) & 0xf;
		d->reason = (value >> 22) & 0xf;
		return;
	}
	decided = np_ports_decide(value, flow->protocol, rule_port, port_known);
	d->policy_id = (__u32)decided;
	d->verdict = (__u8)(decided >> 32);
	d->tier = (__u8)(decided >> 40);
	d->reason = (__u8)(decided >> 48);
}

/* A live learned entry for the peer (see np_learned): its decision value, else 0. */
static __always_inline __u32 np_learned_decision(const struct np_ct_key *flow)
{
	struct np_learned_key key = {};
	struct np_learned_value *v;

	key.ifindex = flow->ifindex;
	key.family = flow->family;
	__builtin_memcpy(key.addr, flow->peer_addr, 16);
	v = bpf_map_lookup_elem(&np_learned, &key);
	if (!v || bpf_ktime_get_ns() >= v->expires_ns)
		return 0;
	return v->decision;
}

static __always_inline void np_evaluate(const struct np_ct_key *flow, __u16 rule_port,
					__u8 port_known, __u8 state, __u32 trie_id,
					__u8 learned, struct np_decision *d)
{
	struct np_lpm_key lpm = {};
	struct np_lpm_value *match;
	__u32 value;
	void *trie;

	if (state == NP_STATE_DEFAULT_ALLOW) {
		d->verdict = NP_VERDICT_ALLOW;
		d->reason = NP_REASON_DEFAULT_ALLOW;
		d->tier = NP_TIER_DEFAULT;
		return;
	}
	d->verdict = NP_VERDICT_DENY;
	if (state != NP_STATE_POLICIES_APPLIED) {
		d->reason = NP_REASON_DEFAULT_DENY;
		d->tier = NP_TIER_DEFAULT;
		return;
	}
	if (learned) {
		value = np_learned_decision(flow);
		if (value) {
			np_decide_value(value, flow, rule_port, port_known, d);
			return;
		}
	}
	trie = bpf_map_lookup_elem(&np_rules, &trie_id);
	if (!trie) {
		d->reason = NP_REASON_MISSING_TRIE;
		d->tier = NP_TIER_ERROR;
		return;
	}
	lpm.family = flow->family;
	lpm.prefixlen = NP_LPM_FAMILY_BITS + (flow->family == NP_FAMILY_IPV4 ? 32 : 128);
	__builtin_memcpy(lpm.addr, flow->peer_addr, 16);
	match = bpf_map_lookup_elem(trie, &lpm);
	if (!match) {
		d->reason = NP_REASON_NO_PEER_MATCH;
		d->tier = NP_TIER_NETWORK_POLICY;
		return;
	}
	np_decide_value(match->portset_id, flow, rule_port, port_known, d);
}

static __always_inline void np_emit(struct __sk_buff *skb, const struct np_ct_key *flow,
				    const struct np_pod *pod, const struct np_decision *d,
				    __u8 direction, struct np_stats *stats)
{
	struct np_event *ev = bpf_ringbuf_reserve(&np_events, sizeof(*ev), 0);

	if (!ev) {
		if (stats)
			stats->events_lost++;
		return;
	}
	ev->timestamp_ns = bpf_ktime_get_ns();
	__builtin_memcpy(ev->pod_addr, flow->pod_addr, 16);
	__builtin_memcpy(ev->peer_addr, flow->peer_addr, 16);
	ev->pod_port = flow->pod_port;
	ev->peer_port = flow->peer_port;
	ev->protocol = flow->protocol;
	ev->family = flow->family;
	ev->verdict = d->verdict;
	ev->direction = direction;
	ev->reason = d->reason;
	ev->tier = d->tier;
	ev->pad[0] = ev->pad[1] = 0;
	ev->pod_id = pod->pod_id;
	ev->ifindex = flow->ifindex;
	ev->policy_id = d->policy_id;
	ev->packet_len = skb->len;
	ev->pad2 = 0;
	bpf_ringbuf_submit(ev, 0);
}

/* A packet denied by policy: the node's counters and the pod's (np_pod_drops). */
static __always_inline void np_count_denied(struct __sk_buff *skb, __u32 pod_id, __u8 direction,
					    struct np_stats *stats)
{
	struct np_pod_drops *drops = bpf_map_lookup_elem(&np_pod_drops, &pod_id);
	__u64 len = skb->len;

	if (stats) {
		stats->packets_denied++;
		if (direction == NP_DIR_INGRESS) {
			stats->ingress_denied_packets++;
			stats->ingress_denied_bytes += len;
		} else {
			stats->egress_denied_packets++;
			stats->egress_denied_bytes += len;
		}
	}
	if (!drops)
		return;
	if (direction == NP_DIR_INGRESS) {
		__sync_fetch_and_add(&drops->ingress_packets, 1);
		__sync_fetch_and_add(&drops->ingress_bytes, len);
	} else {
		__sync_fetch_and_add(&drops->egress_packets, 1);
		__sync_fetch_and_add(&drops->egress_bytes, len);
	}
}

/* Orient a packet tuple as pod/peer for this hook. */
static __always_inline void np_orient(const struct np_l4 *l4, __u8 direction, __u32 ifindex,
				      struct np_ct_key *key)
{
	if (direction == NP_DIR_INGRESS) {
		__builtin_memcpy(key->pod_addr, l4->dst, 16);
		__builtin_memcpy(key->peer_addr, l4->src, 16);
		key->pod_port = l4->dport;
		key->peer_port = l4->sport;
	} else {
		__builtin_memcpy(key->pod_addr, l4->src, 16);
		__builtin_memcpy(key->peer_addr, l4->dst, 16);
		key->pod_port = l4->sport;
		key->peer_port = l4->dport;
	}
	key->protocol = l4->protocol;
	key->family = l4->family;
	key->ifindex = ifindex;
}

/* Later fragments carry no ports: take them from the first fragment if it was seen. */
static __always_inline void np_track_fragment(struct np_packet *pkt, struct np_ct_key *key)
{
	struct np_frag_key fk = {};
	struct np_frag_value *fv;

	__builtin_memcpy(fk.pod_addr, key->pod_addr, 16);
	__builtin_memcpy(fk.peer_addr, key->peer_addr, 16);
	fk.id = pkt->frag_id;
	fk.ifindex = key->ifindex;
	fk.protocol = key->protocol;
	fk.family = key->family;
	if (pkt->first_fragment && pkt->l4.ports_known) {
		struct np_frag_value v = { .pod_port = key->pod_port, .peer_port = key->peer_port };

		bpf_map_update_elem(&np_frags, &fk, &v, BPF_ANY);
		return;
	}
	if (!pkt->later_fragment)
		return;
	fv = bpf_map_lookup_elem(&np_frags, &fk);
	if (fv) {
		key->pod_port = fv->pod_port;
		key->peer_port = fv->peer_port;
		pkt->l4.ports_known = 1;
	}
}

/* Whether the peer is one of the node's addresses: np_host_filter first (see np.h), the
 * lookup only when its bit is set. */
static __always_inline int np_is_host(const struct np_ct_key *key)
{
	struct np_host_filter *filter;
	struct np_addr a = {};
	__u32 zero = 0, w[4], x;

	filter = bpf_map_lookup_elem(&np_host_filter, &zero);
	if (filter && filter->ready) {
		__builtin_memcpy(w, key->peer_addr, 16);
		x = w[0] ^ w[1] ^ w[2] ^ w[3];
		x ^= x >> 16;
		x = (x ^ (x >> 8)) & 0xff;
		if (!(filter->bits[x >> 6] & (1ULL << (x & 63))))
			return 0;
	}
	__builtin_memcpy(a.addr, key->peer_addr, 16);
	a.family = key->family;
	return bpf_map_lookup_elem(&np_host_addrs, &a) != 0;
}

/* A tracked flow due to be judged again. A TCP SYN is a new connection: judged in its own
 * direction, like any new flow (the entry is replaced). Any other packet continues the
 * flow: judged in the direction that created the entry, on that direction's port. */
static __always_inline int np_rejudge(struct __sk_buff *skb, const struct np_ct_key *key,
				      struct np_ct_value *ct, const struct np_pod *pod,
				      __u8 direction, __u8 tcpf, struct np_stats *stats)
{
	struct np_decision d = {};
	__u8 judged = key->protocol == NP_PROTO_TCP ? direction : ct->origin;
	__u8 state = judged == NP_DIR_INGRESS ? pod->ingress_state : pod->egress_state;
	__u64 now = np_ct_clock();

	if (np_is_host(key)) {
		d.verdict = NP_VERDICT_ALLOW;
		d.reason = NP_REASON_HOST;
		d.tier = NP_TIER_ADMIN; /* the node's addresses: Admin Accept above every rule */
	} else {
		np_evaluate(key, judged == NP_DIR_INGRESS ? key->pod_port : key->peer_port, 1,
			    state, judged == NP_DIR_INGRESS ? pod->ingress_trie : pod->egress_trie,
			    judged == NP_DIR_EGRESS && (pod->flags & NP_POD_F_LEARNED), &d);
	}
	if (d.verdict == NP_VERDICT_ALLOW) {
		/* Renewed in place: replacing the entry would take a fresh element from the LRU
		 * and free this one, both under the map's locks, for every reused source port. */
		ct->last_seen_ns = now;
		ct->created_ns = now;
		ct->pod_id = pod->pod_id;
		ct->origin = judged;
		ct->reason = d.reason;
		ct->flags = 0;
		if (stats)
			stats->packets_allowed++;
		if (np_config_flags() & NP_CFG_EMIT_ALLOW)
			np_emit(skb, key, pod, &d, judged, stats);
		return TC_ACT_OK;
	}
	bpf_map_delete_elem(&np_ct, key);
	if (stats)
		stats->ct_revoked++;
	np_count_denied(skb, pod->pod_id, direction, stats);
	if (np_config_flags() & NP_CFG_EMIT_DENY)
		np_emit(skb, key, pod, &d, judged, stats);
	return TC_ACT_SHOT;
}

/* The pod record of the veth, copied; 0 (and counted) when the veth has none. */
static __always_inline int np_pod_of(__u32 ifindex, struct np_pod *pod, struct np_stats *stats)
{
	struct np_pod *podp = bpf_map_lookup_elem(&np_pods, &ifindex);

	if (!podp) {
		if (stats)
			stats->unknown_pod++;
		return 0;
	}
	*pod = *podp;
	return 1;
}

static __always_inline int np_handle(struct __sk_buff *skb, const __u8 direction)
{
	struct np_decision d = {};
	struct np_packet pkt = {};
	struct np_ct_key key = {};
	struct np_ct_value *ct;
	struct np_stats *stats;
	struct np_pod pod;
	__u32 ifindex = skb->ifindex;
	__u8 port_known;
	__u8 state;
	int rc;

	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_OK; /* ARP and every other non-IP frame */

	stats = np_stats_get();
	rc = np_parse_direct(skb, &pkt) ? NP_PARSE_OK : np_parse(skb, &pkt);
	if (rc == NP_PARSE_PASS)
		return TC_ACT_OK;
	if (rc == NP_PARSE_MALFORMED) {
		if (!np_pod_of(ifindex, &pod, stats))
			return TC_ACT_OK;
		if (stats)
			stats->malformed++;
		state = direction == NP_DIR_INGRESS ? pod.ingress_state : pod.egress_state;
		return state == NP_STATE_DEFAULT_ALLOW ? TC_ACT_OK : TC_ACT_SHOT;
	}

	np_orient(&pkt.l4, direction, ifindex, &key);
	if (pkt.first_fragment || pkt.later_fragment)
		np_track_fragment(&pkt, &key);
	port_known = pkt.l4.ports_known;
	if (!port_known && stats)
		stats->fragments_untracked++;

	/* 1. A tracked flow passes in both directions, whatever the rules say now, unless it
	 *    is due to be judged again (see the top of this file). */
	if (port_known) {
		ct = bpf_map_lookup_elem(&np_ct, &key);
		if (ct) {
			__u64 now = np_ct_clock();
			__u8 tcpf = pkt.l4.tcp_flags;
			int again;

			if (key.protocol == NP_PROTO_TCP)
				again = (tcpf & (NP_TCP_SYN | NP_TCP_ACK)) == NP_TCP_SYN &&
					((ct->flags & NP_CT_F_CLOSING) ||
					 (__s64)(now - ct->last_seen_ns) > (__s64)NP_CT_SYN_IDLE_NS);
			else
				again = (__s64)(now - ct->created_ns) > (__s64)NP_CT_LEASE_NS;
			if (!again) {
				/* the clock moves once a tick: most packets write nothing */
				if (ct->last_seen_ns != now)
					ct->last_seen_ns = now;
				if (key.protocol == NP_PROTO_TCP && (tcpf & (NP_TCP_FIN | NP_TCP_RST)) &&
				    !(ct->flags & NP_CT_F_CLOSING))
					ct->flags |= NP_CT_F_CLOSING;
				if (stats) {
					stats->ct_hits++;
					stats->packets_allowed++;
				}
				return TC_ACT_OK;
			}
			if (!np_pod_of(ifindex, &pod, stats))
				return TC_ACT_OK;
			if (stats)
				stats->ct_rejudged++;
			return np_rejudge(skb, &key, ct, &pod, direction, tcpf, stats);
		}
	}
	if (!np_pod_of(ifindex, &pod, stats))
		return TC_ACT_OK;
	state = direction == NP_DIR_INGRESS ? pod.ingress_state : pod.egress_state;
	if (pkt.icmp_error) {
		struct np_ct_key related = {};

		/* The offending packet went the other way: its sender is the peer's target. */
		np_orient(&pkt.inner, direction ^ 1, ifindex, &related);
		ct = bpf_map_lookup_elem(&np_ct, &related);
		if (ct) {
			if (stats) {
				stats->ct_hits++;
				stats->packets_allowed++;
			}
			return TC_ACT_OK;
		}
	}

	/* 2-4. A new flow. */
	if (np_is_host(&key)) {
		d.verdict = NP_VERDICT_ALLOW;
		d.reason = NP_REASON_HOST;
		d.tier = NP_TIER_ADMIN; /* the node's addresses: Admin Accept above every rule */
	} else {
		np_evaluate(&key, direction == NP_DIR_INGRESS ? key.pod_port : key.peer_port,
			    port_known, state,
			    direction == NP_DIR_INGRESS ? pod.ingress_trie : pod.egress_trie,
			    direction == NP_DIR_EGRESS && (pod.flags & NP_POD_F_LEARNED), &d);
	}

	if (d.verdict == NP_VERDICT_ALLOW) {
		if (port_known) {
			__u64 now = np_ct_clock();
			struct np_ct_value v = {
				.last_seen_ns = now,
				.created_ns = now,
				.pod_id = pod.pod_id,
				.origin = direction,
				.reason = d.reason,
			};

			if (bpf_map_update_elem(&np_ct, &key, &v, BPF_ANY) == 0) {
				if (stats)
					stats->ct_inserts++;
			} else if (stats) {
				stats->ct_insert_errors++;
			}
		}
		if (stats)
			stats->packets_allowed++;
		if (np_config_flags() & NP_CFG_EMIT_ALLOW)
			np_emit(skb, &key, &pod, &d, direction, stats);
		return TC_ACT_OK;
	}

	np_count_denied(skb, pod.pod_id, direction, stats);
	if (np_config_flags() & NP_CFG_EMIT_DENY)
		np_emit(skb, &key, &pod, &d, direction, stats);
	return TC_ACT_SHOT;
}

/* Test builds only (-DNP_BUILD_VARIANT=n): programs that differ from the committed ones
 * by one harmless instruction, to exercise an upgrade of the programs on live veths.
 * Without it (the committed objects) this expands to nothing. */
#ifdef NP_BUILD_VARIANT
#define NP_VARIANT_MARK()                                   \
	do {                                                \
		volatile __u32 np_variant = NP_BUILD_VARIANT; \
		(void)np_variant;                           \
	} while (0)
#else
#define NP_VARIANT_MARK() do { } while (0)
#endif

/* The pod's ingress: attached to the host veth's tc egress hook. */
SEC("tc")
int np_ingress(struct __sk_buff *skb)
{
	NP_VARIANT_MARK();
	return np_handle(skb, NP_DIR_INGRESS);
}

/* The pod's egress: attached to the host veth's tc ingress hook. */
SEC("tc")
int np_egress(struct __sk_buff *skb)
{
	NP_VARIANT_MARK();
	return np_handle(skb, NP_DIR_EGRESS);
}
