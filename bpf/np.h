/* SPDX-License-Identifier: Apache-2.0 */
/*
 * np.h - the single source of truth for every structure that crosses the kernel/user
 * boundary of the network policy datapath: map keys and values, ring-buffer events and
 * the constants that give their fields meaning.
 *
 * Plain C with fixed-width types only; never includes vmlinux.h. Every struct has
 * explicit padding and a size assertion. The Python mirror is bpf/layout.py; a test
 * compares both against the BTF of the compiled object.
 *
 * Orientation: the datapath judges a packet for one pod (the "subject", whose host veth
 * the program is attached to) against one peer. Keys and events are stored as
 * pod/peer, never as packet source/destination, so one conntrack entry serves both
 * directions of a flow.
 */
#ifndef NP_H
#define NP_H

#include <linux/types.h>

/* ---- limits ------------------------------------------------------------------------ */
#define NP_MAX_PODS 8192              /* pods (host veths) on one node */
#define NP_MAX_TRIES 32768            /* rule tries alive at once (shared, swapped) */
#define NP_MAX_PORTSETS 65536         /* distinct port-rule sets alive at once */
#define NP_MAX_PORT_RULES 256         /* port rules in one set (one CIDR after merging) */
#define NP_MAX_POLICIES 65536         /* policy names known to the datapath */
#define NP_CT_DEFAULT_ENTRIES 524288  /* conntrack map size unless set at load */
#define NP_CT_MIN_ENTRIES 32768
#define NP_CT_MAX_ENTRIES 1048576
/* A tracked flow is judged by policy again (see policy.bpf.c, "tracked flows"):
 * - a TCP SYN without ACK on an entry that saw FIN or RST, or idle this long: */
#define NP_CT_SYN_IDLE_NS (10ULL * 1000000000ULL)
/* - a packet of a non-TCP flow (UDP, SCTP, ICMP) this long after it was last judged: */
#define NP_CT_LEASE_NS (60ULL * 1000000000ULL)
#define NP_CT_F_CLOSING 1             /* np_ct_value.flags: a FIN or RST was seen */
#define NP_EVENTS_DEFAULT_BYTES (4 * 1024 * 1024) /* ring buffer size unless set at load */
#define NP_FRAG_ENTRIES 8192          /* fragment trackers (first fragment -> ports) */
#define NP_HOST_ADDRS 64              /* node addresses always allowed */
#define NP_MAX_LEARNED 65536          /* addresses learned from pods' DNS answers */

/* ---- enumerations (stored in __u8 fields) ---------------------------------------- */
/* Per-direction pod state. Values match the reference agent's pod-state map. */
#define NP_STATE_POLICIES_APPLIED 0   /* evaluate the direction's rule trie */
#define NP_STATE_DEFAULT_ALLOW 1      /* direction not isolated */
#define NP_STATE_DEFAULT_DENY 2       /* isolated, nothing allowed (e.g. strict, pending) */

#define NP_DIR_INGRESS 0              /* traffic towards the pod */
#define NP_DIR_EGRESS 1               /* traffic from the pod */

#define NP_VERDICT_DENY 0
#define NP_VERDICT_ALLOW 1

/* Why a verdict was given (events, stats, explain). */
#define NP_REASON_DEFAULT_ALLOW 1     /* direction not isolated */
#define NP_REASON_DEFAULT_DENY 2      /* direction in NP_STATE_DEFAULT_DENY */
#define NP_REASON_RULE 3              /* a port rule allowed it; policy_id says whose */
#define NP_REASON_NO_PEER_MATCH 4     /* peer address in no CIDR of the trie */
#define NP_REASON_NO_PORT_MATCH 5     /* peer CIDR matched (or excepted), port did not */
#define NP_REASON_HOST 6              /* peer is a node address: always allowed */
#define NP_REASON_MISSING_TRIE 7      /* state points at a trie that is gone: fail closed */

/* Which tier decided (events, port rules): the reference's flow-log "Tier" values.
 * A pod with ClusterNetworkPolicy rules gets, per direction, one trie in which user
 * space has already folded every tier (Admin, NetworkPolicy, Baseline, default) into
 * one decision per prefix and port range: the lookup costs the same whatever the
 * number of tiers and rules. */
#define NP_TIER_ERROR 0               /* nothing could decide (e.g. a missing trie) */
#define NP_TIER_ADMIN 1
#define NP_TIER_NETWORK_POLICY 2
#define NP_TIER_BASELINE 3
#define NP_TIER_DEFAULT 4

/* Protocols in port rules: IANA numbers, plus "any". */
#define NP_PROTO_TCP 6
#define NP_PROTO_UDP 17
#define NP_PROTO_SCTP 132
#define NP_PROTO_ANY 254              /* only in user-space rule models and CLI output */

