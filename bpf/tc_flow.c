/* tc_flow.c — per-flow packet/byte/TCP-flag counters on tc clsact ingress and egress.
 *
 * Aggregates in the kernel: user space drains the counters on an interval, never per packet.
 * Two flow maps are used as a double buffer: the program writes to flows_<flow_active[0]>;
 * user space flips the index, waits for in-flight programs to finish, then drains the other
 * map with no concurrent writer, so no increment can be lost to a delete. The flag is one
 * array read (inlined by the verifier) and picks the map directly: no map-in-map lookup.
 *
 * One program serves both hooks. What it needs to know about where it runs arrives in
 * skb->tc_classid (cls_bpf sets it to the filter's classid before running the program): the
 * hook in the low bit, the interface's counter slot + 1 above it (FLOWTEL_CLASSID_* in
 * flowtel.h; the loader sets both). A packet crossing two host veths runs the program at
 * ingress of one and at egress of the other within microseconds on the same CPU; with one
 * program the second run finds its code (and the maps' metadata) in the cache the first run
 * loaded. With a program per hook each run paid for its own code: ingress, the first to run
 * for a forwarded packet, measured 15-21 % more than egress (bench/bpf_runtime).
 *
 * Per-interface totals live in a per-CPU array indexed by slot * 2 + hook, so counting a
 * packet is an array access, and slots of removed links are reused (flowtel/lib/bpf/tcattach.py).
 *
 * Headers are read with direct packet access while they are in the skb's linear part
 * (packet.h). DNS is counted and matched in the kernel too, with samples for user space
 * (bpf/dns.h).
 *
 * Flow times need no better than a tick: on kernels that have it (5.11+, FLOWTEL_COARSE_NS=1)
 * they come from the coarse clock, measured here at ~20-40 ns less per packet than the precise
 * one; and even that clock is read once per tick and CPU, not per packet (bpf/tick_clock.h):
 * the helper call still cost ~18 ns of the program's ~75 in the tight loop. DNS timestamps
 * (latency) always use the precise clock, read in dns_observe only for DNS packets.
 *
 * Compile-time constants (set by the loader): FLOWTEL_MAX_FLOWS, FLOWTEL_IFACE_SLOTS,
 * FLOWTEL_COARSE_NS (0/1); FLOWTEL_DNS (0/1) and, when 1, the constants bpf/dns.h lists.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include "flowtel.h"
#include "packet.h"
#define FLOWTEL_PARSE_FN flowtel_tc_parse
#define FLOWTEL_PARSE_CTX struct __sk_buff *
#define FLOWTEL_PARSE_LOAD flowtel_tc_load
#include "packet.h"

#include "tick_clock.h"

#ifndef FLOWTEL_COARSE_NS
#define FLOWTEL_COARSE_NS 0  /* a loader that does not say: the precise clock, which every kernel has */
#endif

/* Flow times: this program's own tick clock entry (bpf/tick_clock.h), on the coarse clock where
 * the kernel has it. */
BPF_PERCPU_ARRAY(flow_clock, struct flowtel_tick_clock, 1);

static __always_inline __u64 flowtel_flow_time(void)
{
    __u32 zero = 0;
    return flowtel_tick_time(flow_clock.lookup(&zero), FLOWTEL_COARSE_NS);
}

/* The cache-line layout of the flow maps' elements (flowtel.h, struct flow_stats) holds for
 * these sizes only. */
