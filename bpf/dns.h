/* dns.h — DNS on the tc path, aggregated in the kernel (included by tc_flow.c).
 *
 * One entry point, dns_observe(), called for every packet with its parsed flow key. A UDP
 * datagram or a TCP segment with a configured port on either side is parsed here: the
 * 12-byte header (read in place while the packet's linear part holds it) and the first
 * question (a bounded walk of at most 255 name bytes, labels checked, no compression pointer,
 * over a copy of at most 271 bytes).
 * Every message is then counted, whatever the rate:
 *   - per (interface, hook, addresses, server port, name hash, qtype, rcode, QR, status,
 *     protocol) in dns_agg_<slot>, a double buffer user space flips and drains every interval
 *     (the same no-loss scheme as the flow maps; the slot is chosen by one flag read), found
 *     through a set-associative index of way words (flowtel.h, struct dns_agg_set);
 *   - requests wait in dns_pending (a set-associative array; a full set is counted) until
 *     their response arrives within the timeout: its latency goes into a per-CPU histogram in
 *     the kernel; flowtel_dns_sweep, run by user space, frees the requests that time out and
 *     hands them over to be counted as unanswered.
 * User space gets a message's bytes only as a sample, and only for two reasons:
 *   - the message is the first of its name, qtype, rcode and QR this interval (a per-interval
 *     seen-set, dns_seen_<slot>, consulted only when a message creates an aggregation key):
 *     user space learns the name and the answer from it. Bounded by the distinct names, not
 *     the rate, and on a ring of its own (dns_names) so that names keep their samples under
 *     load;
 *   - the per-CPU budget (sample_rate a second, a second of burst) has room: the message is
 *     then reported as its own flow (per-message flows at low rates).
 * A name sample over the budget is kind NAME (it stays in its key's aggregate), else MESSAGE.
 * Samples carry what the kernel decided (slot, key fields, latency), so user space can tell
 * how many messages of each key it saw one by one and report the rest aggregated.
 *
 * Once per message, at the first pod interface it crosses (the peers' semantics: Retina counts a
 * message at its one receive in the host, Hubble once at the client's DNS proxy). A message
 * between two pods of the node runs the tc program at both host-side veths; it is counted at
 * the first, where the interface receives it from its pod, and not at the second, where
 * skb->ingress_ifindex names an observed pod interface (dns_pod_ifaces, kept by user space).
 * What reaches a pod from outside (the uplink, a host process, an unobserved interface) is
 * counted where it goes to the pod. At a non-pod interface (the node's uplink) the addresses
 * are not yet or no longer the pod's (SNAT, a Service's reverse DNAT), so only the host's own
 * exchanges are counted there: requests the host sends (ingress_ifindex not a pod interface)
 * and the responses that match one of them; the rest is counted at its pod interface, or,
 * with no pod taking part, not at all (FLOWTEL_DNS_CNT_NOT_HERE). Requests and responses are
 * paired by their client end (flowtel.h, struct dns_pending_key), wherever each was seen.
 *
 * TCP (RFC 7766: a 2-byte length before each message): the segment that starts a message is
 * parsed like a datagram when it holds the message's header and question. Where the next
 * message starts is remembered when a message runs past its segment (dns_tcp_next), so the
 * segments that continue it are skipped, not misread. Not counted, but counted as such
 * (FLOWTEL_DNS_CNT_TCP_UNPARSED, reported as a loss): a message whose header and question are
 * not all in its first segment, and the messages after the first in one segment (pipelined
 * queries; only their length prefixes are walked, to keep the stream in step).
 *
 * Compile-time constants (set by the loader, receiver/ebpf/dnsring.py): FLOWTEL_IS_DNS_PORT(p),
 * FLOWTEL_DNS_CAPTURE, FLOWTEL_DNS_RING_PAGES (each ring), FLOWTEL_DNS_MAX_AGGREGATES, FLOWTEL_DNS_AGG_SETS,
 * FLOWTEL_DNS_PENDING_SETS, FLOWTEL_DNS_SET_SEED (random per load), FLOWTEL_DNS_TIMEOUT_NS, FLOWTEL_DNS_SAMPLE_COST_NS,
 * FLOWTEL_DNS_LAT_BUCKET(ns) (the latency bucket of ns, from the histogram's bounds); optional:
 * FLOWTEL_DNS_POD_IFACES (entries of dns_pod_ifaces, default FLOWTEL_IFACE_SLOTS).
 */
#ifndef FLOWTEL_DNS_H
#define FLOWTEL_DNS_H
#if FLOWTEL_DNS

#define FLOWTEL_FNV_OFFSET 0xcbf29ce484222325ULL
#define FLOWTEL_FNV_PRIME  0x100000001b3ULL
/* A budget of one second of samples. */
#define FLOWTEL_DNS_BUDGET_NS     1000000000ULL
/* Header, the longest name and qtype/qclass: all the parser ever reads of a message. */
#define FLOWTEL_DNS_QUESTION_MAX (12 + FLOWTEL_DNS_NAME_MAX + 4)

BPF_RINGBUF_OUTPUT(dns_events, FLOWTEL_DNS_RING_PAGES);  /* per-message samples (within the budget) */
BPF_RINGBUF_OUTPUT(dns_names, FLOWTEL_DNS_RING_PAGES);   /* samples of names first seen this interval */
BPF_PERCPU_ARRAY(dns_scratch, struct dns_event, 1);
/* FLOWTEL_DNS_AGG_SETS (a power of two, from the loader): twice max_aggregates in way words, so
 * that sets seldom fill before the entries do. */
