/* tc_flow.c — per-flow packet/byte/TCP-flag counters on tc clsact ingress and egress.
 *
 * Aggregates in the kernel: user space drains the counters on an interval, never per packet.
 * Two flow maps are used as a double buffer: the program writes to flow_maps[flow_active[0]];
 * user space flips the index, waits for in-flight programs to finish, then
 * drains the other map with no concurrent writer, so no increment can be lost to a delete.
 *
 * DNS is counted and matched in the kernel too, with samples for user space (bpf/dns.h).
 *
 * Compile-time constants (set by the loader): FLOWTEL_MAX_FLOWS; FLOWTEL_DNS (0/1) and, when
 * 1, the constants bpf/dns.h lists.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include "flowtel.h"

BPF_TABLE("lru_hash", struct flow_key, struct flow_stats, flows_0, FLOWTEL_MAX_FLOWS);
BPF_TABLE("lru_hash", struct flow_key, struct flow_stats, flows_1, FLOWTEL_MAX_FLOWS);
BPF_ARRAY(flow_active, __u32, 1);
/* flow_maps[i] = flows_i, filled by the loader; map-in-map lets one code path serve both. */
BPF_ARRAY_OF_MAPS(flow_maps, "flows_0", 2);
BPF_TABLE("percpu_hash", struct iface_key, struct iface_stats, iface_totals, 4096);
BPF_PERCPU_ARRAY(counters, __u64, FLOWTEL_CNT_MAX);

static __always_inline void count_event(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        *v += 1;
}

/* Where parse() found the transport header, for the DNS capture. */
struct l4_info {
    __u32 off;  /* offset of the TCP/UDP header; 0 when the ports were not read */
    __u32 end;  /* offset just past the IP packet per its header (excludes Ethernet padding) */
};

/* Parse what the key needs. Uses bpf_skb_load_bytes so non-linear skbs (GSO, veth
 * with paged data) are read correctly. At tc, offset 0 is the Ethernet header. */
static __always_inline void parse(struct __sk_buff *skb, struct flow_key *key, __u8 *flags,
                                  struct l4_info *l4)
{
    __u16 ethertype = bpf_ntohs(skb->protocol);
    __u32 l4off = 0;
    __u8 proto = 0;

    key->ethertype = ethertype;
    if (ethertype == ETH_P_IP) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
            return;
        key->family = 4;
        __builtin_memcpy(key->saddr, &ip.saddr, 4);
        __builtin_memcpy(key->daddr, &ip.daddr, 4);
        proto = ip.protocol;
        key->protocol = proto;
        l4->end = ETH_HLEN + bpf_ntohs(ip.tot_len);
        /* Later fragments carry no L4 header. */
        if (ip.frag_off & bpf_htons(0x1fff))
            return;
        l4off = ETH_HLEN + ip.ihl * 4;
    } else if (ethertype == ETH_P_IPV6) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
            return;
        key->family = 6;
        __builtin_memcpy(key->saddr, &ip6.saddr, 16);
        __builtin_memcpy(key->daddr, &ip6.daddr, 16);
        proto = ip6.nexthdr;
        l4off = ETH_HLEN + sizeof(ip6);
        l4->end = l4off + bpf_ntohs(ip6.payload_len);
        /* Walk a bounded number of extension headers to find the transport header. */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (proto != IPPROTO_HOPOPTS && proto != IPPROTO_ROUTING &&
                proto != IPPROTO_DSTOPTS && proto != IPPROTO_FRAGMENT)
                break;
            __u8 ext[8];
            if (bpf_skb_load_bytes(skb, l4off, ext, sizeof(ext)) < 0)
                return;
            if (proto == IPPROTO_FRAGMENT) {
                proto = ext[0];
                key->protocol = proto;
                if (((ext[2] << 8) | ext[3]) & 0xfff8)  /* not the first fragment */
                    return;
                l4off += 8;
            } else {
                proto = ext[0];
                l4off += (ext[1] + 1) * 8;
            }
        }
        key->protocol = proto;
    } else {
        return;
    }

    if (proto == IPPROTO_TCP) {
        __u8 tcp[14];
        if (bpf_skb_load_bytes(skb, l4off, tcp, sizeof(tcp)) < 0)
            return;
        key->sport = (tcp[0] << 8) | tcp[1];
        key->dport = (tcp[2] << 8) | tcp[3];
        *flags = tcp[13];
        l4->off = l4off;
    } else if (proto == IPPROTO_UDP || proto == IPPROTO_SCTP || proto == IPPROTO_UDPLITE) {
        __u8 ports[4];
        if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)) < 0)
            return;
        key->sport = (ports[0] << 8) | ports[1];
        key->dport = (ports[2] << 8) | ports[3];
        l4->off = l4off;
    } else if (proto == IPPROTO_ICMP || proto == 58 /* IPPROTO_ICMPV6 */) {
        __u8 tc[2];
        if (bpf_skb_load_bytes(skb, l4off, tc, sizeof(tc)) < 0)
            return;
        key->sport = tc[0];
        key->dport = tc[1];
    }
}

