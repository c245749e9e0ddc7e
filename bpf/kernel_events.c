/* kernel_events.c — packet drops (skb:kfree_skb) and TCP health (sock/tcp tracepoints).
 *
 * Counts in the kernel (drops by reason and direction, drops per flow and connection events
 * (established, closed) per conn_flow_key in double-buffered maps drained like the tc flow
 * maps — drops through a per-CPU "last drop" cache in front of their maps, as tc_flow.c's
 * last-flow cache —, retransmitted segments, resets, TCP sockets by state, the handshake RTT histogram)
 * and, for TCP events a record per occurrence is wanted for (retransmit, reset), writes one
 * struct kernel_event to the kernel_events ring buffer, waking the reader only every
 * FLOWTEL_WAKEUP_EVERY events (the reader takes them in batches). A full ring buffer is
 * counted (FLOWTEL_KEV_CNT_RINGBUF_FULL), never silent. No connection crosses to user space
 * one by one, and no drop, except as a sample: with drops.events_per_second set, each CPU
 * also writes up to that many drops per second to the ring as events of their own (exact
 * time, TCP sequence number, length, location), after counting them as every drop is;
 * drops over the budget are counted as suppressed.
 *
 * Nothing here depends on the layout of the headers bcc compiles against:
 * - tracepoint records are read through struct flowtel_tp_<event>, which the loader
 *   generates from the running kernel's tracefs format files and prepends to this source
 *   (with a FLOWTEL_TP_<EVENT>_<FIELD> macro per field, so kernels that differ in fields
 *   are handled with #ifdef);
 * - the sk_buff / net_device / sock / net / tcp_skb_cb members the drop and retransmit programs
 *   read are at byte offsets the loader takes from the kernel's BTF (FLOWTEL_OFF_*), read
 *   with bpf_probe_read_kernel;
 * - enum values (drop reasons, TCP states) come from the formats' symbol tables.
 *
 * Other compile-time constants (set by the loader):
 * - FLOWTEL_DROPS, FLOWTEL_TCP (0/1): compile the drop / TCP programs (the loader generates
 *   only the enabled tracepoints' structs);
 * - FLOWTEL_DROP_FLOWS (0/1): count drops per flow (for drop flow records) besides by reason;
 * - FLOWTEL_DROP_SAMPLES (0/1), FLOWTEL_DROP_SAMPLE_COST_NS, FLOWTEL_DROP_SAMPLE_BUDGET_NS: also
 *   emit individual drops as events, within a per-CPU token bucket of that capacity where one
 *   costs that much (drops.events_per_second; 0 compiles the path out);
 * - FLOWTEL_TCP_EVENTS (0/1): emit retransmit and reset events besides counting;
 * - FLOWTEL_TCP_CONN_EVENTS (0/1): count connection events per conn_flow_key;
 * - FLOWTEL_RINGBUF_PAGES, FLOWTEL_WAKEUP_EVERY, FLOWTEL_CONN_SETS (sets of FLOWTEL_CONN_WAYS),
 *   FLOWTEL_MAX_DROP_FLOWS, FLOWTEL_MAX_CONN_FLOWS: sizes;
 * - FLOWTEL_RTT_BUCKET(ns): an expression, the handshake RTT histogram bucket of ns;
 * - FLOWTEL_DROP_REASON_MIN: the first reason that is a drop (SKB_NOT_DROPPED_YET and
 *   SKB_CONSUMED sort before it); FLOWTEL_TCPS_*: TCP state values;
 * - FLOWTEL_DROP_IGNORED(r): an expression, true for the reasons the config ignores;
 * - FLOWTEL_DROP_NO_SOCKET: the NO_SOCKET reason's value, or -1 to report every NO_SOCKET
 *   (with a value, an ICMP/ICMPv6 echo reply no ping socket claimed is not a drop).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/asm-generic/errno.h>
#include "flowtel.h"
#include "packet.h"
#include "tick_clock.h"

#define FLOWTEL_AF_INET6 10

BPF_RINGBUF_OUTPUT(kernel_events, FLOWTEL_RINGBUF_PAGES);
/* Never read or written by the programs: bcc gives user space a ctypes class for each map's
 * value type, and a ring buffer has none, so this one carries struct kernel_event's layout. */
BPF_ARRAY(kernel_event_layout, struct kernel_event, 1);
BPF_PERCPU_ARRAY(kev_counters, __u64, FLOWTEL_KEV_CNT_MAX);
/* Signed: a socket can leave a state on another CPU than the one it entered it on. */
BPF_PERCPU_ARRAY(tcp_states, __s64, FLOWTEL_TCP_STATE_SLOTS);
/* Sets of FLOWTEL_CONN_WAYS sockets (flowtel.h): mmapable for page-aligned values, so that a set
 * is two whole cache lines. The ways' tuples apart, written only (inspection). */
_Static_assert(sizeof(struct tcp_conn_set) == 128, "struct tcp_conn_set: two cache lines");
BPF_F_TABLE("array", int, struct tcp_conn_set, tcp_conns, FLOWTEL_CONN_SETS, BPF_F_MMAPABLE);
BPF_ARRAY(tcp_conn_tuples, struct tcp_conn_tuple, FLOWTEL_CONN_SETS * FLOWTEL_CONN_WAYS);
BPF_PERCPU_ARRAY(kev_unannounced, __u32, 1);  /* events submitted since this CPU woke the reader */

/* The first/last times of drop and connection flows, where no exact interval is computed from
 * them: the tick clock (bpf/tick_clock.h) in an entry of this program's own, apart from tc's. */
BPF_PERCPU_ARRAY(kev_clock, struct flowtel_tick_clock, 1);

static __always_inline __u64 kev_flow_time(void)
{
    __u32 zero = 0;
    return flowtel_tick_time(kev_clock.lookup(&zero), 0);
}

static __always_inline void count(__u32 idx, __u64 n)
{
    __u64 *v = kev_counters.lookup(&idx);
    if (v)
        *v += n;  /* per-CPU value: no atomics needed */
}