BPF_ARRAY(dns_agg_0, struct dns_agg_entry, FLOWTEL_DNS_MAX_AGGREGATES);
BPF_ARRAY(dns_agg_1, struct dns_agg_entry, FLOWTEL_DNS_MAX_AGGREGATES);
BPF_ARRAY(dns_agg_ways_0, struct dns_agg_set, FLOWTEL_DNS_AGG_SETS);
BPF_ARRAY(dns_agg_ways_1, struct dns_agg_set, FLOWTEL_DNS_AGG_SETS);
BPF_ARRAY(dns_agg_next, __u64, 2);  /* [slot]: entries of dns_agg_<slot> handed out this interval (64-bit:
                                      * the BPF target's CAS is on 64 bits) */
/* At most one entry per aggregation key of the same slot (inserted only when one is created),
 * so it cannot fill before dns_agg_<slot> does. */
BPF_HASH(dns_seen_0, struct dns_seen_key, __u8, FLOWTEL_DNS_MAX_AGGREGATES);
BPF_HASH(dns_seen_1, struct dns_seen_key, __u8, FLOWTEL_DNS_MAX_AGGREGATES);
BPF_ARRAY(dns_active, __u32, 1);
/* FLOWTEL_DNS_PENDING_SETS (a power of two, from the loader): max_pending / ways, rounded up. */
BPF_ARRAY(dns_pending, struct dns_pending_set, FLOWTEL_DNS_PENDING_SETS);
BPF_ARRAY(dns_sweep, struct dns_sweep_arg, 1);
BPF_ARRAY(dns_expired, struct dns_pending, FLOWTEL_DNS_SWEEP_SETS * FLOWTEL_DNS_PENDING_WAYS);
BPF_TABLE("lru_hash", struct dns_tcp_stream, __u32, dns_tcp_next, FLOWTEL_DNS_TCP_STREAMS);
BPF_PERCPU_ARRAY(dns_latency, struct dns_latency, 1);
BPF_PERCPU_ARRAY(dns_budget, struct dns_budget, 1);
BPF_PERCPU_ARRAY(dns_counters, __u64, FLOWTEL_DNS_CNT_MAX);
/* ifindex -> FLOWTEL_DNS_POD_IFACE for the host-side pod interfaces the tc program is attached
 * to (user space adds one once both its filters are in place, removes it when the link goes). */
#ifndef FLOWTEL_DNS_POD_IFACES
#define FLOWTEL_DNS_POD_IFACES FLOWTEL_IFACE_SLOTS  /* an interface beyond has no counter slot either */
#endif
BPF_HASH(dns_pod_ifaces, __u32, __u8, FLOWTEL_DNS_POD_IFACES);
/* Where a message is, for what is counted there (the top of this file; kernel-only). */
#define DNS_SITE_POD    0  /* a pod interface, the first it crosses: counted */
#define DNS_SITE_UPLINK_IN  1  /* received by a non-pod interface: only responses to the host's requests */
#define DNS_SITE_UPLINK_OUT 2  /* sent by a non-pod interface, not from a pod: only requests */
/* What the tc programs hand to flowtel_dns with the tail call (kernel-only). */
struct dns_handoff {
    struct flow_key key;
    __u32 l4off;
    __u32 end;
    __u8  hook;
    __u8  site;            /* DNS_SITE_* */
};
BPF_PERCPU_ARRAY(dns_handoff, struct dns_handoff, 1);
BPF_PROG_ARRAY(dns_tail, 1);  /* [0]: flowtel_dns, installed by the loader */

/* An offset as the verifier must see it for a packet pointer: bounded by a mask on the very
 * register the pointer is computed from (the compiler cannot drop the mask: the barrier hides
 * that the value is known to fit). Callers check off <= DNS_PKT_OFF_MAX themselves. */
#define DNS_PKT_OFF_MAX 0x3fff
static __always_inline __u32 dns_pkt_off(__u32 off)
{
    asm volatile("" : "+r"(off));
    return off & DNS_PKT_OFF_MAX;
}

/* packet.h's flowtel_tc_load for DNS's offsets: in place below 16 KiB (headers and questions
 * always are), the helper beyond. n is a compile-time constant. */
#define dns_load(skb, off, dst, n) ({                                                          \
        void *_data = (void *)(long)(skb)->data;                                               \
        void *_end = (void *)(long)(skb)->data_end;                                            \
        __u32 _off = (off);                                                                    \
        void *_p = _data + dns_pkt_off(_off);                                                  \
        int _rc;                                                                               \
        if (_off <= DNS_PKT_OFF_MAX && _p + (n) <= _end) {                                     \
            __builtin_memcpy((dst), _p, (n));                                                  \
            _rc = 0;                                                                           \
        } else {                                                                               \
            _rc = bpf_skb_load_bytes((skb), _off, (dst), (n));                                 \
        }                                                                                      \
        _rc; })

/* v as the verifier's precision tracking must see a helper's size argument: read back from map
 * memory, so it is an unknown scalar bounded by the caller's mask, with no link to how v was
 * computed. Without it the verifier needs v's exact range on every path that led to it, and
 * the paths (UDP, TCP, lengths) multiply through the question walk past its limit. The store
 * is to scratch the caller overwrites later; volatile keeps the compiler from skipping it. */
static __always_inline __u32 dns_opaque(struct dns_event *ev, __u32 v)
{
    *(volatile __u32 *)&ev->hdr.orig_len = v;
    return *(volatile __u32 *)&ev->hdr.orig_len;
}

static __always_inline void dns_count(__u32 idx)
{
    __u64 *v = dns_counters.lookup(&idx);
    if (v)
        *v += 1;  /* per-CPU: no atomics needed */
}