#define NP_FAMILY_IPV4 4
#define NP_FAMILY_IPV6 6

/* LPM prefix lengths count the family byte in front of the address. */
#define NP_LPM_FAMILY_BITS 8

#define NP_PORTSET_NONE 0             /* port-set id meaning "no port allowed" (except) */
#define NP_TRIE_NONE 0                /* trie id meaning "no trie" */

/* np_config.flags */
#define NP_CFG_EMIT_DENY (1U << 0)    /* ring-buffer event for every DENY */
#define NP_CFG_EMIT_ALLOW (1U << 1)   /* ring-buffer event for every new allowed flow */

/* ---- maps ------------------------------------------------------------------------- */

/* np_pods: host veth ifindex -> pod record. Replacing a record is the atomic switch of
 * a pod's whole enforcement (both directions' states and tries in one write). */
struct np_pod {
	__u32 pod_id;           /* agent-assigned id, never reused; names in np_pod_meta */
	__u32 ingress_trie;     /* np_rules key, NP_TRIE_NONE if none */
	__u32 egress_trie;
	__u8 ingress_state;     /* NP_STATE_* */
	__u8 egress_state;
	__u8 flags;             /* NP_POD_F_* (0 in records written before flags existed) */
	__u8 pad;
};
/* The pod's egress has domain-name rules: a new egress flow to an address the pod
 * learned from a DNS answer (np_learned) is decided by the learned entry. */
#define NP_POD_F_LEARNED (1U << 0)
_Static_assert(sizeof(struct np_pod) == 16, "np_pod size");

/* np_rules: trie id -> inner LPM trie (map-in-map). Tries are immutable once inserted;
 * a change builds a new trie and switches np_pods to it. */
struct np_lpm_key {
	__u32 prefixlen;        /* NP_LPM_FAMILY_BITS + address prefix length */
	__u8 family;            /* NP_FAMILY_*: its 8 bits are always part of the prefix */
	__u8 addr[16];          /* IPv4 in the first 4 bytes, the rest zero */
	__u8 pad[3];            /* never inside a prefix (max 8 + 128 bits) */
};
_Static_assert(sizeof(struct np_lpm_key) == 24, "np_lpm_key size");

struct np_lpm_value {
	__u32 portset_id;       /* np_portsets key; NP_PORTSET_NONE: nothing allowed;
	                         * with NP_LPM_INLINE: the decision itself (below) */
};
/* A prefix whose every port and protocol gets one decision (an allow-all NetworkPolicy
 * peer, an Admin Deny of all traffic, ...) carries it in the value, no port set looked
 * up: bit 31 set, bit 30 verdict, bits 26-29 tier, bits 22-25 reason, bits 0-21 the
 * policy id (NP_MAX_POLICIES fits). Port-set ids never reach bit 31. */
#define NP_LPM_INLINE (1U << 31)
#define NP_LPM_INLINE_POLICY_MASK ((1U << 22) - 1)
_Static_assert(sizeof(struct np_lpm_value) == 4, "np_lpm_value size");

/* np_portsets: port-set id -> rules. Content-addressed and immutable: the agent writes
 * a set before any trie references it and removes it only after no trie does.
 * Rules are sorted by (protocol, start_port) and disjoint; where a protocol's ranges
 * cover every port they are one rule 0..65535 (so a later fragment with unknown ports
 * is decided exactly when every port of its protocol has one decision).
 *
 * A rule decides the ports it covers: allow (NetworkPolicy rules, Admin or Baseline
 * Accept) or deny (Admin or Baseline Deny, or a later tier's denial where an Admin
 * Pass lets these ports through while the other ports are accepted). A port no rule covers, and any protocol
 * without rules, gets the set's "other" decision when NP_PORTSET_F_OTHER is set, else
 * NetworkPolicy's: denied (no port matched). Zeroed fields keep the meaning they had
 * before tiers existed (a rule written then allows, in the NetworkPolicy tier). */
struct np_port_rule {
	__u32 policy_id;        /* np_policies key of the policy this rule came from */
	__u16 start_port;       /* inclusive */
	__u16 end_port;         /* inclusive, >= start_port */
	__u8 protocol;          /* NP_PROTO_TCP/UDP/SCTP */
	__u8 deny;              /* 0: allow, 1: deny */
	__u8 tier;              /* NP_TIER_*; 0 (ERROR) reads as NP_TIER_NETWORK_POLICY */
	__u8 reason;            /* NP_REASON_*; 0 reads as NP_REASON_RULE */
};
_Static_assert(sizeof(struct np_port_rule) == 12, "np_port_rule size");