/* Waking the reader costs an interrupt per event (measured on a 2-CPU VM: ~8 µs, against
 * ~0.45 µs for the rest of a drop event). The reader polls on its own every poll_interval,
 * so a CPU wakes it only every FLOWTEL_WAKEUP_EVERY events it submitted: often enough that
 * unannounced events never fill more than half of the buffer. */
static __always_inline void submit(struct kernel_event *ev)
{
    __u32 zero = 0;
    __u32 *unannounced = kev_unannounced.lookup(&zero);
    __u64 flags = BPF_RB_NO_WAKEUP;
    if (unannounced && ++*unannounced >= FLOWTEL_WAKEUP_EVERY) {
        *unannounced = 0;
        flags = BPF_RB_FORCE_WAKEUP;
    }
    kernel_events.ringbuf_submit(ev, flags);
}

static __always_inline struct kernel_event *new_event(__u8 kind)
{
    struct kernel_event *ev = kernel_events.ringbuf_reserve(sizeof(struct kernel_event));
    if (!ev) {
        count(FLOWTEL_KEV_CNT_RINGBUF_FULL, 1);
        return 0;
    }
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->kind = kind;
    ev->time_ns = bpf_ktime_get_ns();
    return ev;
}

/* ---- drops ------------------------------------------------------------------------ */
#if FLOWTEL_DROPS

/* Every drop is counted twice, both in the kernel: by (reason, direction) in drop_stats, for
 * the node metrics (a few entries, never full), and per flow in the double-buffered drop flow
 * maps, which user space drains on an interval into drop flow records (no event per drop). */
BPF_TABLE("percpu_hash", struct drop_key, struct drop_stats, drop_stats, 4096);
/* The same counts for the reasons of the kernel's own enum (values below
 * FLOWTEL_DROP_REASONS, read from the tracepoint's format): a per-CPU array indexed by
 * reason * 2 + direction, whose lookup the verifier inlines, instead of hashing a key per drop.
 * drop_stats keeps what the array cannot index (subsystem reasons, whose high bits are set). */
BPF_PERCPU_ARRAY(drop_reasons, struct drop_stats, 2 * FLOWTEL_DROP_REASONS);
BPF_TABLE("lru_hash", struct drop_flow_key, struct drop_flow_stats, drop_flows_0, FLOWTEL_MAX_DROP_FLOWS);
BPF_TABLE("lru_hash", struct drop_flow_key, struct drop_flow_stats, drop_flows_1, FLOWTEL_MAX_DROP_FLOWS);
BPF_ARRAY(drop_active, __u32, 1);
_Static_assert(sizeof(struct drop_flow_key) == 8 * sizeof(__u64), "drop_key_eq compares eight words");
_Static_assert(sizeof(struct drop_cache_entry) == FLOWTEL_DROP_CACHE_ENTRY_SIZE, "struct drop_cache_entry");
/* The "last drop" cache (flowtel.h, struct drop_cache_entry): index = the drop flow buffer. */
BPF_PERCPU_ARRAY(drop_cache, struct drop_cache_entry, 2);
#if FLOWTEL_DROP_SAMPLES
BPF_PERCPU_ARRAY(drop_sample_budget, struct drop_sample_budget, 1);
#endif

/* The L3 header is found at skb->head + skb->network_header, and the L4 header from the IP
 * header itself rather than skb->transport_header, which is not yet set where early
 * receive-path drops happen. */
#define FLOWTEL_PARSE_FN flowtel_kernel_parse
#define FLOWTEL_PARSE_LOAD flowtel_kernel_load
#include "packet.h"

/* Direction: a packet counts as INGRESS while it is still on the device it arrived on
 * (skb_iif, set on receive, equals skb->dev: the receive path, local delivery included),
 * and as EGRESS when it was created here (skb_iif 0) or is being forwarded out of another
 * device. A pod's packet crossing a veth is received anew by the peer namespace, so a drop
 * in the pod's own stack of traffic to the pod is INGRESS there, and one of traffic the
 * pod sends, before it leaves the pod, is EGRESS. */

/* An echo reply that reached icmp_rcv with no ICMP datagram ("ping") socket waiting for
 * it. A raw-socket ping (iputils as root) has already received its copy by then, and the
 * kernel still frees the original as NO_SOCKET: every such ping would look like a drop. */
static __always_inline int echo_reply(const struct flowtel_packet *p)
{
    if (!p->has_icmp)
        return 0;
    if (p->family == 4)
        return p->protocol == IPPROTO_ICMP && p->icmp_type == 0;                /* ICMP_ECHOREPLY */
    return p->protocol == FLOWTEL_IPPROTO_ICMPV6 && p->icmp_type == 129;        /* ICMPV6_ECHO_REPLY */
}

/* The device of this CPU's last drop and what was read of it, valid for the tick it was read
 * in (kernel-only, so not in flowtel.h). A net_device is freed only after RCU grace periods and
 * its unregistration's waits, far longer than a tick, so within one tick the same address is
 * the same device; a device moved to another namespace is attributed to its old one for the
 * rest of that tick at most. Tracepoint programs do not nest on a CPU: no atomics. */
struct drop_dev_memo {
    __u64 dev;
    __u64 jiffies;
    __s32 ifindex;
    __u32 netns;
};
BPF_PERCPU_ARRAY(drop_dev_memo, struct drop_dev_memo, 1);

/* Members of the blocks read in one go (offsets from BTF, relative to the block's start). */
#define SKB_MEMBER(dst, off) __builtin_memcpy((dst), sb + (off) - FLOWTEL_SKB_BLOCK_OFF, sizeof(*(dst)))
#define NETDEV_MEMBER(dst, off) __builtin_memcpy((dst), db + (off) - FLOWTEL_NETDEV_BLOCK_OFF, sizeof(*(dst)))

