/* fqdn_policy.c — FQDN egress enforcement on a policed pod's host-side veth.
 *
 * ftfqdn_from_pod runs on the veth's tc ingress (packets the pod sends) and decides:
 *   - source not in fqdn_endpoints: not policed, pass;
 *   - a connection in fqdn_ct (a peer opened it, or the pod opened it to a learned address)
 *     not idle past Cilium's conntrack lifetime: pass, and its idle clock restarts;
 *   - longest (pod, dst/prefix) match in fqdn_cidr is an egressDeny destination: denied;
 *   - DNS (UDP/TCP to port 53): pass only to a destination and port fqdn_cidr allows (the DNS
 *     rule's L3 and L4 part: the resolvers the policy names); the host's nftables TPROXY rule
 *     then delivers it to the dnsproxy. DNS to any other address is denied here, never proxied;
 *   - (pod, dst) in fqdn_allow and not past until_ns, port covered: pass, and the connection
 *     is recorded in fqdn_ct so it outlives the TTL;
 *   - fqdn_cidr's match is an allowance (not a hole), port covered: pass;
 *   - otherwise: counted in fqdn_denied, and TC_ACT_SHOT (enforce) or pass (audit).
 * ICMP and ICMPv6 packets carry their type where other packets carry the destination port, so
 * `icmps` rules are port ranges of those protocols.
 * ftfqdn_to_pod runs on tc egress (packets delivered to the pod) and records connections a
 * peer opens to the pod, so the pod's answers are not mistaken for new egress.
 *
 * Program names do not start with "flowtel_": the agent's attach manager treats such filters
 * as its own leftovers and would replace them.
 *
 * Every map is pinned (FQDN_PIN_DIR, set by the loader), so a restarted proxy compiles a new
 * program over the same maps and swaps it in atomically; enforcement never pauses.
 * Compile-time constants: FQDN_PIN_DIR (a string), FQDN_MAX_ALLOW, FQDN_MAX_DENIED.
 *
 * Denied packets are aggregated here, not sent to user space one by one: a pod hammering a
 * denied address must cost neither the proxy (which answers DNS on the same CPUs, in Python)
 * nor the agent more than one map update per packet. Readers diff the cumulative counts.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>
#include "flowtel.h"

BPF_TABLE_PINNED("hash", struct fqdn_allow_key, struct fqdn_allow_val, fqdn_allow, FQDN_MAX_ALLOW,
                 FQDN_PIN_DIR "/fqdn_allow");
BPF_TABLE_PINNED("hash", struct fqdn_endpoint_key, struct fqdn_endpoint, fqdn_endpoints, 65536,
                 FQDN_PIN_DIR "/fqdn_endpoints");
BPF_TABLE_PINNED("lpm_trie", struct fqdn_cidr_key, struct fqdn_cidr_val, fqdn_cidr, 65536,
                 FQDN_PIN_DIR "/fqdn_cidr", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct fqdn_ct_key, __u64, fqdn_ct, 65536, FQDN_PIN_DIR "/fqdn_ct");
/* Connections policed pods opened to learned FQDN addresses: a map of their own, so a pod
 * opening many cannot evict the entries of connections peers opened (fqdn_ct). */
BPF_TABLE_PINNED("lru_hash", struct fqdn_ct_key, __u64, fqdn_conn, 65536, FQDN_PIN_DIR "/fqdn_conn");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, fqdn_counters, FLOWTEL_FQDN_CNT_MAX,
                 FQDN_PIN_DIR "/fqdn_counters");
BPF_TABLE_PINNED("lru_hash", struct fqdn_denied_key, struct fqdn_denied_stats, fqdn_denied, FQDN_MAX_DENIED,
                 FQDN_PIN_DIR "/fqdn_denied");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, fqdn_denied_created, FLOWTEL_FQDN_DENIED_CNT_MAX,
                 FQDN_PIN_DIR "/fqdn_denied_created");

static __always_inline void count(__u32 idx)
{
    __u64 *v = fqdn_counters.lookup(&idx);
    if (v)
        *v += 1;
}

#include "packet.h"
#define FLOWTEL_PARSE_FN flowtel_tc_parse
#define FLOWTEL_PARSE_CTX struct __sk_buff *
#define FLOWTEL_PARSE_LOAD flowtel_tc_load
#include "packet.h"

struct pkt {
    __u8  saddr[16];
    __u8  daddr[16];
    __u16 sport;
    __u16 dport;
    __u8  family;
    __u8  protocol;
    __u8  tcp_flags;
};

