/* SPDX-License-Identifier: Apache-2.0 */
/*
 * parse.bpf.h - kernel-only packet parsing for the policy programs.
 *
 * Reads through bpf_skb_load_bytes() so that variable header lengths (IPv4 options,
 * IPv6 extension headers) and non-linear skbs are handled without packet-pointer
 * bounds gymnastics. Addresses are copied in packet orientation (src/dst); the caller
 * turns them into pod/peer.
 */
#ifndef NP_PARSE_BPF_H
#define NP_PARSE_BPF_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "np.h"

#define NP_MAX_EXT_HDRS 8

#define NP_PARSE_OK 0
#define NP_PARSE_PASS 1        /* control traffic that always passes (neighbour discovery) */
#define NP_PARSE_MALFORMED 2   /* IP header unreadable or invalid */

#define IPPROTO_HOPOPTS_ 0
#define IPPROTO_ROUTING_ 43
#define IPPROTO_FRAGMENT_ 44
#define IPPROTO_AH_ 51
#define IPPROTO_ICMPV6_ 58
#define IPPROTO_NONE_ 59
#define IPPROTO_DSTOPTS_ 60

struct np_l4 {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;           /* host byte order */
	__u16 dport;
	__u8 protocol;
	__u8 family;
	__u8 ports_known;      /* 0: later fragment, ports unknown until looked up */
	__u8 has_ports;        /* protocol carries ports (TCP, UDP, SCTP) */
	__u8 tcp_flags;        /* TCP: the header's flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) */
	__u8 pad_l4;
};

struct np_packet {
	struct np_l4 l4;
	__u32 frag_id;
	__u8 first_fragment;   /* offset 0 with more fragments: remember its ports */
	__u8 later_fragment;   /* offset != 0: no L4 header in this packet */
	__u8 icmp_error;       /* ICMP/ICMPv6 error: inner holds the offending packet */
	__u8 pad;
	struct np_l4 inner;
};

#define NP_TCP_FIN 0x01
#define NP_TCP_SYN 0x02
#define NP_TCP_RST 0x04
#define NP_TCP_ACK 0x10

static __always_inline int np_proto_has_ports(__u8 protocol)
{
	return protocol == NP_PROTO_TCP || protocol == NP_PROTO_UDP || protocol == NP_PROTO_SCTP;
}

/* Ports of a TCP/UDP/SCTP header at off (all three start with source, dest port). */
static __always_inline void np_load_ports(struct __sk_buff *skb, __u32 off, struct np_l4 *l4)
{
	__be16 ports[2];

	l4->has_ports = np_proto_has_ports(l4->protocol);
	if (!l4->has_ports) {
		l4->ports_known = 1;
		return;
	}
	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
		return; /* truncated: ports stay unknown */
	l4->sport = bpf_ntohs(ports[0]);
	l4->dport = bpf_ntohs(ports[1]);
	l4->ports_known = 1;
	if (l4->protocol == NP_PROTO_TCP)
		bpf_skb_load_bytes(skb, off + 13, &l4->tcp_flags, 1); /* truncated: stays 0 */
}

/* Inner header of an ICMP error: fixed header only, ports if present. */
static __always_inline int np_parse_inner(struct __sk_buff *skb, __u32 off, __u8 family,
					  struct np_l4 *inner)
{
	if (family == NP_FAMILY_IPV4) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
			return -1;
		__builtin_memcpy(inner->src, &ip.saddr, 4);
		__builtin_memcpy(inner->dst, &ip.daddr, 4);
		inner->protocol = ip.protocol;
		inner->family = NP_FAMILY_IPV4;
		np_load_ports(skb, off + ip.ihl * 4, inner);
	} else {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return -1;
		__builtin_memcpy(inner->src, &ip6.saddr, 16);
		__builtin_memcpy(inner->dst, &ip6.daddr, 16);
		inner->protocol = ip6.nexthdr;
		inner->family = NP_FAMILY_IPV6;
		np_load_ports(skb, off + sizeof(ip6), inner);
	}
	return inner->ports_known ? 0 : -1;
}