/* The first question of a message of len bytes: FLOWTEL_DNS_OK with its name hash and qtype,
 * or FLOWTEL_DNS_MALFORMED. One byte per iteration with a label countdown (not nested loops)
 * keeps the verifier's work linear in FLOWTEL_DNS_NAME_MAX. DNS_BYTE(c, pos) reads the byte at
 * pos (< FLOWTEL_DNS_QUESTION_MAX) of the message into c. */
#define DNS_QUESTION_BODY                                                                       \
    __u64 h = FLOWTEL_FNV_OFFSET;                                                               \
    __u32 pos = 12;                                                                             \
    __u32 rem = 0;   /* bytes left in the current label; 0: the next byte is a length */       \
    __u8 c = 0;                                                                                 \
    int done = 0;                                                                               \
    for (int i = 0; i < FLOWTEL_DNS_NAME_MAX; i++) {                                            \
        if (pos >= len)                                                                         \
            return FLOWTEL_DNS_MALFORMED;                                                       \
        DNS_BYTE(c, pos);                                                                       \
        if (rem == 0) {                                                                         \
            if (c == 0) {                                                                       \
                done = 1;                                                                       \
                break;                                                                          \
            }                                                                                   \
            /* a pointer (nothing precedes the first name) or a reserved label type */          \
            if (c & 0xc0)                                                                       \
                return FLOWTEL_DNS_MALFORMED;                                                   \
            rem = c & 0x3f;                                                                     \
        } else {                                                                                \
            rem -= 1;                                                                           \
            if (c >= 'A' && c <= 'Z')                                                           \
                c += 'a' - 'A';  /* names compare without case: one key per name */             \
        }                                                                                       \
        h = (h ^ c) * FLOWTEL_FNV_PRIME;                                                        \
        pos += 1;                                                                               \
    }                                                                                           \
    if (!done)                                                                                  \
        return FLOWTEL_DNS_MALFORMED;  /* longer than 255 bytes */                              \
    if (pos + 5 > len)                                                                          \
        return FLOWTEL_DNS_MALFORMED;  /* qtype and qclass cut off */                           \
    __u8 hi = 0, lo = 0;                                                                        \
    DNS_BYTE(hi, pos + 1);                                                                      \
    DNS_BYTE(lo, pos + 2);                                                                      \
    *qtype = ((__u16)hi << 8) | lo;                                                             \
    *hash = h;                                                                                  \
    return FLOWTEL_DNS_OK;

/* From a copy in buf (FLOWTEL_DNS_BUF bytes, a power of two). */
static __always_inline int dns_question(const __u8 *buf, __u32 len, __u64 *hash, __u16 *qtype)
{
#define DNS_BYTE(c, p) ((c) = buf[(p) & (FLOWTEL_DNS_BUF - 1)])
    DNS_QUESTION_BODY
#undef DNS_BYTE
}

/* Header and first question of the message at packet offset off, of which avail bytes are in
 * the packet: fills ak's status, QR, rcode, name hash and qtype, and the DNS id. */
static __always_inline void dns_parse(struct __sk_buff *skb, __u32 off, __u32 avail, struct dns_agg_key *ak,
                                      __u16 *id)
{
    ak->status = FLOWTEL_DNS_MALFORMED;
    __u8 hdr[12];
    if (avail < 12 || dns_load(skb, off, hdr, sizeof(hdr)) < 0)
        return;
    __u16 qdcount = ((__u16)hdr[4] << 8) | hdr[5];
    __u64 hash = 0;
    __u16 qtype = 0;
    if (qdcount) {
        /* The question is walked in a copy: a walk over the packet in place (a bounds check per
         * byte) costs the verifier over a million instructions here, the copy ~40 ns. Only
         * what a question can span is copied. */
        __u32 len = avail < FLOWTEL_DNS_QUESTION_MAX ? avail : FLOWTEL_DNS_QUESTION_MAX;
        __u32 zero = 0;
        struct dns_event *ev = dns_scratch.lookup(&zero);
        if (!ev)
            return;
        /* Same value for len in [1, FLOWTEL_DNS_BUF], and a form any verifier (5.8 on) can
         * bound without tracking the comparisons above: why the sizes are powers of two. */
        __u32 n = ((dns_opaque(ev, len) - 1) & (FLOWTEL_DNS_BUF - 1)) + 1;
        if (bpf_skb_load_bytes(skb, off, ev->payload, n) < 0)
            return;
        if (dns_question(ev->payload, n, &hash, &qtype) != FLOWTEL_DNS_OK)
            return;
    }
    /* qdcount 0 is legal (e.g. some NOTIFY forms): no name to key on. */
    ak->status = FLOWTEL_DNS_OK;
    ak->is_response = hdr[2] >> 7;
    ak->rcode = hdr[3] & 0x0f;
    ak->name_hash = hash;
    ak->qtype = qtype;
    *id = ((__u16)hdr[0] << 8) | hdr[1];
}

/* Whether a message may be sent as its own flow now (and if so, pay for it). */
static __always_inline int dns_take_budget(__u64 now)
{
    __u32 zero = 0;
    struct dns_budget *b = dns_budget.lookup(&zero);
    if (!b)
        return 0;
    __u64 credit = b->credit_ns + (now - b->last_ns);
    if (credit > FLOWTEL_DNS_BUDGET_NS)
        credit = FLOWTEL_DNS_BUDGET_NS;
    b->last_ns = now;
    if (credit < FLOWTEL_DNS_SAMPLE_COST_NS) {
        b->credit_ns = credit;
        return 0;
    }
    b->credit_ns = credit - FLOWTEL_DNS_SAMPLE_COST_NS;
    return 1;
}

static __always_inline int dns_agg_is(const struct dns_agg_key *a, const struct dns_agg_key *b)
{
    const flowtel_word64 *x = (const flowtel_word64 *)a, *y = (const flowtel_word64 *)b;
    __u64 diff = 0;
#pragma unroll
    for (int i = 0; i < sizeof(*a) / 8; i++)
        diff |= x[i] ^ y[i];
    return diff == 0;
}