/* DNS (bpf/dns.h): parsed, counted and matched in the kernel; samples to user space. */
#include "dns.h"

static __always_inline int account(struct __sk_buff *skb, __u8 hook)
{
    struct flow_key key = {};
    __u8 flags = 0;
    __u64 now = bpf_ktime_get_ns();
    __u64 len = skb->len;

    key.ifindex = skb->ifindex;
    key.hook = hook;
    struct l4_info l4 = {};
    parse(skb, &key, &flags, &l4);
#if FLOWTEL_DNS
    dns_observe(skb, &key, hook, l4.off, l4.end, now);
#endif

    struct iface_key ik = {.ifindex = skb->ifindex, .hook = hook};
    struct iface_stats *is = iface_totals.lookup(&ik);
    if (!is) {
        struct iface_stats zero = {};
        iface_totals.update(&ik, &zero);
        is = iface_totals.lookup(&ik);
    }
    if (is) {
        is->packets += 1;  /* per-CPU value: no atomics needed */
        is->bytes += len;
    } else {
        count_event(FLOWTEL_CNT_IFACE_UPDATE_FAIL);
    }

    __u32 zero_idx = 0;
    __u32 *active = flow_active.lookup(&zero_idx);
    __u32 slot = (active && *active == 1) ? 1 : 0;
    void *flows = flow_maps.lookup(&slot);
    if (!flows) {
        count_event(FLOWTEL_CNT_FLOW_UPDATE_FAIL);
        return TC_ACT_UNSPEC;
    }
    struct flow_stats *st = bpf_map_lookup_elem(flows, &key);
    if (!st) {
        struct flow_stats init = {};
        init.first_ns = now;
        /* BPF_NOEXIST: of two CPUs racing to create a flow, one counts the creation. */
        if (bpf_map_update_elem(flows, &key, &init, BPF_NOEXIST) == 0)
            count_event(FLOWTEL_CNT_FLOWS_CREATED_0 + slot);
        st = bpf_map_lookup_elem(flows, &key);
        if (!st) {
            count_event(FLOWTEL_CNT_FLOW_UPDATE_FAIL);
            return TC_ACT_UNSPEC;
        }
    }
    __sync_fetch_and_add(&st->packets, 1);
    __sync_fetch_and_add(&st->bytes, len);
    st->last_ns = now;
    if (key.protocol == IPPROTO_TCP && flags) {
        st->tcp_flags |= flags;  /* a racing OR may lose a bit; the counts below are exact */
        if ((flags & 0x12) == 0x02)
            __sync_fetch_and_add(&st->syn, 1);
        if ((flags & 0x12) == 0x12)
            __sync_fetch_and_add(&st->synack, 1);
        if (flags & 0x01)
            __sync_fetch_and_add(&st->fin, 1);
        if (flags & 0x04)
            __sync_fetch_and_add(&st->rst, 1);
    }

    /* An observer: let later filters and the stack decide (never TC_ACT_OK/SHOT). */
    return TC_ACT_UNSPEC;
}

int flowtel_tc_ingress(struct __sk_buff *skb)
{
    return account(skb, FLOWTEL_HOOK_INGRESS);
}

int flowtel_tc_egress(struct __sk_buff *skb)
{
    return account(skb, FLOWTEL_HOOK_EGRESS);
}