#define NP_PORTSET_F_ANY (1U << 0)   /* every protocol and port allowed by other_policy */
#define NP_PORTSET_F_OTHER (1U << 1) /* ports no rule covers: the other_* decision */
/* With NP_PORTSET_F_OTHER: the protocols that have rules. A port-less packet (a later
 * fragment whose first was not seen) of such a protocol is denied unless one rule
 * covers all its ports: its real port may be one another rule decides. */
#define NP_PORTSET_F_RULES_TCP (1U << 4)
#define NP_PORTSET_F_RULES_UDP (1U << 5)
#define NP_PORTSET_F_RULES_SCTP (1U << 6)

struct np_portset {
	__u32 count;            /* rules in use, <= NP_MAX_PORT_RULES */
	__u32 flags;            /* NP_PORTSET_F_* */
	__u32 other_policy;     /* F_ANY, F_OTHER: the policy of that decision (0: none) */
	__u8 other_verdict;     /* F_OTHER: NP_VERDICT_* */
	__u8 other_tier;        /* F_OTHER: NP_TIER_* */
	__u8 other_reason;      /* F_OTHER: NP_REASON_* */
	__u8 pad;
	struct np_port_rule rules[NP_MAX_PORT_RULES];
};
_Static_assert(sizeof(struct np_portset) == 16 + 12 * NP_MAX_PORT_RULES, "np_portset size");

/* np_ct: the datapath's own connection tracking (LRU). One entry per (pod veth, flow),
 * keyed pod/peer so that packets of either direction find it. */
struct np_ct_key {
	__u8 pod_addr[16];
	__u8 peer_addr[16];
	__u16 pod_port;         /* host byte order; 0 for port-less protocols */
	__u16 peer_port;
	__u8 protocol;
	__u8 family;
	__u8 pad[2];
	__u32 ifindex;          /* host veth of the pod */
};
_Static_assert(sizeof(struct np_ct_key) == 44, "np_ct_key size");

struct np_ct_value {
	__u64 last_seen_ns;     /* bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC_COARSE) of the
	                         * last packet */
	__u64 created_ns;       /* the same clock: when the flow was last judged */
	__u32 pod_id;
	__u8 origin;            /* NP_DIR_* of the packet that created the entry */
	__u8 reason;            /* NP_REASON_* of the verdict that created it */
	__u8 flags;             /* NP_CT_F_* */
	__u8 pad;
};
_Static_assert(sizeof(struct np_ct_value) == 24, "np_ct_value size");

/* np_frags: first fragment's ports, so later fragments are judged on real ports. */
struct np_frag_key {
	__u8 pod_addr[16];
	__u8 peer_addr[16];
	__u32 id;               /* IPv4 identification or IPv6 fragment identification */
	__u32 ifindex;
	__u8 protocol;
	__u8 family;
	__u8 pad[2];
};
_Static_assert(sizeof(struct np_frag_key) == 44, "np_frag_key size");

struct np_frag_value {
	__u16 pod_port;
	__u16 peer_port;
};
_Static_assert(sizeof(struct np_frag_value) == 4, "np_frag_value size");

/* np_learned: addresses a pod learned from its DNS answers under a name its domain rules
 * match, until they expire. The value is what a new egress flow to the address gets
 * (instead of the trie's decision), computed by user space from every tier with the
 * address added where the matching domain rules sit; it never opens more than they do.
 * An LRU: under pressure an entry is evicted, which only closes (fail closed). */