/* The entry of a way word in the buffer of slot. One call site per map (the verifier inlines
 * an array lookup only where it knows the map). */
static __always_inline struct dns_agg_entry *dns_agg_entry(__u32 slot, __u64 word)
{
    __u32 n = (__u32)(word & ((1U << FLOWTEL_DNS_AGG_ENTRY_BITS) - 1)) - 1;
    if (slot)
        return dns_agg_1.lookup(&n);
    return dns_agg_0.lookup(&n);
}

/* A new entry for ak in the buffer of slot, published in way w of set; the entry, or 0 with no
 * room. Not inlined into the scan: creating a key is rare, and one copy of this keeps the
 * program (and its instruction-cache footprint) small. */
static __always_inline struct dns_agg_entry *dns_agg_create(struct dns_agg_set *set, __u32 w, __u64 tag,
                                                           const struct dns_agg_key *ak, __u32 slot, __u64 now,
                                                           int *created)
{
    __u32 zero_slot = slot;
    __u64 *next = dns_agg_next.lookup(&zero_slot);
    if (!next)
        return 0;
    /* A CAS, not a fetch-and-add: bcc's clang targets a BPF version whose XADD returns
     * nothing. Contended only by CPUs creating keys at the same instant. */
    __u64 n = FLOWTEL_DNS_MAX_AGGREGATES;
    for (int t = 0; t < 4; t++) {
        __u64 cur = *(volatile __u64 *)next;
        if (cur >= FLOWTEL_DNS_MAX_AGGREGATES)
            return 0;  /* no entry left this interval (user space resets the count) */
        if (__sync_val_compare_and_swap(next, cur, cur + 1) == cur) {
            n = cur;
            break;
        }
    }
    if (n >= FLOWTEL_DNS_MAX_AGGREGATES)
        return 0;
    __u64 mine = (tag << FLOWTEL_DNS_AGG_ENTRY_BITS) | (n + 1);
    struct dns_agg_entry *e = dns_agg_entry(slot, mine);
    if (!e)
        return 0;
    e->key = *ak;
    e->messages = 0;
    e->first_ns = now;
    e->last_ns = now;
    __u64 old = __sync_val_compare_and_swap(&set->way[w & (FLOWTEL_DNS_AGG_WAYS - 1)], 0, mine);
    if (old == 0) {
        *created = 1;
        return e;
    }
    /* Another CPU took the way first (e stays with no messages: the drain skips it). If it
     * created this key, count in its entry; if another key of the set, this message goes
     * unkeyed (counted as such): two keys of one set created at the same instant. */
    if ((old >> FLOWTEL_DNS_AGG_ENTRY_BITS) == tag) {
        struct dns_agg_entry *oe = dns_agg_entry(slot, old);
        if (oe && dns_agg_is(&oe->key, ak))
            return oe;
    }
    return 0;
}

/* Count the message in the active aggregation buffer; returns 1 if it created the key, -1 if
 * there was no room (its set or the entries full). Ways are claimed in order and never freed
 * within an interval, so the scan stops at the first free way, and a key is in one way at most. */
static __always_inline int dns_aggregate(struct dns_agg_key *ak, __u32 slot, __u64 now)
{
    const __u32 *w32 = (const __u32 *)ak;
    /* Seeded per load: a pod that could compute set indexes offline could craft names whose
     * keys fill the set of another pod's key (whose messages would then go unkeyed). */
    __u64 h = FLOWTEL_DNS_SET_SEED;
#pragma unroll
    for (int i = 0; i < sizeof(*ak) / 4; i++)
        h = (h ^ w32[i]) * 0x9e3779b97f4a7c15ULL;
    __u32 si = (__u32)(h >> 32) & (FLOWTEL_DNS_AGG_SETS - 1);
    __u64 tag = h >> FLOWTEL_DNS_AGG_ENTRY_BITS;  /* the top 40 bits: a filter, the key is compared */
    struct dns_agg_set *set = slot ? dns_agg_ways_1.lookup(&si) : dns_agg_ways_0.lookup(&si);
    if (!set)
        return -1;
    struct dns_agg_entry *e = 0;
    int created = 0;
    __u32 free_way = FLOWTEL_DNS_AGG_WAYS;
#pragma unroll
    for (int w = 0; w < FLOWTEL_DNS_AGG_WAYS; w++) {
        __u64 word = *(volatile __u64 *)&set->way[w];
        if (word == 0) {
            free_way = w;
            break;
        }
        if ((word >> FLOWTEL_DNS_AGG_ENTRY_BITS) == tag) {
            struct dns_agg_entry *oe = dns_agg_entry(slot, word);
            if (oe && dns_agg_is(&oe->key, ak)) {
                e = oe;
                break;
            }
        }
    }
    if (!e && free_way < FLOWTEL_DNS_AGG_WAYS)
        e = dns_agg_create(set, free_way, tag, ak, slot, now, &created);
    if (!e)
        return -1;  /* the set or the entries are full */
    __sync_fetch_and_add(&e->messages, 1);
    e->last_ns = now;
    return created;
}

/* Whether user space has had no message of this name, qtype, rcode and QR this interval
 * (and now has: the caller samples it). */
static __always_inline int dns_first_seen(const struct dns_agg_key *ak, __u32 slot)
{
    struct dns_seen_key sk = {};
    sk.name_hash = ak->name_hash;
    sk.qtype = ak->qtype;
    sk.is_response = ak->is_response;
    sk.rcode = ak->rcode;
    sk.status = ak->status;
    __u8 one = 1;
    /* BPF_NOEXIST: of two CPUs, one is first. */
    return (slot ? dns_seen_1.insert(&sk, &one) : dns_seen_0.insert(&sk, &one)) == 0;
}