static __always_inline void count_drop_reason(__u32 reason, __u32 direction, __u32 len)
{
    struct drop_stats *ds;
    if (reason < FLOWTEL_DROP_REASONS) {
        __u32 idx = reason * 2 + direction;
        ds = drop_reasons.lookup(&idx);
    } else {
        struct drop_key dk = {.reason = reason, .direction = direction};
        ds = drop_stats.lookup(&dk);
        if (!ds) {
            struct drop_stats zero = {};
            drop_stats.update(&dk, &zero);
            ds = drop_stats.lookup(&dk);
        }
    }
    if (ds) {
        ds->packets += 1;  /* per-CPU values: no atomics needed */
        ds->bytes += len;
    } else {
        count(FLOWTEL_KEV_CNT_DROP_MAP_FULL, 1);
    }
}

/* The entry of key in drop_flows_<slot>, looked up at two call sites the compiler may not merge
 * into one call on a chosen map pointer: the verifier inlines a lookup only where the map is
 * known, and a merged call goes through the generic helper's indirect call. The empty asm keeps
 * each result in its own branch. */
static __always_inline struct drop_flow_stats *drop_flow_lookup(__u32 slot, struct drop_flow_key *key)
{
    struct drop_flow_stats *st;
    if (slot) {
        st = drop_flows_1.lookup(key);
        asm volatile("" : "+r"(st));
    } else {
        st = drop_flows_0.lookup(key);
        asm volatile("" : "+r"(st));
    }
    return st;
}

/* Moves a cache entry's counts into drop_flows_<slot> (creating the flow if it is not there).
 * Locked adds: another CPU's cache may flush the same key at the same time. */
static __always_inline void drop_flush(__u32 slot, struct drop_cache_entry *c)
{
    struct drop_flow_stats *st = drop_flow_lookup(slot, &c->key);
    if (!st) {
        struct drop_flow_stats init = {};
        init.first_ns = c->first_ns;
        /* insert is BPF_NOEXIST: of two CPUs racing to create a flow, one counts the creation. */
        int rc = slot ? drop_flows_1.insert(&c->key, &init) : drop_flows_0.insert(&c->key, &init);
        if (rc == 0)
            count(FLOWTEL_KEV_CNT_DROP_FLOWS_CREATED_0 + slot, 1);
        st = drop_flow_lookup(slot, &c->key);
        if (!st) {
            count(FLOWTEL_KEV_CNT_DROP_FLOW_UPDATE_FAIL, c->packets);
            return;
        }
    }
    __sync_fetch_and_add(&st->packets, c->packets);
    __sync_fetch_and_add(&st->bytes, c->bytes);
    if (c->last_ns > st->last_ns)
        st->last_ns = c->last_ns;
    st->tcp_flags |= c->tcp_flags;  /* a racing OR may lose a bit; packets and bytes are exact */
}

/* Keys compared as eight 64-bit words (the key on the stack is 8-aligned: it holds a __u64). */
static __always_inline int drop_key_eq(const struct drop_flow_key *a, const struct drop_flow_key *b)
{
    const flowtel_word64 *x = (const flowtel_word64 *)a;
    const flowtel_word64 *y = (const flowtel_word64 *)b;
    return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) |
            (x[5] ^ y[5]) | (x[6] ^ y[6]) | (x[7] ^ y[7])) == 0;
}

/* One drop into this CPU's cache entry of the active buffer; a drop of another key than the
 * entry's first moves the entry's counts to the map. A flood of one key (a full socket) so pays
 * an array lookup, a compare and four plain stores per drop instead of a hash of the key, an LRU
 * lookup and two locked adds on a line the CPUs share. The cache is per CPU and tracepoint
 * programs do not nest on a CPU: plain adds. */
static __always_inline void count_drop_flow(struct drop_flow_key *key, __u32 len, __u8 tcp_flags, __u64 now)
{
    __u32 zero = 0;
    __u32 *active = drop_active.lookup(&zero);
    __u32 slot = (active && *active == 1) ? 1 : 0;
    struct drop_cache_entry *c = drop_cache.lookup(&slot);
    if (!c) {  /* cannot happen (the index is in range), but never uncounted */
        count(FLOWTEL_KEV_CNT_DROP_FLOW_UPDATE_FAIL, 1);
        return;
    }
    if (!drop_key_eq(&c->key, key)) {
        if (c->packets)
            drop_flush(slot, c);
        __builtin_memcpy(&c->key, key, sizeof(*key));
        c->packets = 0;
        c->bytes = 0;
        c->tcp_flags = 0;
        c->first_ns = now;
    }
    c->packets += 1;
    c->bytes += len;
    c->last_ns = now;
    c->tcp_flags |= tcp_flags;
}

#if FLOWTEL_DROP_SAMPLES
/* Whether this CPU may send a sample now (and if so, pay for it). The bucket starts full:
 * last_ns 0 gives a credit of the whole uptime, capped. */
static __always_inline int drop_take_budget(__u64 now)
{
    __u32 zero = 0;
    struct drop_sample_budget *b = drop_sample_budget.lookup(&zero);
    if (!b)
        return 0;
    __u64 credit = b->credit_ns + (now - b->last_ns);
    if (credit > FLOWTEL_DROP_SAMPLE_BUDGET_NS)
        credit = FLOWTEL_DROP_SAMPLE_BUDGET_NS;
    b->last_ns = now;
    if (credit < FLOWTEL_DROP_SAMPLE_COST_NS) {
        b->credit_ns = credit;
        return 0;
    }
    b->credit_ns = credit - FLOWTEL_DROP_SAMPLE_COST_NS;
    return 1;
}

/* One drop as an event of its own, already counted by drop_stats and the drop flow maps
 * (user space marks it a sample and counts it nowhere). Over the budget: counted as
 * suppressed; ring full: counted by new_event as every lost event is. */