/* 0 on success; -1 for frames that are not IP (never policed: ARP must keep working) and for
 * IP headers the stack itself refuses (bad version or IHL, truncated: ip_rcv/ipv6_rcv drop
 * them, so passing them lets nothing through). Headers are parsed by bpf/packet.h, as in every
 * flowtel program (IPv6 extension headers are walked to the transport header, up to
 * FLOWTEL_IPV6_EXT_MAX; past them the protocol is the last header reached, which no rule's
 * protocol matches). Ports are TCP's and UDP's; a non-first fragment, or another protocol, is
 * policed on addresses alone (port 0); ICMP and ICMPv6 carry their type as the port (icmps). */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
    struct flowtel_packet fp = {};
    flowtel_tc_parse(skb, bpf_ntohs(skb->protocol), ETH_HLEN, &fp);
    if (!fp.family)
        return -1;
    __builtin_memcpy(p->saddr, fp.saddr, 16);
    __builtin_memcpy(p->daddr, fp.daddr, 16);
    p->family = fp.family;
    p->protocol = fp.protocol;
    if (fp.protocol == IPPROTO_TCP || fp.protocol == IPPROTO_UDP) {
        p->sport = fp.sport;
        p->dport = fp.dport;
        p->tcp_flags = fp.tcp_flags;
    } else if (fp.has_icmp) {
        p->dport = fp.icmp_type;  /* the ICMP type stands in for the port (icmps rules) */
    }
    return 0;
}

static __always_inline int l4_allows(struct fqdn_l4 *l4, struct pkt *p)
{
    if (l4->any_port)
        return 1;
#pragma unroll
    for (int i = 0; i < FLOWTEL_FQDN_MAX_PORTS; i++) {
        if (i >= l4->nports)
            break;
        struct fqdn_port *fp = &l4->ports[i];
        if (fp->protocol && fp->protocol != p->protocol)
            continue;
        if (fp->port == 0 || (p->dport >= fp->port && p->dport <= fp->end_port))
            return 1;
    }
    return 0;
}

/* Adds one denied packet to its fqdn_denied entry, creating the entry if it is new. */
static __always_inline void count_denied(struct __sk_buff *skb, struct pkt *p, __u8 verdict)
{
    struct fqdn_denied_key k = {};
    __builtin_memcpy(k.saddr, p->saddr, 16);
    __builtin_memcpy(k.daddr, p->daddr, 16);
    k.ifindex = skb->ifindex;
    k.dport = p->dport;
    k.family = p->family;
    k.protocol = p->protocol;
    k.verdict = verdict;
    __u64 now = bpf_ktime_get_ns();
    struct fqdn_denied_stats *st = fqdn_denied.lookup(&k);
    if (!st) {
        struct fqdn_denied_stats init = {};
        init.packets = 1;
        init.bytes = skb->len;
        init.first_ns = now;
        init.last_ns = now;
        init.last_sport = p->sport;
        init.tcp_flags = p->tcp_flags;
        if (fqdn_denied.insert(&k, &init) == 0) {  /* BPF_NOEXIST */
            __u32 idx = FLOWTEL_FQDN_DENIED_CNT_CREATED;
            __u64 *created = fqdn_denied_created.lookup(&idx);
            if (created)
                *created += 1;
            return;
        }
        /* Another CPU created it first (EEXIST): add to that one. */
        st = fqdn_denied.lookup(&k);
        if (!st) {
            count(FLOWTEL_FQDN_CNT_EVENTS_LOST);
            return;
        }
    }
    __sync_fetch_and_add(&st->packets, 1);
    __sync_fetch_and_add(&st->bytes, skb->len);
    st->last_ns = now;
    st->last_sport = p->sport;
    st->tcp_flags |= p->tcp_flags;  /* a racing OR may lose a bit; packets and bytes are exact */
}