static __always_inline void dns_latency_observe(__u64 ns)
{
    __u32 zero = 0;
    struct dns_latency *l = dns_latency.lookup(&zero);
    if (!l)
        return;
    __u32 b = FLOWTEL_DNS_LAT_BUCKET(ns);
    l->buckets[b & (FLOWTEL_DNS_LAT_MAX_BUCKETS - 1)] += 1;
    l->sum_ns += ns;
    l->count += 1;
}

/* The set of an exchange: a multiplicative hash of its key's words (client port and id vary
 * per query, so one client's queries spread over the sets). Its high bits pick the set. */
_Static_assert(sizeof(struct dns_pending_key) == 22, "dns_pending_key: five 32-bit words and one 16-bit");
_Static_assert(sizeof(struct dns_pending) == 64, "dns_pending: one cache line");
static __always_inline __u32 dns_pending_index(const struct dns_pending_key *pk)
{
    const flowtel_word32 *w = (const flowtel_word32 *)pk;
    __u64 h = FLOWTEL_DNS_SET_SEED;  /* seeded per load, as dns_aggregate's */
#pragma unroll
    for (int i = 0; i < 5; i++)
        h = (h ^ w[i]) * 0x9e3779b97f4a7c15ULL;
    h = (h ^ *(const flowtel_word16 *)&pk->family) * 0x9e3779b97f4a7c15ULL;
    return (__u32)(h >> 32) & (FLOWTEL_DNS_PENDING_SETS - 1);
}

static __always_inline int dns_pending_is(const struct dns_pending_key *a, const struct dns_pending_key *b)
{
    const flowtel_word32 *x = (const flowtel_word32 *)a, *y = (const flowtel_word32 *)b;
    __u32 diff = 0;
#pragma unroll
    for (int i = 0; i < 5; i++)
        diff |= x[i] ^ y[i];
    diff |= *(const flowtel_word16 *)&a->family ^ *(const flowtel_word16 *)&b->family;  /* family and protocol */
    return diff == 0;
}

/* Request: start waiting. Response: match and time it. Returns the latency or 0. At the uplink
 * (site DNS_SITE_UPLINK_IN) a response is only asked whether it answers a request counted at
 * the uplink (the host's); if not, it is left to the pod interface it goes to, and not counted
 * UNMATCHED there. Each costs one array lookup (inlined by the verifier) and reads of one set:
 * 4 adjacent cache lines, no lock, no allocation (the hash map it replaces cost ~350-400 ns a
 * message under dnsperf). */
static __always_inline __u64 dns_match(const struct flow_key *key, __u8 hook, __u16 id, int is_response,
                                       __u64 name_hash, __u16 qtype, __u64 now, __u8 site)
{
    int probe = site == DNS_SITE_UPLINK_IN;
    struct dns_pending_key pk = {};
    pk.id = id;
    pk.family = key->family;
    pk.protocol = key->protocol;
    if (!is_response) {
        __builtin_memcpy(pk.client, key->saddr, 16);
        pk.client_port = key->sport;
    } else {
        __builtin_memcpy(pk.client, key->daddr, 16);
        pk.client_port = key->dport;
    }
    __u32 idx = dns_pending_index(&pk);
    struct dns_pending_set *set = dns_pending.lookup(&idx);
    if (!set)
        return 0;
    if (!is_response) {
        /* Pending already: a retransmission keeps the first, so the latency is the total wait. */
#pragma unroll
        for (int w = 0; w < FLOWTEL_DNS_PENDING_WAYS; w++) {
            struct dns_pending *p = &set->way[w];
            if (*(volatile __u64 *)&p->ts_ns && dns_pending_is(&p->key, &pk)) {
                dns_count(FLOWTEL_DNS_CNT_RETRANSMITS);
                return 0;
            }
        }
        /* A free way is claimed by the CAS on its time, then filled: a response that raced
         * with the fill would find a key that is not its own (it is not matched); a response
         * arrives after the server has had the request, much later than the fill. */
#pragma unroll
        for (int w = 0; w < FLOWTEL_DNS_PENDING_WAYS; w++) {
            struct dns_pending *p = &set->way[w];
            if (*(volatile __u64 *)&p->ts_ns == 0 && __sync_val_compare_and_swap(&p->ts_ns, 0, now) == 0) {
                p->name_hash = name_hash;
                p->key = pk;
                p->server_port = key->dport;
                p->ifindex = key->ifindex;
                __builtin_memcpy(p->server, key->daddr, 16);
                p->qtype = qtype;
                p->hook = hook;
                p->at_uplink = site == DNS_SITE_UPLINK_OUT;
                return 0;
            }
        }
        dns_count(FLOWTEL_DNS_CNT_PENDING_FULL);  /* its set is full: not timed, counted */
        return 0;
    }
#pragma unroll
    for (int w = 0; w < FLOWTEL_DNS_PENDING_WAYS; w++) {
        struct dns_pending *p = &set->way[w];
        __u64 ts = *(volatile __u64 *)&p->ts_ns;
        if (!ts || !dns_pending_is(&p->key, &pk) || (probe && !p->at_uplink))
            continue;
        __u64 lat = now > ts ? now - ts : 0;
        /* A late response leaves its request to the sweep, which reports it unanswered; of the
         * response and the sweep, whoever frees the way (the CAS) owns the request. */
        if (lat >= FLOWTEL_DNS_TIMEOUT_NS || __sync_val_compare_and_swap(&p->ts_ns, ts, 0) != ts)
            break;
        if (lat == 0)
            lat = 1;  /* 0 means "not matched" to user space */
        dns_latency_observe(lat);
        return lat;
    }
    if (!probe)
        dns_count(FLOWTEL_DNS_CNT_UNMATCHED);
    return 0;
}