static __always_inline void sample_drop(struct drop_flow_key *key, const struct flowtel_packet *p, char *l3,
                                        __u32 len, __u64 now)
{
    if (!drop_take_budget(now)) {
        count(FLOWTEL_KEV_CNT_DROP_SAMPLES_SUPPRESSED, 1);
        return;
    }
    struct kernel_event *ev = new_event(FLOWTEL_KEV_DROP);  /* its exact time: new_event reads the clock */
    if (!ev)
        return;
    ev->location = key->location;
    ev->reason = key->reason;
    ev->len = len;
    ev->netns = key->netns;
    ev->ifindex = key->ifindex;
    ev->sport = key->sport;
    ev->dport = key->dport;
    ev->ethertype = key->ethertype;
    ev->family = key->family;
    ev->protocol = key->protocol;
    ev->direction = key->direction;
    __builtin_memcpy(ev->saddr, key->saddr, 16);
    __builtin_memcpy(ev->daddr, key->daddr, 16);
    if (p->protocol == IPPROTO_TCP && p->l4off) {
        ev->tcp_flags = p->tcp_flags;
        /* Only a sample pays for this read: the parser stops at the flags. */
        __be32 seq = 0;
        if (bpf_probe_read_kernel(&seq, sizeof(seq), l3 + p->l4off + 4) == 0) {
            ev->value_ns = bpf_ntohl(seq);
            ev->flags |= FLOWTEL_KEV_F_TCP_SEQ;
        }
    }
    submit(ev);
    count(FLOWTEL_KEV_CNT_DROP_SAMPLES, 1);
}
#endif

int flowtel_drop(struct flowtel_tp_kfree_skb *args)
{
    __u32 reason = args->reason;
    if (reason < FLOWTEL_DROP_REASON_MIN)
        return 0;  /* freed after use (SKB_CONSUMED) or not a drop: not counted */
    if (FLOWTEL_DROP_IGNORED(reason))
        return 0;  /* a reason the config says is not a network drop (e.g. SOCKET_CLOSE) */
    char *skb = (char *)args->skbaddr;
    /* The sk_buff members this program needs lie within FLOWTEL_SKB_BLOCK_LEN bytes of each
     * other (the loader checks it from BTF): one read of that block instead of one per member,
     * each read being a helper call with its own fault handling (~5 fewer per drop). */
    char *head = 0, *dev = 0, *sk = 0;
    __u16 nh = 0;
    __u32 len = 0;
    __s32 iif = 0, ifindex = 0;
    {   /* scoped: the block's stack is reused by what follows (the stack holds 512 bytes) */
        char sb[FLOWTEL_SKB_BLOCK_LEN];
        /* Unreadable: no device, no header, length 0 (as each member's own read failing did). */
        if (bpf_probe_read_kernel(sb, sizeof(sb), skb + FLOWTEL_SKB_BLOCK_OFF) == 0) {
            SKB_MEMBER(&head, FLOWTEL_OFF_SKB_HEAD);
            SKB_MEMBER(&nh, FLOWTEL_OFF_SKB_NETWORK_HEADER);
            SKB_MEMBER(&len, FLOWTEL_OFF_SKB_LEN);
            SKB_MEMBER(&iif, FLOWTEL_OFF_SKB_IIF);
            SKB_MEMBER(&dev, FLOWTEL_OFF_SKB_DEV);
            SKB_MEMBER(&sk, FLOWTEL_OFF_SKB_SK);
        }
    }
    struct flowtel_packet p = {};
    if (head)
        flowtel_kernel_parse(head + nh, args->protocol, 0, &p);
    if ((int)reason == FLOWTEL_DROP_NO_SOCKET && echo_reply(&p))
        return 0;
    /* skb->dev shares a union with dev_scratch (UDP queues): a failed read leaves 0. The
     * device's ifindex and namespace are read together too (one block of net_device), and its
     * namespace's inode with them; all three are kept for the rest of the tick (drop_dev_memo),
     * so a flood's drops on one device skip both reads. */
    char *net = 0;
    __u32 netns = 0;
    if (dev) {
        __u32 zero = 0;
        __u64 j = bpf_jiffies64();
        struct drop_dev_memo *m = drop_dev_memo.lookup(&zero);
        if (m && m->dev == (__u64)dev && m->jiffies == j) {
            ifindex = m->ifindex;
            netns = m->netns;
        } else {
            char db[FLOWTEL_NETDEV_BLOCK_LEN];
            if (bpf_probe_read_kernel(db, sizeof(db), dev + FLOWTEL_NETDEV_BLOCK_OFF) == 0) {
                NETDEV_MEMBER(&ifindex, FLOWTEL_OFF_NETDEV_IFINDEX);
                NETDEV_MEMBER(&net, FLOWTEL_OFF_NETDEV_NET);
                if ((FLOWTEL_DROP_FLOWS || FLOWTEL_DROP_SAMPLES) && net)
                    bpf_probe_read_kernel(&netns, sizeof(netns), net + FLOWTEL_OFF_NET_INUM);
                if (m) {
                    m->dev = (__u64)dev;
                    m->jiffies = j;
                    m->ifindex = ifindex;
                    m->netns = netns;
                }
            } else {
                dev = 0;
            }
        }
    }
    __u32 direction = (iif && (!ifindex || ifindex == iif)) ? FLOWTEL_DROP_INGRESS : FLOWTEL_DROP_EGRESS;

    count_drop_reason(reason, direction, len);

    if (!FLOWTEL_DROP_FLOWS && !FLOWTEL_DROP_SAMPLES)
        return 0;
    struct drop_flow_key key = {};
    key.reason = reason;
    key.direction = direction;
    key.ifindex = ifindex;
    key.location = args->location;
    key.ethertype = args->protocol;
    /* The namespace: of the device (read above), or before the output path sets one
     * (netfilter's OUTPUT hook), of the sending socket. */
    key.netns = netns;
    if (!dev && sk) {
        bpf_probe_read_kernel(&net, sizeof(net), sk + FLOWTEL_OFF_SOCK_NET);
        if (net)
            bpf_probe_read_kernel(&key.netns, sizeof(key.netns), net + FLOWTEL_OFF_NET_INUM);
    }
    if (p.family) {
        key.family = p.family;
        key.protocol = p.protocol;
        __builtin_memcpy(key.saddr, p.saddr, 16);
        __builtin_memcpy(key.daddr, p.daddr, 16);
        key.sport = p.has_icmp ? p.icmp_type : p.sport;
        key.dport = p.has_icmp ? p.icmp_code : p.dport;
    }
    __u64 now = kev_flow_time();  /* the flow's times and the sample budget's; a sample reads its own */
    if (FLOWTEL_DROP_FLOWS)
        count_drop_flow(&key, len, p.protocol == IPPROTO_TCP ? p.tcp_flags : 0, now);
#if FLOWTEL_DROP_SAMPLES
    sample_drop(&key, &p, head + nh, len, now);  /* reads there only if the parser found a TCP header */
#endif
    return 0;
}