static __always_inline int np_parse_icmp(struct __sk_buff *skb, __u32 off, struct np_packet *pkt)
{
	__u8 type_code[2];
	__u8 type;

	if (bpf_skb_load_bytes(skb, off, type_code, sizeof(type_code)) < 0)
		return NP_PARSE_OK;
	type = type_code[0];
	if (pkt->l4.family == NP_FAMILY_IPV6) {
		/* MLD (130-132, 143) and neighbour discovery (133-137) always pass. */
		if ((type >= 130 && type <= 137) || type == 143)
			return NP_PARSE_PASS;
		/* Errors: destination unreachable, packet too big, time exceeded, parameter. */
		if (type >= 1 && type <= 4)
			pkt->icmp_error = np_parse_inner(skb, off + 8, NP_FAMILY_IPV6, &pkt->inner) == 0;
	} else {
		/* Errors: destination unreachable, time exceeded, parameter problem. */
		if (type == 3 || type == 11 || type == 12)
			pkt->icmp_error = np_parse_inner(skb, off + 8, NP_FAMILY_IPV4, &pkt->inner) == 0;
	}
	return NP_PARSE_OK;
}

static __always_inline int np_parse_ipv4(struct __sk_buff *skb, struct np_packet *pkt)
{
	struct iphdr ip;
	__u16 frag_off;
	__u32 off;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return NP_PARSE_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return NP_PARSE_MALFORMED;
	__builtin_memcpy(pkt->l4.src, &ip.saddr, 4);
	__builtin_memcpy(pkt->l4.dst, &ip.daddr, 4);
	pkt->l4.family = NP_FAMILY_IPV4;
	pkt->l4.protocol = ip.protocol;
	pkt->l4.has_ports = np_proto_has_ports(ip.protocol);
	off = ETH_HLEN + ip.ihl * 4;

	frag_off = bpf_ntohs(ip.frag_off);
	if (frag_off & 0x1fff) {
		pkt->later_fragment = 1;
		pkt->frag_id = bpf_ntohs(ip.id);
		return NP_PARSE_OK;
	}
	if (frag_off & 0x2000) {
		pkt->first_fragment = 1;
		pkt->frag_id = bpf_ntohs(ip.id);
	}
	if (ip.protocol == IPPROTO_ICMP) {
		pkt->l4.ports_known = 1;
		return np_parse_icmp(skb, off, pkt);
	}
	np_load_ports(skb, off, &pkt->l4);
	return NP_PARSE_OK;
}

struct np_ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

static __always_inline int np_parse_ipv6(struct __sk_buff *skb, struct np_packet *pkt)
{
	struct ipv6hdr ip6;
	__u8 nexthdr;
	__u32 off;
	int i;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return NP_PARSE_MALFORMED;
	if (ip6.version != 6)
		return NP_PARSE_MALFORMED;
	__builtin_memcpy(pkt->l4.src, &ip6.saddr, 16);
	__builtin_memcpy(pkt->l4.dst, &ip6.daddr, 16);
	pkt->l4.family = NP_FAMILY_IPV6;
	nexthdr = ip6.nexthdr;
	off = ETH_HLEN + sizeof(ip6);

#pragma unroll
	for (i = 0; i < NP_MAX_EXT_HDRS; i++) {
		__u8 hdr[2];

		if (nexthdr == IPPROTO_FRAGMENT_) {
			struct np_ipv6_frag frag;
			__u16 fo;

			if (bpf_skb_load_bytes(skb, off, &frag, sizeof(frag)) < 0)
				return NP_PARSE_MALFORMED;
			fo = bpf_ntohs(frag.frag_off);
			nexthdr = frag.nexthdr;
			off += sizeof(frag);
			pkt->frag_id = bpf_ntohl(frag.identification);
			if (fo & 0xfff8) {
				pkt->later_fragment = 1;
				break;
			}
			if (fo & 1)
				pkt->first_fragment = 1;
			continue;
		}
		if (nexthdr != IPPROTO_HOPOPTS_ && nexthdr != IPPROTO_ROUTING_ &&
		    nexthdr != IPPROTO_DSTOPTS_ && nexthdr != IPPROTO_AH_)
			break;
		if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) < 0)
			return NP_PARSE_MALFORMED;
		if (nexthdr == IPPROTO_AH_)
			off += ((__u32)hdr[1] + 2) * 4;
		else
			off += ((__u32)hdr[1] + 1) * 8;
		nexthdr = hdr[0];
	}

	pkt->l4.protocol = nexthdr;
	pkt->l4.has_ports = np_proto_has_ports(nexthdr);
	if (pkt->later_fragment)
		return NP_PARSE_OK;
	if (nexthdr == IPPROTO_ICMPV6_) {
		pkt->l4.ports_known = 1;
		return np_parse_icmp(skb, off, pkt);
	}
	np_load_ports(skb, off, &pkt->l4);
	return NP_PARSE_OK;
}