/* Frees the requests of FLOWTEL_DNS_SWEEP_SETS sets from dns_sweep's first_set that are no
 * younger than its deadline, copying each to dns_expired first (an expired request is not
 * written by anyone until it is freed: a response refuses it, a request claims only free
 * ways). Run by user space with BPF_PROG_TEST_RUN (receiver/ebpf/dnsmaps.py), because only a
 * program can free a way with the CAS that a response may be racing with. */
int flowtel_dns_sweep(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct dns_sweep_arg *a = dns_sweep.lookup(&zero);
    if (!a)
        return 0;
    __u64 deadline = a->deadline_ns;
    __u32 first = a->first_set;
    __u32 n = 0;
    for (__u32 i = 0; i < FLOWTEL_DNS_SWEEP_SETS; i++) {
        __u32 idx = first + i;
        struct dns_pending_set *set = dns_pending.lookup(&idx);
        if (!set)
            break;  /* past the last set */
#pragma unroll
        for (int w = 0; w < FLOWTEL_DNS_PENDING_WAYS; w++) {
            struct dns_pending *p = &set->way[w];
            __u64 ts = *(volatile __u64 *)&p->ts_ns;
            if (!ts || ts > deadline)
                continue;
            __u32 o = n;
            struct dns_pending *out = dns_expired.lookup(&o);
            if (!out)
                continue;
            *out = *p;
            out->ts_ns = ts;
            if (__sync_val_compare_and_swap(&p->ts_ns, ts, 0) == ts)
                n++;
        }
    }
    a->expired = n;
    return 0;
}

/* The message's bytes to a ring: a per-message sample (MESSAGE, dns_events, or dns_names if it
 * is also the first of its name) or a name sample (NAME, dns_names). Only here is the message
 * copied, so a message that is not sampled costs no copy. */
static __always_inline void dns_sample(struct __sk_buff *skb, const struct flow_key *key, __u8 hook,
                                       __u32 off, __u32 msg_len, __u32 avail, __u64 now,
                                       const struct dns_agg_key *ak, __u32 slot, __u64 latency, __u8 kind,
                                       int first)
{
    __u32 zero = 0;
    /* Assembled in a per-CPU scratch buffer (tc runs with migration disabled and does not
     * nest on a CPU) so that bpf_ringbuf_output sends just the bytes captured. */
    struct dns_event *ev = dns_scratch.lookup(&zero);
    if (!ev)
        return;
    __u32 cap = avail < FLOWTEL_DNS_CAPTURE ? avail : FLOWTEL_DNS_CAPTURE;
    if (cap > 0) {
        cap = ((dns_opaque(ev, cap) - 1) & (FLOWTEL_DNS_CAPTURE - 1)) + 1;
        if (bpf_skb_load_bytes(skb, off, ev->payload, cap) < 0)
            cap = 0;  /* sent anyway with no payload: user space counts it as short */
    }
    struct dns_event_hdr *h = &ev->hdr;
    h->ts_ns = now;
    h->latency_ns = latency;
    h->name_hash = ak->name_hash;
    __builtin_memcpy(h->saddr, key->saddr, 16);
    __builtin_memcpy(h->daddr, key->daddr, 16);
    h->ifindex = key->ifindex;
    h->orig_len = msg_len;
    h->sport = key->sport;
    h->dport = key->dport;
    h->cap_len = cap;
    h->qtype = ak->qtype;
    h->server_port = ak->port;
    h->family = key->family;
    h->protocol = key->protocol;
    h->hook = hook;
    h->kind = kind;
    h->slot = slot;
    h->status = ak->status;
    h->is_response = ak->is_response;
    h->rcode = ak->rcode;
    /* No wakeup: the reader polls the rings every POLL_TIMEOUT_MS anyway, and waking it per
     * sample would cost a context switch each. Names have a ring of their own, so that a
     * reader that falls behind on per-message samples still learns every name. */
    long err;
    if (first)
        err = dns_names.ringbuf_output(ev, sizeof(struct dns_event_hdr) + cap, BPF_RB_NO_WAKEUP);
    else
        err = dns_events.ringbuf_output(ev, sizeof(struct dns_event_hdr) + cap, BPF_RB_NO_WAKEUP);
    if (err == 0)
        dns_count(FLOWTEL_DNS_CNT_SAMPLES);
    else
        dns_count(FLOWTEL_DNS_CNT_SAMPLES_LOST);
}

/* One message at packet offset off: msg_len bytes long (per the UDP header or the TCP length
 * prefix), avail of them in this packet. Parsed, counted, matched, maybe sampled. With cut (a
 * TCP message that continues in later segments), a message whose header and question cannot
 * be read from this segment is not counted but returned as -1 (the caller reports it). */