int ftfqdn_from_pod(struct __sk_buff *skb)
{
    struct pkt p = {};
    if (parse(skb, &p) < 0)
        return TC_ACT_UNSPEC;

    struct fqdn_endpoint_key ek = {};
    __builtin_memcpy(ek.addr, p.saddr, 16);
    struct fqdn_endpoint *ep = fqdn_endpoints.lookup(&ek);
    if (!ep)
        return TC_ACT_UNSPEC;

    __u64 now = bpf_ktime_get_ns();
    struct fqdn_ct_key ck = {};
    __builtin_memcpy(ck.pod, p.saddr, 16);
    __builtin_memcpy(ck.peer, p.daddr, 16);
    ck.pod_port = p.sport;
    ck.peer_port = p.dport;
    ck.protocol = p.protocol;
    __u64 idle = (p.protocol == IPPROTO_TCP ? FLOWTEL_FQDN_CT_TCP_IDLE_S : FLOWTEL_FQDN_CT_ANY_IDLE_S) * 1000000000ULL;
    __u64 *seen = fqdn_ct.lookup(&ck);
    if (seen) {
        if (now - *seen <= idle) {
            *seen = now;
            count(FLOWTEL_FQDN_CNT_ALLOWED_REPLY);
            return TC_ACT_UNSPEC;
        }
        fqdn_ct.delete(&ck);  /* idle past its lifetime: a new connection, decided afresh */
    }
    int conn_open = 0;
    seen = fqdn_conn.lookup(&ck);
    if (seen) {
        if (now - *seen <= idle)
            conn_open = 1;  /* allowed below unless an egressDeny now covers it */
        else
            fqdn_conn.delete(&ck);
    }

    struct fqdn_cidr_key lk = {};
    lk.prefixlen = 256;
    __builtin_memcpy(lk.pod, p.saddr, 16);
    /* IPv4 as ::ffff:a.b.c.d here, so a v4 prefix (even 0.0.0.0/0) never covers a v6 address. */
    if (p.family == 4) {
        lk.dst[10] = 0xff;
        lk.dst[11] = 0xff;
        __builtin_memcpy(&lk.dst[12], p.daddr, 4);
    } else {
        __builtin_memcpy(lk.dst, p.daddr, 16);
    }
    struct fqdn_cidr_val *cv = fqdn_cidr.lookup(&lk);
    int cidr_allows = cv && cv->deny == FLOWTEL_FQDN_CIDR_ALLOW && l4_allows(&cv->l4, &p);
    if (cv && cv->deny == FLOWTEL_FQDN_CIDR_DENY)
        goto denied;
    if (conn_open) {
        fqdn_conn.update(&ck, &now);
        count(FLOWTEL_FQDN_CNT_ALLOWED_FQDN);
        return TC_ACT_UNSPEC;
    }

    if ((p.protocol == IPPROTO_UDP || p.protocol == IPPROTO_TCP) && p.dport == 53) {
        if (!cidr_allows)
            goto denied;  /* a resolver the pod's DNS rules do not name: never reaches the proxy */
        count(FLOWTEL_FQDN_CNT_ALLOWED_DNS);
        return TC_ACT_UNSPEC;
    }

    struct fqdn_allow_key ak = {};
    __builtin_memcpy(ak.pod, p.saddr, 16);
    __builtin_memcpy(ak.dst, p.daddr, 16);
    struct fqdn_allow_val *av = fqdn_allow.lookup(&ak);
    if (av) {
        if (now <= av->until_ns) {
            if (l4_allows(&av->l4, &p)) {
                count(FLOWTEL_FQDN_CNT_ALLOWED_FQDN);
                fqdn_conn.update(&ck, &now);  /* the connection outlives the TTL while it is used */
                return TC_ACT_UNSPEC;
            }
        } else {
            count(FLOWTEL_FQDN_CNT_EXPIRED);
        }
    }

    if (cidr_allows) {
        count(FLOWTEL_FQDN_CNT_ALLOWED_CIDR);
        return TC_ACT_UNSPEC;
    }

denied:;
    int audit = ep->mode == FLOWTEL_FQDN_MODE_AUDIT;
    count(audit ? FLOWTEL_FQDN_CNT_AUDIT : FLOWTEL_FQDN_CNT_DROPPED);
    count_denied(skb, &p, audit ? FLOWTEL_FQDN_VERDICT_AUDIT : FLOWTEL_FQDN_VERDICT_DROPPED);
    return audit ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}

int ftfqdn_to_pod(struct __sk_buff *skb)
{
    struct pkt p = {};
    if (parse(skb, &p) < 0)
        return TC_ACT_UNSPEC;
    /* Only a peer's connection opening matters: a SYN without ACK, or any UDP datagram from
     * a port other than 53 (DNS answers come from the proxy, sent from the resolver address the pod asked). */
    int opening = (p.protocol == IPPROTO_TCP && (p.tcp_flags & 0x12) == 0x02) ||
                  (p.protocol == IPPROTO_UDP && p.sport != 53);
    if (!opening)
        return TC_ACT_UNSPEC;
    struct fqdn_endpoint_key ek = {};
    __builtin_memcpy(ek.addr, p.daddr, 16);
    if (!fqdn_endpoints.lookup(&ek))
        return TC_ACT_UNSPEC;
    struct fqdn_ct_key ck = {};
    __builtin_memcpy(ck.pod, p.daddr, 16);
    __builtin_memcpy(ck.peer, p.saddr, 16);
    ck.pod_port = p.dport;
    ck.peer_port = p.sport;
    ck.protocol = p.protocol;
    __u64 now = bpf_ktime_get_ns();
    fqdn_ct.update(&ck, &now);
    return TC_ACT_UNSPEC;
}
