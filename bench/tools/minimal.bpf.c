// SPDX-License-Identifier: Apache-2.0
/*
 * minimal.bpf.c - the floor the per-packet benchmark measures our programs against.
 *
 * Two programs that do the least a policy program can do on a packet, with the same
 * keys as bpf/np.h and reading the packet directly:
 *   min_lpm   one longest-prefix-match lookup of the packet's source address (IPv4)
 *             in a trie of the same entries as the pod's (a new flow's lookup);
 *   min_hash  one LRU-hash lookup of the same 44-byte flow key our conntrack uses (an
 *             established flow's lookup).
 *   min_flow  what any stateful program does for a new flow at least: the conntrack
 *             lookup (a miss) and then the trie lookup, both as above;
 *   min_pass  nothing at all: the test loop's own cost per run.
 * Anything a real program adds (its pod record, port rules, counters) is cost above
 * this floor. Not part of the agent:
 * compiled by bench/datapath.py at run time.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "np.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1100000);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct np_lpm_key);
	__type(value, struct np_lpm_value);
} min_trie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct np_ct_key);
	__type(value, struct np_ct_value);
} min_ct SEC(".maps");

static __always_inline struct iphdr *ipv4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) + 4 > end || skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	return ip;
}

static __always_inline int ct_key(struct __sk_buff *skb, struct iphdr *ip,
				  struct np_ct_key *key)
{
	__be16 *ports = (void *)(ip + 1);

	if (ip->ihl != 5)
		return 0;
	__builtin_memcpy(key->pod_addr, &ip->daddr, 4);
	__builtin_memcpy(key->peer_addr, &ip->saddr, 4);
	key->pod_port = bpf_ntohs(ports[1]);
	key->peer_port = bpf_ntohs(ports[0]);
	key->protocol = ip->protocol;
	key->family = NP_FAMILY_IPV4;
	key->ifindex = skb->ifindex;
	return 1;
}

static __always_inline int lpm(struct iphdr *ip)
{
	struct np_lpm_key key = {};

	key.prefixlen = NP_LPM_FAMILY_BITS + 32;
	key.family = NP_FAMILY_IPV4;
	__builtin_memcpy(key.addr, &ip->saddr, 4);
	return bpf_map_lookup_elem(&min_trie, &key) ? TC_ACT_OK : TC_ACT_SHOT;
}

SEC("tc")
int min_pass(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

SEC("tc")
int min_lpm(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4(skb);

	return ip ? lpm(ip) : TC_ACT_OK;
}

SEC("tc")
int min_hash(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4(skb);
	struct np_ct_key key = {};

	if (!ip || !ct_key(skb, ip, &key))
		return TC_ACT_OK;
	return bpf_map_lookup_elem(&min_ct, &key) ? TC_ACT_OK : TC_ACT_SHOT;
}

SEC("tc")
int min_flow(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4(skb);
	struct np_ct_key key = {};

	if (!ip || !ct_key(skb, ip, &key))
		return TC_ACT_OK;
	if (bpf_map_lookup_elem(&min_ct, &key))
		return TC_ACT_OK;
	return lpm(ip);
}