static __always_inline int dns_message(struct __sk_buff *skb, const struct flow_key *key, __u8 hook, __u8 site,
                                       __u32 off, __u32 msg_len, __u32 avail, __u64 now, int cut)
{
    struct dns_agg_key ak = {};
    __builtin_memcpy(ak.saddr, key->saddr, 16);
    __builtin_memcpy(ak.daddr, key->daddr, 16);
    ak.ifindex = key->ifindex;
    ak.family = key->family;
    ak.protocol = key->protocol;
    ak.hook = hook;
    ak.port = FLOWTEL_IS_DNS_PORT(key->dport) ? key->dport : key->sport;
    __u16 id = 0;
    /* Only what a parse error reports is set when it fails: nothing else of it is trusted. */
    dns_parse(skb, off, avail, &ak, &id);
    if (cut && ak.status != FLOWTEL_DNS_OK)
        return -1;
    __u64 latency = 0;
    if (site != DNS_SITE_POD) {
        /* The uplink counts the host's own exchanges only (the top of this file). */
        if (ak.status != FLOWTEL_DNS_OK || ak.is_response != (site == DNS_SITE_UPLINK_IN)) {
            dns_count(FLOWTEL_DNS_CNT_NOT_HERE);
            return 0;
        }
        if (site == DNS_SITE_UPLINK_IN) {
            latency = dns_match(key, hook, id, 1, ak.name_hash, ak.qtype, now, site);
            if (!latency) {
                dns_count(FLOWTEL_DNS_CNT_NOT_HERE);
                return 0;
            }
        }
    }

    __u32 zero = 0;
    __u32 *active = dns_active.lookup(&zero);
    __u32 slot = (active && *active == 1) ? 1 : 0;
    int created = dns_aggregate(&ak, slot, now);
    if (created < 0) {
        if (ak.status != FLOWTEL_DNS_OK)
            dns_count(FLOWTEL_DNS_CNT_UNKEYED_MALFORMED);
        else if (ak.is_response)
            dns_count(FLOWTEL_DNS_CNT_UNKEYED_RESPONSES);
        else
            dns_count(FLOWTEL_DNS_CNT_UNKEYED_REQUESTS);
        created = 0;
    }
    if (ak.status == FLOWTEL_DNS_OK && site != DNS_SITE_UPLINK_IN)
        latency = dns_match(key, hook, id, ak.is_response, ak.name_hash, ak.qtype, now, site);

    int first = created > 0 && dns_first_seen(&ak, slot);
    __u8 kind;
    if (dns_take_budget(now))
        kind = FLOWTEL_DNS_EV_MESSAGE;
    else if (first)
        kind = FLOWTEL_DNS_EV_NAME;
    else {
        dns_count(FLOWTEL_DNS_CNT_SAMPLES_SKIPPED);
        return 0;
    }
    dns_sample(skb, key, hook, off, msg_len, avail, now, &ak, slot, latency, kind, first);
    return 0;
}

/* Where a UDP datagram's message is: msg_len per the UDP header, avail of it in the packet. */
static __always_inline int dns_udp(struct __sk_buff *skb, __u32 l4off, __u32 *off, __u32 *msg_len, __u32 *avail)
{
    __u8 udp[8];
    if (dns_load(skb, l4off, udp, sizeof(udp)) < 0)
        return -1;
    /* The UDP length, not the skb, says where the message ends: a first fragment holds only
     * part of it, and user space must know the capture is short. */
    __u32 ulen = (udp[4] << 8) | udp[5];
    *off = l4off + 8;
    *msg_len = ulen > 8 ? ulen - 8 : 0;
    __u32 skb_len = skb->len;
    __u32 in_skb = skb_len > *off ? skb_len - *off : 0;
    *avail = *msg_len < in_skb ? *msg_len : in_skb;
    return 0;
}

/* Sequence arithmetic: a is after b (RFC 1982 for 32 bits). */
#define DNS_SEQ_AFTER(a, b) ((__s32)((a) - (b)) > 0)

/* Where in a TCP segment a message starts: -1 if none does (no payload, or all of it
 * continues a message), else the message as dns_udp gives it, and what dns_tcp_frame needs.
 * st is the stream's dns_tcp_next key. See the top of this file. */
static __always_inline int dns_tcp(struct __sk_buff *skb, const struct flow_key *key, __u8 hook, __u32 l4off,
                                   __u32 end, struct dns_tcp_stream *st, __u32 *seq, __u32 *data, __u32 *seg,
                                   __u32 *start, __u32 *msg_len, __u32 *avail)
{
    __u8 tcp[13];
    if (dns_load(skb, l4off, tcp, sizeof(tcp)) < 0)
        return -1;
    *seq = ((__u32)tcp[4] << 24) | ((__u32)tcp[5] << 16) | ((__u32)tcp[6] << 8) | tcp[7];
    *data = l4off + (tcp[12] >> 4) * 4;
    *seg = end > *data ? end - *data : 0;
    if (*seg == 0)
        return -1;  /* SYN, ACK, FIN without data: no DNS message */

    __builtin_memcpy(st->saddr, key->saddr, 16);
    __builtin_memcpy(st->daddr, key->daddr, 16);
    st->ifindex = key->ifindex;
    st->sport = key->sport;
    st->dport = key->dport;
    st->family = key->family;
    st->hook = hook;
    *start = 0;
    __u32 *next = dns_tcp_next.lookup(st);
    if (next) {
        __u32 n = *next;
        if (DNS_SEQ_AFTER(n, *seq)) {
            if (!DNS_SEQ_AFTER(*seq + *seg, n)) {
                dns_count(FLOWTEL_DNS_CNT_TCP_CONTINUATIONS);  /* all of it continues the message */
                return -1;
            }
            *start = n - *seq;
        }
        /* else it starts at the next message, or after a gap we did not see: from 0 */
        dns_tcp_next.delete(st);
    }
    __u8 prefix[2];
    *msg_len = 0;
    *avail = 0;
    /* One byte of a length prefix leaves no message to read: msg_len 0, a parse error. */
    if (*start + 2 <= *seg && dns_load(skb, *data + *start, prefix, sizeof(prefix)) == 0) {
        *msg_len = ((__u32)prefix[0] << 8) | prefix[1];
        __u32 in_seg = *seg - *start - 2;
        /* A prefix under 12 cannot hold a header: read nothing, a parse error. */
        *avail = *msg_len < 12 ? 0 : (*msg_len < in_seg ? *msg_len : in_seg);
    }
    return 0;
}

