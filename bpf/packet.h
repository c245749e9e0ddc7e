/* packet.h — the one L3/L4 header parser of every flowtel program (tc_flow.c, kernel_events.c,
 * fqdn_policy.c), so that all of them agree on what a packet's addresses, protocol and ports
 * are: IPv4 options, later fragments, and IPv6 extension headers are handled the same way
 * everywhere.
 *
 * The parser is written once and instantiated per way of reading bytes. Before each
 * inclusion define
 *   FLOWTEL_PARSE_FN                      the name of the function to generate, and
 *   FLOWTEL_PARSE_LOAD(ctx, off, dst, n)  an expression reading n bytes (a constant) at byte
 *                                         offset off of ctx into dst; < 0 on failure.
 * The generated function is
 *   static void FLOWTEL_PARSE_FN(CTX ctx, __u16 ethertype, __u32 l3, struct flowtel_packet *p)
 * with CTX = FLOWTEL_PARSE_CTX (default void *), l3 the offset of the IP header in ctx, and
 * ethertype in host byte order. Fields it cannot read stay zero (p must be zeroed first):
 * family 0 means "not an IP packet we could read".
 *
 * Readers provided here: flowtel_tc_load (tc: direct packet access while the headers are in
 * the linear part of the skb, bpf_skb_load_bytes beyond it) and flowtel_kernel_load (a kernel
 * pointer, for tracepoints). This part of the header has an include guard; the parser part is
 * meant to be included more than once.
 */
#ifndef FLOWTEL_PACKET_H
#define FLOWTEL_PACKET_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#define FLOWTEL_IPPROTO_ICMPV6 58
/* Keys are compared as 64-bit (or 32-bit) words: read through these types, which may alias
 * anything. A plain __u64 * onto a struct the program just filled field by field lets the
 * compiler assume the two do not alias (strict aliasing) and reorder or drop the stores (seen
 * on a branch: a connection key's zeroed client port was not seen by its word comparison). */
typedef __u64 __attribute__((may_alias)) flowtel_word64;
typedef __u32 __attribute__((may_alias)) flowtel_word32;
typedef __u16 __attribute__((may_alias)) flowtel_word16;
/* Extension headers walked to find the transport header (each costs one read). */
#define FLOWTEL_IPV6_EXT_MAX 4

/* What the parser found. Ports in host byte order; only for protocols with ports. */
struct flowtel_packet {
    __u8  saddr[16];     /* IPv4 in the first 4 bytes */
    __u8  daddr[16];
    __u32 l4off;         /* offset of the TCP/UDP/UDP-Lite/SCTP header; 0: ports not read */
    __u32 end;           /* offset just past the IP packet per its own header */
    __u16 sport;
    __u16 dport;
    __u8  family;        /* 4, 6; 0 when not IP or unreadable */
    __u8  protocol;      /* IANA L4 protocol (after IPv6 extension headers) */
    __u8  tcp_flags;     /* TCP: the flags byte */
    __u8  icmp_type;     /* ICMP / ICMPv6 of a first (or only) fragment */
    __u8  icmp_code;
    __u8  has_icmp;      /* icmp_type/code were read */
};

/* tc: offset 0 is the Ethernet header. The linear part covers the headers of almost every
 * packet (veth, GRO'd TCP), and then a read is a bounds check and a load; otherwise the
 * helper copies from the paged data. n is a compile-time constant at every call site. */
#define flowtel_tc_load(skb, off, dst, n) ({                                                   \
        void *_data = (void *)(long)(skb)->data;                                               \
        void *_end = (void *)(long)(skb)->data_end;                                            \
        __u32 _off = (off);                                                                    \
        int _rc = -1;                                                                          \
        if (_off <= 0xffff) {                                                                  \
            if (_data + _off + (n) <= _end) {                                                  \
                __builtin_memcpy((dst), _data + _off, (n));                                    \
                _rc = 0;                                                                       \
            } else {                                                                           \
                _rc = bpf_skb_load_bytes((skb), _off, (dst), (n));                             \
            }                                                                                  \
        }                                                                                      \
        _rc; })

/* Tracepoints: ctx is a kernel pointer (e.g. skb->head + skb->network_header). */
#define flowtel_kernel_load(ptr, off, dst, n) bpf_probe_read_kernel((dst), (n), (char *)(ptr) + (off))