#endif /* FLOWTEL_DROPS */

/* ---- TCP -------------------------------------------------------------------------- */
#if FLOWTEL_TCP

/* The 5-tuple of the tracepoints that carry family/sport/dport/saddr/daddr/saddr_v6/daddr_v6
 * (ports in host order, as the tracepoints store them). */
#define COPY_TUPLE(dst, a) do {                                            \
        (dst)->sport = (a)->sport;                                         \
        (dst)->dport = (a)->dport;                                         \
        if ((a)->family == FLOWTEL_AF_INET6) {                             \
            (dst)->family = 6;                                             \
            __builtin_memcpy((dst)->saddr, (a)->saddr_v6, 16);             \
            __builtin_memcpy((dst)->daddr, (a)->daddr_v6, 16);             \
        } else {                                                           \
            (dst)->family = 4;                                             \
            __builtin_memcpy((dst)->saddr, (a)->saddr, 4);                 \
            __builtin_memcpy((dst)->daddr, (a)->daddr, 4);                 \
        }                                                                  \
    } while (0)

/* Connection events per interval (struct conn_flow_key): unused maps of one entry when no
 * logs pipeline wants them (LRU maps are preallocated). */
BPF_TABLE("lru_hash", struct conn_flow_key, struct conn_flow_stats, conn_flows_0, FLOWTEL_MAX_CONN_FLOWS);
BPF_TABLE("lru_hash", struct conn_flow_key, struct conn_flow_stats, conn_flows_1, FLOWTEL_MAX_CONN_FLOWS);
BPF_ARRAY(conn_active, __u32, 1);

static __always_inline void state_add(__u32 state, __s64 delta)
{
    if (state >= FLOWTEL_TCP_STATE_SLOTS)
        return;
    __s64 *v = tcp_states.lookup(&state);
    if (v)
        *v += delta;
}

/* As drop_flow_lookup, for conn_flows_<slot>. */
static __always_inline struct conn_flow_stats *conn_flow_lookup(__u32 slot, struct conn_flow_key *key)
{
    struct conn_flow_stats *st;
    if (slot) {
        st = conn_flows_1.lookup(key);
        asm volatile("" : "+r"(st));
    } else {
        st = conn_flows_0.lookup(key);
        asm volatile("" : "+r"(st));
    }
    return st;
}

/* One connection event into the active conn_flows map. ``value_ns`` (an RTT for ESTABLISHED, a
 * lifetime for CLOSED) is summed when ``has_value``. The first event of a key in an interval is
 * inserted already counted: no second lookup unless another CPU inserted it meanwhile. */
static __always_inline void count_conn(struct conn_flow_key *key, __u64 now, __u64 value_ns, int has_value,
                                       __u16 port)
{
    __u32 zero = 0;
    __u32 *active = conn_active.lookup(&zero);
    __u32 slot = (active && *active == 1) ? 1 : 0;
    struct conn_flow_stats *st = conn_flow_lookup(slot, key);
    if (!st) {
        struct conn_flow_stats init = {};
        init.connections = 1;
        if (has_value) {
            init.rtt_sum_ns = key->kind == FLOWTEL_KEV_TCP_ESTABLISHED ? value_ns : 0;
            init.rtt_count = key->kind == FLOWTEL_KEV_TCP_ESTABLISHED;
            init.lifetime_sum_ns = key->kind == FLOWTEL_KEV_TCP_CLOSED ? value_ns : 0;
            init.lifetime_count = key->kind == FLOWTEL_KEV_TCP_CLOSED;
        }
        init.first_ns = now;
        init.last_ns = now;
        init.last_value_ns = has_value ? value_ns : 0;
        init.last_port = port;
        int rc = slot ? conn_flows_1.insert(key, &init) : conn_flows_0.insert(key, &init);
        if (rc == 0) {
            count(FLOWTEL_KEV_CNT_CONN_FLOWS_CREATED_0 + slot, 1);
            return;
        }
        st = conn_flow_lookup(slot, key);
        if (!st) {
            count(FLOWTEL_KEV_CNT_CONN_FLOW_UPDATE_FAIL, 1);
            return;
        }
    }
    /* The map is shared by the CPUs: counts and sums are atomic, the "last" fields may race
     * (they only describe an entry of one connection exactly). */
    __sync_fetch_and_add(&st->connections, 1);
    if (has_value) {
        if (key->kind == FLOWTEL_KEV_TCP_ESTABLISHED) {
            __sync_fetch_and_add(&st->rtt_sum_ns, value_ns);
            __sync_fetch_and_add(&st->rtt_count, 1);
        } else {
            __sync_fetch_and_add(&st->lifetime_sum_ns, value_ns);
            __sync_fetch_and_add(&st->lifetime_count, 1);
        }
    }
    st->last_ns = now;
    st->last_value_ns = has_value ? value_ns : 0;
    st->last_port = port;
}

/* The rest of a connection event's aggregation key, once its ends are in it: the port that
 * varies per connection (the client's) goes to ``*port`` instead. */