_Static_assert(sizeof(struct flow_key) == 48, "struct flow_key: 48 bytes, see struct flow_stats");
_Static_assert(sizeof(struct flow_stats) == FLOWTEL_FLOW_STATS_SIZE, "struct flow_stats: see its comment");
BPF_TABLE("lru_hash", struct flow_key, struct flow_stats, flows_0, FLOWTEL_MAX_FLOWS);
BPF_TABLE("lru_hash", struct flow_key, struct flow_stats, flows_1, FLOWTEL_MAX_FLOWS);
BPF_ARRAY(flow_active, __u32, 1);
/* The "last flow" cache (flowtel.h, struct flow_cache_entry): index buffer * WAYS + way. */
_Static_assert(sizeof(struct flow_cache_entry) == FLOWTEL_FLOW_CACHE_ENTRY_SIZE, "struct flow_cache_entry");
_Static_assert((FLOWTEL_FLOW_CACHE_WAYS & (FLOWTEL_FLOW_CACHE_WAYS - 1)) == 0, "ways: a power of 2");
BPF_PERCPU_ARRAY(flow_cache, struct flow_cache_entry, FLOWTEL_FLOW_CACHE_WAYS * 2);
/* Index slot * 2 + hook; cumulative, never reset: a slot's counts stay in the node's totals
 * after its link is gone (user space keeps a baseline per assignment for per-link views). */
BPF_PERCPU_ARRAY(iface_counters, struct iface_stats, FLOWTEL_IFACE_SLOTS * 2);
BPF_PERCPU_ARRAY(counters, __u64, FLOWTEL_CNT_MAX);

static __always_inline void count_events(__u32 idx, __u64 n)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        *v += n;
}

static __always_inline void count_event(__u32 idx)
{
    count_events(idx, 1);
}

/* Where the parser found the transport header, for the DNS capture. */
struct l4_info {
    __u32 off;  /* offset of the TCP/UDP header; 0 when the ports were not read */
    __u32 end;  /* offset just past the IP packet per its header (excludes Ethernet padding) */
};

/* The flow key of a packet (packet.h does the parsing). At tc, offset 0 is the Ethernet header. */
static __always_inline void parse(struct __sk_buff *skb, struct flow_key *key, __u8 *flags,
                                  struct l4_info *l4)
{
    struct flowtel_packet p = {};
    __u16 ethertype = bpf_ntohs(skb->protocol);
    key->ethertype = ethertype;
    flowtel_tc_parse(skb, ethertype, ETH_HLEN, &p);
    if (!p.family)
        return;
    key->family = p.family;
    key->protocol = p.protocol;
    __builtin_memcpy(key->saddr, p.saddr, 16);
    __builtin_memcpy(key->daddr, p.daddr, 16);
    if (p.has_icmp) {  /* ICMP: the key's ports carry type and code */
        key->sport = p.icmp_type;
        key->dport = p.icmp_code;
    } else {
        key->sport = p.sport;
        key->dport = p.dport;
    }
    if (p.protocol == IPPROTO_TCP)
        *flags = p.tcp_flags;
    l4->off = p.l4off;
    l4->end = p.end;
}

/* DNS (bpf/dns.h): parsed, counted and matched in the kernel; samples to user space. */
#include "dns.h"

static __always_inline void count_interface(__u32 classid, __u64 len)
{
    /* classid = (slot + 1) << 1 | hook, so classid - 2 = slot * 2 + hook; slot part 0 (no
     * slot: all were taken) wraps to a huge index and is counted as a failure. */
    __u32 idx = classid - 2;
    struct iface_stats *is = 0;
    if (idx < FLOWTEL_IFACE_SLOTS * 2)
        is = iface_counters.lookup(&idx);
    if (is) {
        is->packets += 1;  /* per-CPU value: no atomics needed */
        is->bytes += len;
    } else {
        count_event(FLOWTEL_CNT_IFACE_UPDATE_FAIL);
    }
}

/* Keys are compared as six 64-bit words: the key on the stack is 8-aligned (the verifier wants
 * aligned stack reads), the cache entry's is a map value (no alignment demand). */
static __always_inline int flow_key_eq(const struct flow_key *a, const struct flow_key *b)
{
    const flowtel_word64 *x = (const flowtel_word64 *)a;
    const flowtel_word64 *y = (const flowtel_word64 *)b;
    return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) |
            (x[5] ^ y[5])) == 0;
}
_Static_assert(sizeof(struct flow_key) == 6 * sizeof(__u64), "flow_key_eq compares six words");

/* Moves a cache entry's counts into the active flow map (creating the flow if it is not there:
 * its first packets, or the LRU evicted it). Locked adds: another CPU's cache may flush the
 * same key at the same time. The flush is the only writer of the flow maps. */