/* The common packet, read in place: IPv4 without options or fragmentation, or IPv6
 * without extension headers, carrying TCP, UDP or SCTP with the headers in the skb's
 * linear data. Returns 1 with pkt->l4 filled exactly as np_parse would fill it; 0 (pkt
 * untouched) for everything else, which np_parse reads through bpf_skb_load_bytes().
 * Direct reads cost a few instructions where each helper call costs tens of ns. */
static __always_inline int np_parse_direct(struct __sk_buff *skb, struct np_packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 *l4, *src, *dst;
	__u8 protocol, family, tcp_flags = 0;
	__u32 addr_len;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > end)
			return 0;
		if (*(__u8 *)ip != 0x45 || (ip->frag_off & bpf_htons(0x3fff)))
			return 0; /* options, a fragment, or not version 4 */
		protocol = ip->protocol;
		family = NP_FAMILY_IPV4;
		src = (__u8 *)&ip->saddr;
		dst = (__u8 *)&ip->daddr;
		addr_len = 4;
		l4 = (__u8 *)(ip + 1);
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > end)
			return 0;
		if ((*(__u8 *)ip6 >> 4) != 6)
			return 0;
		protocol = ip6->nexthdr;
		family = NP_FAMILY_IPV6;
		src = (__u8 *)&ip6->saddr;
		dst = (__u8 *)&ip6->daddr;
		addr_len = 16;
		l4 = (__u8 *)(ip6 + 1);
	}
	if (protocol == NP_PROTO_TCP) {
		if ((void *)(l4 + 14) > end)
			return 0;
		tcp_flags = l4[13];
	} else if (protocol == NP_PROTO_UDP || protocol == NP_PROTO_SCTP) {
		if ((void *)(l4 + 4) > end)
			return 0;
	} else {
		return 0; /* ICMP (errors name a flow), extension headers, anything else */
	}
	if (addr_len == 4) {
		__builtin_memcpy(pkt->l4.src, src, 4);
		__builtin_memcpy(pkt->l4.dst, dst, 4);
	} else {
		__builtin_memcpy(pkt->l4.src, src, 16);
		__builtin_memcpy(pkt->l4.dst, dst, 16);
	}
	pkt->l4.sport = ((__u16)l4[0] << 8) | l4[1];
	pkt->l4.dport = ((__u16)l4[2] << 8) | l4[3];
	pkt->l4.protocol = protocol;
	pkt->l4.family = family;
	pkt->l4.ports_known = 1;
	pkt->l4.has_ports = 1;
	pkt->l4.tcp_flags = tcp_flags;
	return 1;
}

/* Parse one packet. A global function: verified once on its own, so the many paths
 * through IPv4 options and IPv6 extension headers do not multiply the verification of
 * everything that follows (callers see *pkt as unknown values). */
__noinline int np_parse(struct __sk_buff *skb, struct np_packet *pkt)
{
	if (!pkt)
		return NP_PARSE_MALFORMED;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return np_parse_ipv4(skb, pkt);
	return np_parse_ipv6(skb, pkt);
}

#endif /* NP_PARSE_BPF_H */