static __always_inline void conn_key_rest(struct conn_flow_key *key, __u8 role, __u8 kind, __u8 state, __u16 *port)
{
    key->role = role;
    key->kind = kind;
    key->state = state;
    *port = 0;
    if (role == FLOWTEL_TCP_ROLE_CLIENT) {
        *port = key->sport;
        key->sport = 0;
    } else if (role == FLOWTEL_TCP_ROLE_SERVER) {
        *port = key->dport;
        key->dport = 0;
    }
}

/* The aggregation key of a connection event from the tracepoint's tuple. */
static __always_inline void conn_key(struct conn_flow_key *key, struct flowtel_tp_inet_sock_set_state *args,
                                     __u8 role, __u8 kind, __u8 state, __u16 *port)
{
    COPY_TUPLE(key, args);
    conn_key_rest(key, role, kind, state, port);
}

static __always_inline __u8 role_of(__u32 oldstate, __u8 known)
{
    if (oldstate == FLOWTEL_TCPS_SYN_SENT)
        return FLOWTEL_TCP_ROLE_CLIENT;
    if (oldstate == FLOWTEL_TCPS_SYN_RECV)
        return FLOWTEL_TCP_ROLE_SERVER;
    return known;
}

/* The socket's set: a multiplicative hash of its address (slab objects, alike in their low bits),
 * whose high 32 bits are mapped onto [0, FLOWTEL_CONN_SETS) by a multiply and shift, so the number
 * of sets need not be a power of two. One array lookup gives all its ways. */
static __always_inline struct tcp_conn_set *conn_set(__u64 sk, __u32 *idx)
{
    __u64 h = (sk * 0x9E3779B97F4A7C15ULL) >> 32;
    *idx = (__u32)((h * FLOWTEL_CONN_SETS) >> 32);
    return tcp_conns.lookup(idx);
}

/* A free way of the set claimed for the socket (sk set), or -1 if all are taken. Another CPU may
 * claim the same free way at the same time: compare-and-swap gives it to one of them. */
static __always_inline int conn_claim(struct tcp_conn_set *set, __u64 sk)
{
#pragma unroll
    for (int w = 0; w < FLOWTEL_CONN_WAYS; w++) {
        if (set->sk[w] == 0 && __sync_val_compare_and_swap(&set->sk[w], 0, sk) == 0)
            return w;
    }
    return -1;
}

/* The socket's way, or -1 if it is not tracked. Every way is looked at (a free way does not end
 * the search: ways are freed in any order); all addresses are in the set's first line. */
static __always_inline int conn_find(struct tcp_conn_set *set, __u64 sk)
{
#pragma unroll
    for (int w = 0; w < FLOWTEL_CONN_WAYS; w++) {
        if (set->sk[w] == sk)
            return w;
    }
    return -1;
}

/* Writes the way's tuple (inspection only: the program never reads it back). */
static __always_inline void conn_tuple(__u32 idx, int w, struct flowtel_tp_inet_sock_set_state *args)
{
    __u32 slot = idx * FLOWTEL_CONN_WAYS + w;
    struct tcp_conn_tuple *t = tcp_conn_tuples.lookup(&slot);
    if (t)
        COPY_TUPLE(t, args);
}

/* Fills a claimed way (sk already set) for a socket first seen entering ``state``. */
static __always_inline void conn_init(struct tcp_conn_set *set, __u32 idx, int w,
                                      struct flowtel_tp_inet_sock_set_state *args, __u64 now, __u8 state,
                                      __u8 info)
{
    set->state[w] = state;
    set->start_ns[w] = now;
    set->info[w] = info;
    conn_tuple(idx, w, args);
}

/* The CLOSED key of a stale way (one whose socket's CLOSE was not seen), the key the CLOSE would
 * have been counted under: built as conn_key builds it from a tracepoint's ends, from those last
 * written to the way (at its birth or first sight, and at ESTABLISHED). 0 if there are none. */
_Static_assert(sizeof(struct conn_flow_key) == 40, "conn_unseen_key fills every byte of the key");
static __always_inline int conn_unseen_key(struct conn_flow_key *key, __u32 idx, int w, __u8 info, __u8 state,
                                           __u16 *port)
{
    __u32 slot = idx * FLOWTEL_CONN_WAYS + w;
    struct tcp_conn_tuple *t = tcp_conn_tuples.lookup(&slot);
    if (!t)
        return 0;  /* cannot happen (the index is in range) */
    __builtin_memcpy(key->saddr, t->saddr, 16);
    __builtin_memcpy(key->daddr, t->daddr, 16);
    key->sport = t->sport;
    key->dport = t->dport;
    key->family = t->family;
    conn_key_rest(key, info & FLOWTEL_CONN_ROLE_MASK, FLOWTEL_KEV_TCP_CLOSED, state, port);
    return 1;
}

/* Tracks TCP sockets from their first state change: counts by state (the tcp_state gauge),
 * handshake RTT (SYN_SENT -> ESTABLISHED on the same socket) and lifetime, and counts
 * ESTABLISHED and CLOSED per conn_flow_key. Runs on every state change of every TCP socket on
 * the node (about ten per short connection, five per end), so each transition does only what
 * it must: one array lookup finds the socket's set, whose first cache line has every way's
 * address and state; a transition in mid-life reads no clock and touches only that line; births,
 * ESTABLISHED and CLOSE also touch the second (start time, role), write the tuple to a line the
 * program never reads, and only ESTABLISHED and CLOSE touch the connection flow map (one call
 * site, not inlined three times: a smaller program is fewer instruction-cache misses, on a path
 * that runs between the TCP stack's own work). */