struct np_learned_key {
	__u32 ifindex;          /* host veth of the pod */
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
_Static_assert(sizeof(struct np_learned_key) == 24, "np_learned_key size");

struct np_learned_value {
	__u64 expires_ns;       /* bpf_ktime_get_ns() clock: new flows judged by the trie after */
	__u32 decision;         /* as np_lpm_value.portset_id: a port set or NP_LPM_INLINE */
	__u32 pad;
};
_Static_assert(sizeof(struct np_learned_value) == 16, "np_learned_value size");

/* np_pod_inputs: host veth ifindex -> digest of the inputs the pod's record was built
 * from (its PolicyEndpoints' identities and generations, its mode, the policy ids, the
 * compiler's own code). User space only: no program reads it. A restarted agent whose
 * inputs for the pod hash the same confirms the record in force without compiling it
 * again. All zero: unknown (written before a record changes, so a crash in between
 * leaves no stale digest). */
#define NP_INPUTS_DIGEST_LEN 32
struct np_pod_inputs {
	__u8 digest[NP_INPUTS_DIGEST_LEN];
};
_Static_assert(sizeof(struct np_pod_inputs) == 32, "np_pod_inputs size");

/* The conntrack cleaner's batched removals (sweep.bpf.c): np_sweep's context. In:
 * the batch's size and the two times; out: what became of its keys. */
#define NP_SWEEP_BATCH 4096           /* keys per run of np_sweep */
struct np_sweep_args {
	__u64 started_ns;       /* last_seen_ns at or after it: used since the sweep began */
	__u64 old_enough_ns;    /* last_seen_ns at or after it: young (kept) */
	__u32 count;            /* keys in np_sweep_keys[0..count) */
	__u32 removed;          /* out */
	__u32 touched;          /* out: kept, used since the sweep began */
	__u32 young;            /* out: kept, not idle long enough */
	__u32 gone;             /* out: no such entry any more */
	__u32 pad;
};
_Static_assert(sizeof(struct np_sweep_args) == 40, "np_sweep_args size");

/* np_host_addrs: node addresses; traffic between a pod and its node always passes. */
struct np_addr {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};
_Static_assert(sizeof(struct np_addr) == 20, "np_addr size");

/* np_host_filter: one record summarising np_host_addrs, so that a new flow from a peer
 * that is no node address (nearly every one) skips the lookup. Bit NP_HOST_FILTER_BIT(a)
 * of `bits` is set for every address in np_host_addrs; a set bit may also stand for an
 * address since removed (the lookup then answers). While `ready` is 0 (a map just
 * created, not yet written) the record summarises nothing and every flow looks up.
 * The bit of an address: the xor of its 16 bytes (the program folds 32-bit words, which
 * gives the same byte in either byte order). */
struct np_host_filter {
	__u64 bits[4];
	__u32 ready;
	__u32 pad;
};
_Static_assert(sizeof(struct np_host_filter) == 40, "np_host_filter size");

/* np_config: single-element array of datapath settings. */
struct np_config {
	__u32 flags;            /* NP_CFG_* */
	__u32 pad;
};
_Static_assert(sizeof(struct np_config) == 8, "np_config size");

/* np_stats: per-CPU counters, summed by user space. */
struct np_stats {
	__u64 packets_allowed;
	__u64 packets_denied;
	__u64 ingress_denied_packets;
	__u64 ingress_denied_bytes;
	__u64 egress_denied_packets;
	__u64 egress_denied_bytes;
	__u64 ct_hits;
	__u64 ct_inserts;
	__u64 ct_insert_errors;
	__u64 events_lost;          /* ring buffer full: decision not reported */
	__u64 unknown_pod;          /* packet on a veth without a pod record: passed */
	__u64 missing_trie;         /* pod record points at an absent trie: denied */
	__u64 fragments_untracked;  /* later fragment without its first: judged port-less */
	__u64 malformed;            /* IP header unreadable */
	__u64 ct_rejudged;          /* tracked flows judged again (closed/idle SYN, lease) */
	__u64 ct_revoked;           /* of those, denied now: entry removed, packet dropped */
};
_Static_assert(sizeof(struct np_stats) == 16 * 8, "np_stats size");

/* np_pod_drops: pod id -> what the programs denied for that pod, by direction. The
 * agent creates a pod's entry with its id (zero) and deletes it with the id, so the
 * programs only add to an entry that exists (atomically: one entry for every CPU). */
struct np_pod_drops {
	__u64 ingress_packets;
	__u64 ingress_bytes;
	__u64 egress_packets;
	__u64 egress_bytes;
};
_Static_assert(sizeof(struct np_pod_drops) == 32, "np_pod_drops size");

/* np_pod_meta / np_policies: names for ids, read by user space (flow logs, CLI). */
struct np_pod_meta {
	char namespace_[64];
	char name[256];
	char uid[40];
};
_Static_assert(sizeof(struct np_pod_meta) == 360, "np_pod_meta size");

struct np_policy_meta {
	char namespace_[64];
	char name[256];
};
_Static_assert(sizeof(struct np_policy_meta) == 320, "np_policy_meta size");

/* ---- ring buffer ------------------------------------------------------------------ */
struct np_event {
	__u64 timestamp_ns;     /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u8 pod_addr[16];
	__u8 peer_addr[16];
	__u16 pod_port;
	__u16 peer_port;
	__u8 protocol;
	__u8 family;
	__u8 verdict;           /* NP_VERDICT_* */
	__u8 direction;         /* NP_DIR_* */
	__u8 reason;            /* NP_REASON_* */
	__u8 tier;              /* NP_TIER_* */
	__u8 pad[2];
	__u32 pod_id;
	__u32 ifindex;
	__u32 policy_id;        /* policy of the allowing rule, 0 otherwise */
	__u32 packet_len;       /* skb->len */
	__u32 pad2;
};
_Static_assert(sizeof(struct np_event) == 72, "np_event size");

#endif /* NP_H */