#endif /* FLOWTEL_PACKET_H */

/* ---- the parser: instantiated once per inclusion ----------------------------------- */
#if defined(FLOWTEL_PARSE_FN) && defined(FLOWTEL_PARSE_LOAD)
#ifndef FLOWTEL_PARSE_CTX
#define FLOWTEL_PARSE_CTX void *
#endif

static __always_inline void FLOWTEL_PARSE_FN(FLOWTEL_PARSE_CTX ctx, __u16 ethertype, __u32 l3,
                                             struct flowtel_packet *p)
{
    __u32 l4off = 0;
    __u8 proto = 0;

    if (ethertype == ETH_P_IP) {
        struct iphdr ip;
        if (FLOWTEL_PARSE_LOAD(ctx, l3, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
            return;  /* short, or not an IP header (a tracepoint before the header is set) */
        p->family = 4;
        __builtin_memcpy(p->saddr, &ip.saddr, 4);
        __builtin_memcpy(p->daddr, &ip.daddr, 4);
        proto = ip.protocol;
        p->protocol = proto;
        p->end = l3 + bpf_ntohs(ip.tot_len);
        if (ip.frag_off & bpf_htons(0x1fff))
            return;  /* a later fragment carries no L4 header */
        l4off = l3 + ip.ihl * 4;
    } else if (ethertype == ETH_P_IPV6) {
        struct ipv6hdr ip6;
        if (FLOWTEL_PARSE_LOAD(ctx, l3, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
            return;
        p->family = 6;
        __builtin_memcpy(p->saddr, &ip6.saddr, 16);
        __builtin_memcpy(p->daddr, &ip6.daddr, 16);
        proto = ip6.nexthdr;
        l4off = l3 + sizeof(ip6);
        p->end = l4off + bpf_ntohs(ip6.payload_len);
#pragma unroll
        for (int i = 0; i < FLOWTEL_IPV6_EXT_MAX; i++) {
            if (proto != IPPROTO_HOPOPTS && proto != IPPROTO_ROUTING &&
                proto != IPPROTO_DSTOPTS && proto != IPPROTO_FRAGMENT)
                break;
            __u8 ext[4];
            if (FLOWTEL_PARSE_LOAD(ctx, l4off, ext, sizeof(ext)) < 0) {
                p->protocol = proto;
                return;
            }
            if (proto == IPPROTO_FRAGMENT) {
                if (((ext[2] << 8) | ext[3]) & 0xfff8) {
                    p->protocol = ext[0];
                    return;  /* not the first fragment */
                }
                l4off += 8;
            } else {
                l4off += (ext[1] + 1) * 8;
            }
            proto = ext[0];
        }
        p->protocol = proto;
    } else {
        return;
    }

    if (proto == IPPROTO_TCP) {
        __u8 tcp[14];
        if (FLOWTEL_PARSE_LOAD(ctx, l4off, tcp, sizeof(tcp)) < 0)
            return;
        p->sport = (tcp[0] << 8) | tcp[1];
        p->dport = (tcp[2] << 8) | tcp[3];
        p->tcp_flags = tcp[13];
        p->l4off = l4off;
    } else if (proto == IPPROTO_UDP || proto == IPPROTO_UDPLITE || proto == IPPROTO_SCTP) {
        __u8 ports[4];
        if (FLOWTEL_PARSE_LOAD(ctx, l4off, ports, sizeof(ports)) < 0)
            return;
        p->sport = (ports[0] << 8) | ports[1];
        p->dport = (ports[2] << 8) | ports[3];
        p->l4off = l4off;
    } else if (proto == IPPROTO_ICMP || proto == FLOWTEL_IPPROTO_ICMPV6) {
        __u8 tc[2];
        if (FLOWTEL_PARSE_LOAD(ctx, l4off, tc, sizeof(tc)) < 0)
            return;
        p->icmp_type = tc[0];
        p->icmp_code = tc[1];
        p->has_icmp = 1;
    }
}

#undef FLOWTEL_PARSE_FN
#undef FLOWTEL_PARSE_LOAD
#undef FLOWTEL_PARSE_CTX
#endif