static __always_inline void flow_flush(__u32 slot, struct flow_cache_entry *c)
{
    struct flow_stats *st = slot ? flows_1.lookup(&c->key) : flows_0.lookup(&c->key);
    if (!st) {
        struct flow_stats init = {};
        init.first_ns = c->first_ns;
        /* insert is BPF_NOEXIST: of two CPUs racing to create a flow, one counts the creation. */
        int rc = slot ? flows_1.insert(&c->key, &init) : flows_0.insert(&c->key, &init);
        if (rc == 0)
            count_event(FLOWTEL_CNT_FLOWS_CREATED_0 + slot);
        st = slot ? flows_1.lookup(&c->key) : flows_0.lookup(&c->key);
        if (!st) {
            count_events(FLOWTEL_CNT_FLOW_UPDATE_FAIL, c->packets);
            return;
        }
    }
    __sync_fetch_and_add(&st->packets, c->packets);
    __sync_fetch_and_add(&st->bytes, c->bytes);
    if (c->last_ns > st->last_ns)
        st->last_ns = c->last_ns;
    if ((st->tcp_flags | c->tcp_flags) != st->tcp_flags)
        st->tcp_flags |= c->tcp_flags;  /* a racing OR may lose a bit; the counts below are exact */
    if (c->syn)
        __sync_fetch_and_add(&st->syn, c->syn);
    if (c->synack)
        __sync_fetch_and_add(&st->synack, c->synack);
    if (c->fin)
        __sync_fetch_and_add(&st->fin, c->fin);
    if (c->rst)
        __sync_fetch_and_add(&st->rst, c->rst);
}

/* Runs at both hooks: the filter's classid says which (a test run, classid 0, is ingress). */
int flowtel_tc(struct __sk_buff *skb)
{
    __u32 classid = skb->tc_classid;
    __u8 hook = classid & 1;
    struct flow_key key __attribute__((aligned(8))) = {};
    __u8 flags = 0;
    __u64 now = flowtel_flow_time();
    __u64 len = skb->len;

    key.ifindex = skb->ifindex;
    key.hook = hook;
    struct l4_info l4 = {};
    parse(skb, &key, &flags, &l4);
    count_interface(classid, len);

    __u32 zero_idx = 0;
    __u32 *active = flow_active.lookup(&zero_idx);
    __u32 slot = (active && *active == 1) ? 1 : 0;
    __u32 way = slot * FLOWTEL_FLOW_CACHE_WAYS + (classid & (FLOWTEL_FLOW_CACHE_WAYS - 1));
    struct flow_cache_entry *c = flow_cache.lookup(&way);
    if (!c) {  /* cannot happen (the index is in range), but never uncounted */
        count_event(FLOWTEL_CNT_FLOW_UPDATE_FAIL);
    } else {
        if (!flow_key_eq(&c->key, &key)) {
            /* Another flow than this way's last on this CPU: its counts go to the map. */
            if (c->packets)
                flow_flush(slot, c);
            __builtin_memcpy(&c->key, &key, sizeof(key));
            c->packets = 0;
            c->bytes = 0;
            c->tcp_flags = 0;
            c->first_ns = now;
            c->syn = 0;
            c->synack = 0;
            c->fin = 0;
            c->rst = 0;
        }
        c->packets += 1;  /* per-CPU, and tc programs do not nest on a CPU: no atomics */
        c->bytes += len;
        c->last_ns = now;
        if (key.protocol == IPPROTO_TCP && flags) {
            c->tcp_flags |= flags;
            if ((flags & 0x12) == 0x02)
                c->syn += 1;
            if ((flags & 0x12) == 0x12)
                c->synack += 1;
            if (flags & 0x01)
                c->fin += 1;
            if (flags & 0x04)
                c->rst += 1;
        }
    }
#if FLOWTEL_DNS
    dns_observe(skb, &key, hook, l4.off, l4.end);  /* a tail call (bpf/dns.h): last */
#endif

    /* An observer: let later filters and the stack decide (never TC_ACT_OK/SHOT). */
    return TC_ACT_UNSPEC;
}