/* Keep the stream in step past the segment's first message, before it is parsed (nothing of
 * the stream then stays live across the parse, so the verifier checks the parse once for UDP
 * and TCP): a message running past the segment marks where the next one starts; messages
 * after it in the segment are stepped over and counted as not parsed. */
static __always_inline void dns_tcp_frame(struct __sk_buff *skb, struct dns_tcp_stream *st, __u32 seq, __u32 data,
                                          __u32 seg, __u32 start, __u32 msg_len)
{
    if (msg_len < 12)
        return;  /* framing after a malformed prefix is not trusted: nothing more is read */
    __u32 pos = start + 2 + msg_len;  /* the next message in the segment */
    __u8 prefix[2];
    for (int i = 0; i < FLOWTEL_DNS_TCP_WALK; i++) {
        if (pos >= seg)
            break;
        dns_count(FLOWTEL_DNS_CNT_TCP_UNPARSED);
        if (pos + 2 > seg || dns_load(skb, data + pos, prefix, sizeof(prefix)) < 0)
            return;  /* a prefix split by the segment: the stream's framing is lost from here */
        pos += 2 + (((__u32)prefix[0] << 8) | prefix[1]);
    }
    if (pos < seg)
        dns_count(FLOWTEL_DNS_CNT_TCP_UNPARSED);  /* more than FLOWTEL_DNS_TCP_WALK: the rest as one */
    if (pos > seg) {
        __u32 nx = seq + pos;
        dns_tcp_next.update(st, &nx);
    }
}

/* The DNS program proper, reached by a tail call from the tc programs (dns_observe): the
 * verifier checks it once, from its own entry, instead of once for every way the packet
 * parser can reach it (IPv4, IPv6 and its extension headers...), which took it past its
 * million-instruction limit. The packet's flow key comes in a per-CPU handoff (tc runs with
 * migration disabled and does not nest on a CPU). Timestamps here are the precise clock
 * (latency), read only for DNS packets: flows use the coarse one. */
int flowtel_dns(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct dns_handoff *ho = dns_handoff.lookup(&zero);
    if (!ho)
        return TC_ACT_UNSPEC;
    struct flow_key kcopy = ho->key;
    const struct flow_key *key = &kcopy;
    __u8 hook = ho->hook;
    __u8 site = ho->site;
    __u32 l4off = ho->l4off, end = ho->end;
    int tcp = key->protocol == IPPROTO_TCP;
    __u32 off = 0, msg_len = 0, avail = 0, seq = 0, data = 0, seg = 0, start = 0;
    struct dns_tcp_stream st = {};
    int cut = 0;
    if (tcp) {
        __u32 skb_len = skb->len;
        /* A zero or oversized IP length (jumbograms, BIG TCP) says nothing: use the skb's. */
        __u32 stop = (end > l4off && end <= skb_len) ? end : skb_len;
        if (dns_tcp(skb, key, hook, l4off, stop, &st, &seq, &data, &seg, &start, &msg_len, &avail) < 0)
            return TC_ACT_UNSPEC;
        off = data + start + 2;
        cut = msg_len >= 12 && avail < msg_len;
        dns_tcp_frame(skb, &st, seq, data, seg, start, msg_len);
    } else if (dns_udp(skb, l4off, &off, &msg_len, &avail) < 0) {
        return TC_ACT_UNSPEC;
    }
    /* The question is not all in the segment that starts the message: not counted (reported;
     * the segments that carry the rest are skipped by dns_tcp_frame's mark). */
    if (dns_message(skb, key, hook, site, off, msg_len, avail, bpf_ktime_get_ns(), cut) < 0)
        dns_count(FLOWTEL_DNS_CNT_TCP_UNPARSED);
    /* An observer: let later filters and the stack decide. */
    return TC_ACT_UNSPEC;
}

/* The one call from tc_flow.c, last thing before it returns (a tail call does not come
 * back): l4off is the transport header's offset (0: not read), end the offset just past the
 * IP packet per its header. A non-DNS packet costs the port test. */
static __always_inline void dns_observe(struct __sk_buff *skb, const struct flow_key *key, __u8 hook,
                                        __u32 l4off, __u32 end)
{
    if (!l4off || !(FLOWTEL_IS_DNS_PORT(key->dport) || FLOWTEL_IS_DNS_PORT(key->sport)))
        return;
    if (key->protocol != IPPROTO_TCP && key->protocol != IPPROTO_UDP)
        return;
    /* Once per message (the top of this file): what came in by an observed pod interface was
     * counted there, and costs no more than this lookup here. */
    __u32 iif = skb->ingress_ifindex;
    if (hook == FLOWTEL_HOOK_EGRESS && iif && dns_pod_ifaces.lookup(&iif)) {
        dns_count(FLOWTEL_DNS_CNT_SEEN_BEFORE);
        return;
    }
    __u32 ifindex = key->ifindex;
    __u8 site = DNS_SITE_POD;
    if (!dns_pod_ifaces.lookup(&ifindex))
        site = hook == FLOWTEL_HOOK_INGRESS ? DNS_SITE_UPLINK_IN : DNS_SITE_UPLINK_OUT;
    __u32 zero = 0;
    struct dns_handoff *ho = dns_handoff.lookup(&zero);
    if (!ho)
        return;
    ho->key = *key;
    ho->hook = hook;
    ho->site = site;
    ho->l4off = l4off;
    ho->end = end;
    dns_tail.call(skb, 0);
    /* Only if the loader did not install flowtel_dns: the message is not counted, but this is. */
    dns_count(FLOWTEL_DNS_CNT_NOT_OBSERVED);
}

#endif /* FLOWTEL_DNS */
#endif /* FLOWTEL_DNS_H */