int flowtel_state(struct flowtel_tp_inet_sock_set_state *args)
{
    if (args->protocol != IPPROTO_TCP)
        return 0;
    __u64 sk = args->skaddr;
    __u32 oldstate = args->oldstate, newstate = args->newstate;
    __u32 idx;
    struct tcp_conn_set *set = conn_set(sk, &idx);
    if (!set)
        return 0;  /* cannot happen (the index is reduced into range): the verifier wants the check */
    __u64 now;
    /* The connection event counted, if any (the birth path's key is filled whole, by
     * conn_unseen_key). */
    struct conn_flow_key key;
    __u16 port = 0;
    __u64 value = 0;
    int has_value = 0;

    /* A birth (connect, listen, or a listener's new child, cloned from the listener's state):
     * its socket cannot be in the table, whose ways are freed at CLOSE, so no search for it as a
     * live socket. SYN_SENT is entered only from CLOSE; should a tracked socket enter it another
     * way, it starts anew here too (its handshake is timed from then). */
    if ((oldstate == FLOWTEL_TCPS_CLOSE || newstate == FLOWTEL_TCPS_SYN_SENT ||
         (oldstate == FLOWTEL_TCPS_LISTEN && newstate == FLOWTEL_TCPS_SYN_RECV)) &&
        newstate != FLOWTEL_TCPS_CLOSE && newstate != FLOWTEL_TCPS_ESTABLISHED) {
        /* A way that still holds this address is stale: its socket was freed without a CLOSE
         * this program saw. Take it over rather than claim a second one, or the socket's later
         * transitions would find the stale way first and leave the new one stale for ever.
         * A TCP socket's memory is a new socket's only after the old one was freed, so the old
         * one did close: unless it was a listener (no connection: its CLOSE is never counted),
         * its CLOSED is counted now as the CLOSE would have counted it, from the way (its ends,
         * role and the state it was last seen in; no lifetime, the time of its close unknown),
         * and counted as such (FLOWTEL_KEV_CNT_CONN_CLOSE_UNSEEN). Measured under load (a UDP
         * flood, busy CPUs, 20 000 connections): up to ~1.5% of clients' FIN_WAIT2 and CLOSE
         * transitions, which close() runs together from the socket's backlog, never reached
         * this program, with no skipped run counted; a perf-event and a raw tracepoint program
         * attached beside it missed the same ones in some runs, and saw them in others
         * (docs/performance.md, 2026-12-08). */
        int unseen = 0;
        int w = conn_find(set, sk);
        if (w >= 0) {
            __u8 stale = set->state[w];
            state_add(stale, -1);
            if (FLOWTEL_TCP_CONN_EVENTS && stale != FLOWTEL_TCPS_LISTEN)
                unseen = conn_unseen_key(&key, idx, w, set->info[w], stale, &port);
        } else {
            w = conn_claim(set, sk);
        }
        if (w < 0) {
            count(FLOWTEL_KEV_CNT_CONN_TABLE_FULL, 1);
            return 0;
        }
        /* A listener's start is never reported (its close is no connection): no clock read. */
        now = newstate == FLOWTEL_TCPS_LISTEN ? 0 : bpf_ktime_get_ns();
        __u8 info = FLOWTEL_CONN_BORN_SEEN;
        if (newstate == FLOWTEL_TCPS_SYN_SENT)
            info |= FLOWTEL_CONN_SYN_SENT | FLOWTEL_TCP_ROLE_CLIENT;
        else if (newstate == FLOWTEL_TCPS_SYN_RECV)
            info |= FLOWTEL_TCP_ROLE_SERVER;
        conn_init(set, idx, w, args, now, newstate, info);
        state_add(newstate, 1);
        if (!unseen)
            return 0;
        count(FLOWTEL_KEV_CNT_CONN_CLOSE_UNSEEN, 1);
        now = kev_flow_time();
        goto count_it;  /* the one call site of count_conn (see above) */
    }

    __builtin_memset(&key, 0, sizeof(key));  /* an IPv4 tuple fills 4 bytes of each address */
    int w = conn_find(set, sk);
    if (w < 0) {
        if (newstate == FLOWTEL_TCPS_CLOSE)
            return 0;  /* a socket that existed before flowtel, now gone */
        /* First sight of a socket older than the programs: no birth, no SYN_SENT seen. */
        w = conn_claim(set, sk);
        if (w < 0) {
            count(FLOWTEL_KEV_CNT_CONN_TABLE_FULL, 1);
            return 0;
        }
        now = bpf_ktime_get_ns();
        __u8 role = newstate == FLOWTEL_TCPS_ESTABLISHED ? role_of(oldstate, FLOWTEL_TCP_ROLE_UNKNOWN)
                                                         : FLOWTEL_TCP_ROLE_UNKNOWN;
        conn_init(set, idx, w, args, now, newstate, role);
        state_add(newstate, 1);
        if (!FLOWTEL_TCP_CONN_EVENTS || newstate != FLOWTEL_TCPS_ESTABLISHED)
            return 0;
        conn_key(&key, args, role, FLOWTEL_KEV_TCP_ESTABLISHED, newstate, &port);
    } else if (newstate == FLOWTEL_TCPS_CLOSE) {
        __u8 left = set->state[w];
        state_add(left, -1);
        if (!FLOWTEL_TCP_CONN_EVENTS || left == FLOWTEL_TCPS_LISTEN) {
            set->sk[w] = 0;  /* frees the way */
            return 0;
        }
        __u8 info = set->info[w];
        now = bpf_ktime_get_ns();
        conn_key(&key, args, info & FLOWTEL_CONN_ROLE_MASK, FLOWTEL_KEV_TCP_CLOSED, left, &port);
        value = now - set->start_ns[w];
        has_value = (info & FLOWTEL_CONN_BORN_SEEN) != 0;
        set->sk[w] = 0;  /* frees the way: everything of it was read */
    } else {
        state_add(set->state[w], -1);
        set->state[w] = newstate;
        state_add(newstate, 1);
        if (newstate != FLOWTEL_TCPS_ESTABLISHED)
            return 0;  /* FIN_WAIT*, CLOSE_WAIT, LAST_ACK, CLOSING: only the gauge changes */
        /* The exact clock only for a handshake RTT; otherwise (a server's end) the time is the
         * connection flow's first/last only, and the tick clock serves. */
        __u8 info = set->info[w];
        int rtt = oldstate == FLOWTEL_TCPS_SYN_SENT && (info & FLOWTEL_CONN_SYN_SENT);
        now = rtt ? bpf_ktime_get_ns() : kev_flow_time();
        conn_tuple(idx, w, args);  /* both ends are final now */
        __u8 role = role_of(oldstate, info & FLOWTEL_CONN_ROLE_MASK);
        set->info[w] = (info & ~FLOWTEL_CONN_ROLE_MASK) | role;
        if (rtt) {
            value = now - set->start_ns[w];
            has_value = value != 0;
            count(FLOWTEL_KEV_CNT_RTT_SUM_NS, value);
            count(FLOWTEL_KEV_CNT_RTT_COUNT, 1);
            /* The histogram's buckets too: the metric needs no event per connection. */
            count(FLOWTEL_KEV_CNT_RTT_HIST + (FLOWTEL_RTT_BUCKET(value)), 1);
        }
        if (!FLOWTEL_TCP_CONN_EVENTS)
            return 0;
        conn_key(&key, args, role, FLOWTEL_KEV_TCP_ESTABLISHED, newstate, &port);
    }
count_it:
    count_conn(&key, now, value, has_value, port);
    return 0;
}

/* One retransmission of a data (or SYN) skb. Counted in segments, as TcpRetransSegs is. */
int flowtel_retrans(struct flowtel_tp_tcp_retransmit_skb *args)
{
    __s32 err = 0;
#ifdef FLOWTEL_TP_TCP_RETRANSMIT_SKB_ERR
    /* Kernels with this field trace attempts too. These errors end the attempt before the
     * kernel counts the segments (TcpRetransSegs); later ones (a drop by the qdisc or
     * netfilter) come after it, so count those as the kernel does. */
    err = args->err;
    if (err == -EBUSY || err == -EINVAL || err == -ENOMEM || err == -EHOSTUNREACH || err == -EAGAIN)
        return 0;
#endif
    __u16 segs = 0;
    char *skb = (char *)args->skbaddr;
    if (skb)
        bpf_probe_read_kernel(&segs, sizeof(segs), skb + FLOWTEL_OFF_SKB_CB + FLOWTEL_OFF_TCP_SKB_CB_GSO_SEGS);
    if (!segs)
        segs = 1;
    count(FLOWTEL_KEV_CNT_RETRANS_SEGS, segs);
    if (!FLOWTEL_TCP_EVENTS)
        return 0;
    struct kernel_event *ev = new_event(FLOWTEL_KEV_TCP_RETRANSMIT);
    if (!ev)
        return 0;
    ev->len = segs;
    ev->error = err;
    ev->state = args->state;
    ev->protocol = IPPROTO_TCP;
    COPY_TUPLE(ev, args);
    submit(ev);
    return 0;
}

/* A SYN-ACK sent again by a listener (counted in TcpRetransSegs, not via tcp_retransmit_skb). */
int flowtel_synack(struct flowtel_tp_tcp_retransmit_synack *args)
{
    count(FLOWTEL_KEV_CNT_RETRANS_SEGS, 1);
    if (!FLOWTEL_TCP_EVENTS)
        return 0;
    struct kernel_event *ev = new_event(FLOWTEL_KEV_TCP_RETRANSMIT);
    if (!ev)
        return 0;
    ev->len = 1;
    ev->state = FLOWTEL_TCPS_SYN_RECV;
    ev->protocol = IPPROTO_TCP;
    COPY_TUPLE(ev, args);
    submit(ev);
    return 0;
}

/* A reset sent: by a socket (abort, SO_LINGER 0) or, on kernels that trace it, by the stack
 * in reply to a segment no socket takes. src is the RST's sender. */
int flowtel_rst_tx(struct flowtel_tp_tcp_send_reset *args)
{
    count(FLOWTEL_KEV_CNT_RESETS_SENT, 1);
    if (!FLOWTEL_TCP_EVENTS)
        return 0;
    struct kernel_event *ev = new_event(FLOWTEL_KEV_TCP_RESET_SENT);
    if (!ev)
        return 0;
    ev->state = args->state;
    ev->protocol = IPPROTO_TCP;
#ifdef FLOWTEL_TP_TCP_SEND_RESET_REASON
    ev->reason = args->reason;
#endif
#ifdef FLOWTEL_TP_TCP_SEND_RESET_SPORT
    COPY_TUPLE(ev, args);
#else
    /* Newer kernels store the ends as struct sockaddr_in / sockaddr_in6 (28 bytes):
     * family (host order), port (network order), then the IPv4 address, or flowinfo and
     * the IPv6 address. */
    __u16 family = args->saddr[0] | (args->saddr[1] << 8);
    ev->sport = (args->saddr[2] << 8) | args->saddr[3];
    ev->dport = (args->daddr[2] << 8) | args->daddr[3];
    if (family == FLOWTEL_AF_INET6) {
        ev->family = 6;
        __builtin_memcpy(ev->saddr, &args->saddr[8], 16);
        __builtin_memcpy(ev->daddr, &args->daddr[8], 16);
    } else {
        ev->family = 4;
        __builtin_memcpy(ev->saddr, &args->saddr[4], 4);
        __builtin_memcpy(ev->daddr, &args->daddr[4], 4);
    }
#endif
    submit(ev);
    return 0;
}

/* A reset received by a socket. */
int flowtel_rst_rx(struct flowtel_tp_tcp_receive_reset *args)
{
    count(FLOWTEL_KEV_CNT_RESETS_RECEIVED, 1);
    if (!FLOWTEL_TCP_EVENTS)
        return 0;
    struct kernel_event *ev = new_event(FLOWTEL_KEV_TCP_RESET_RECV);
    if (!ev)
        return 0;
#ifdef FLOWTEL_TP_TCP_RECEIVE_RESET_STATE
    ev->state = args->state;
#endif
    ev->protocol = IPPROTO_TCP;
    COPY_TUPLE(ev, args);
    submit(ev);
    return 0;
}
#endif /* FLOWTEL_TCP */
