/* dns.h — DNS on the tc path, aggregated in the kernel (included by tc_flow.c).
 *
 * One entry point, dns_observe(), called for every packet with its parsed flow key. A UDP
 * packet with a configured port on either side is parsed here: the 12-byte header and the
 * first question (a bounded walk of at most 255 name bytes, labels checked, no compression
 * pointer). Every message is then counted, whatever the rate:
 *   - per (interface, hook, addresses, server port, name hash, qtype, rcode, QR, status) in
 *     dns_agg_<slot>, a double buffer user space flips and drains every interval (the same
 *     no-loss scheme as the flow maps; the slot is chosen by one flag read, no map-in-map);
 *   - requests wait in dns_pending (bounded; full is counted) until their response arrives
 *     within the timeout: its latency goes into a per-CPU histogram in the kernel; user space
 *     removes the requests that time out and counts them as unanswered.
 * User space gets a message's bytes only as a sample, within a per-CPU budget: the first
 * message of an aggregation key in an interval (a name, qtype and rcode not yet seen) may use
 * all of it, any other message only its upper half, and it has a ring of its own
 * (dns_names), so that names keep their samples under load. Samples carry what the kernel decided (slot, key fields, latency), so user space can
 * tell how many messages of each key it saw one by one and report the rest aggregated.
 *
 * TCP segments on DNS ports are copied to the ring as before (user space frames RFC 7766
 * streams and matches them): a lost segment is counted as such.
 *
 * Compile-time constants (set by the loader, receiver/ebpf/dnsring.py): FLOWTEL_IS_DNS_PORT(p),
 * FLOWTEL_DNS_CAPTURE, FLOWTEL_DNS_RING_PAGES (each ring), FLOWTEL_DNS_MAX_AGGREGATES,
 * FLOWTEL_DNS_MAX_PENDING, FLOWTEL_DNS_TIMEOUT_NS, FLOWTEL_DNS_SAMPLE_COST_NS,
 * FLOWTEL_DNS_LAT_BUCKET(ns) (the latency bucket of ns, from the histogram's bounds).
 */
#ifndef FLOWTEL_DNS_H
#define FLOWTEL_DNS_H
#if FLOWTEL_DNS

#define FLOWTEL_FNV_OFFSET 0xcbf29ce484222325ULL
#define FLOWTEL_FNV_PRIME  0x100000001b3ULL
/* A budget of one second of samples; the upper half is for keys not yet seen this interval. */
#define FLOWTEL_DNS_BUDGET_NS     1000000000ULL
#define FLOWTEL_DNS_NEW_KEY_RESERVE_NS (FLOWTEL_DNS_BUDGET_NS / 2)

BPF_RINGBUF_OUTPUT(dns_events, FLOWTEL_DNS_RING_PAGES);  /* repeat samples and TCP segments */
BPF_RINGBUF_OUTPUT(dns_names, FLOWTEL_DNS_RING_PAGES);   /* samples of keys new this interval */
BPF_PERCPU_ARRAY(dns_scratch, struct dns_event, 1);
BPF_HASH(dns_agg_0, struct dns_agg_key, struct dns_agg_val, FLOWTEL_DNS_MAX_AGGREGATES);
BPF_HASH(dns_agg_1, struct dns_agg_key, struct dns_agg_val, FLOWTEL_DNS_MAX_AGGREGATES);
BPF_ARRAY(dns_active, __u32, 1);
BPF_HASH(dns_pending, struct dns_pending_key, struct dns_pending_val, FLOWTEL_DNS_MAX_PENDING);
BPF_PERCPU_ARRAY(dns_latency, struct dns_latency, 1);
BPF_PERCPU_ARRAY(dns_budget, struct dns_budget, 1);
BPF_PERCPU_ARRAY(dns_counters, __u64, FLOWTEL_DNS_CNT_MAX);

static __always_inline void dns_count(__u32 idx)
{
    __u64 *v = dns_counters.lookup(&idx);
    if (v)
        *v += 1;  /* per-CPU: no atomics needed */
}

/* The first question of a message in buf[0, len): FLOWTEL_DNS_OK with its name hash, its
 * qtype and where it ends, or FLOWTEL_DNS_MALFORMED. One byte per iteration with a label
 * countdown (not nested loops) keeps the verifier's work linear in FLOWTEL_DNS_NAME_MAX. */
static __always_inline int dns_question(const __u8 *buf, __u32 len, __u64 *hash, __u16 *qtype)
{
    __u64 h = FLOWTEL_FNV_OFFSET;
    __u32 pos = 12;
    __u32 rem = 0;   /* bytes left in the current label; 0: the next byte is a length */
    int done = 0;
    for (int i = 0; i < FLOWTEL_DNS_NAME_MAX; i++) {
        if (pos >= len)
            return FLOWTEL_DNS_MALFORMED;
        __u8 c = buf[pos & (FLOWTEL_DNS_BUF - 1)];
        if (rem == 0) {
            if (c == 0) {
                done = 1;
                break;
            }
            if (c & 0xc0)  /* a pointer (nothing precedes the first name) or a reserved label type */
                return FLOWTEL_DNS_MALFORMED;
            rem = c & 0x3f;
        } else {
            rem -= 1;
            if (c >= 'A' && c <= 'Z')
                c += 'a' - 'A';  /* names compare without case: one key per name */
        }
        h = (h ^ c) * FLOWTEL_FNV_PRIME;
        pos += 1;
    }
    if (!done)
        return FLOWTEL_DNS_MALFORMED;  /* longer than 255 bytes */
    if (pos + 5 > len)
        return FLOWTEL_DNS_MALFORMED;  /* qtype and qclass cut off */
    *qtype = ((__u16)buf[(pos + 1) & (FLOWTEL_DNS_BUF - 1)] << 8) | buf[(pos + 2) & (FLOWTEL_DNS_BUF - 1)];
    *hash = h;
    return FLOWTEL_DNS_OK;
}

/* Whether a sample may be sent now (and if so, pay for it). */
static __always_inline int dns_take_budget(__u64 now, int new_key)
{
    __u32 zero = 0;
    struct dns_budget *b = dns_budget.lookup(&zero);
    if (!b)
        return 0;
    __u64 credit = b->credit_ns + (now - b->last_ns);
    if (credit > FLOWTEL_DNS_BUDGET_NS)
        credit = FLOWTEL_DNS_BUDGET_NS;
    b->last_ns = now;
    __u64 floor = new_key ? 0 : FLOWTEL_DNS_NEW_KEY_RESERVE_NS;
    if (credit < floor + FLOWTEL_DNS_SAMPLE_COST_NS) {
        b->credit_ns = credit;
        return 0;
    }
    b->credit_ns = credit - FLOWTEL_DNS_SAMPLE_COST_NS;
    return 1;
}

/* Count the message in the active aggregation buffer; returns 1 if it created the key. */
static __always_inline int dns_aggregate(struct dns_agg_key *ak, __u32 slot, __u64 now)
{
    struct dns_agg_val init = {.messages = 0, .first_ns = now, .last_ns = now};
    struct dns_agg_val *v;
    int created = 0;
    /* insert is BPF_NOEXIST: of two CPUs racing to create a key, one creates it. */
    if (slot) {
        v = dns_agg_1.lookup(ak);
        if (!v) {
            created = dns_agg_1.insert(ak, &init) == 0;
            v = dns_agg_1.lookup(ak);
        }
    } else {
        v = dns_agg_0.lookup(ak);
        if (!v) {
            created = dns_agg_0.insert(ak, &init) == 0;
            v = dns_agg_0.lookup(ak);
        }
    }
    if (!v)
        return -1;  /* the map is full */
    __sync_fetch_and_add(&v->messages, 1);
    v->last_ns = now;
    return created;
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

/* Request: start waiting. Response: match and time it. Returns the latency or 0. */
static __always_inline __u64 dns_match(const struct flow_key *key, __u8 hook, __u16 id, int is_response,
                                       __u64 name_hash, __u16 qtype, __u64 now)
{
    struct dns_pending_key pk = {};
    pk.ifindex = key->ifindex;
    pk.id = id;
    pk.family = key->family;
    if (!is_response) {
        __builtin_memcpy(pk.client, key->saddr, 16);
        __builtin_memcpy(pk.server, key->daddr, 16);
        pk.client_port = key->sport;
        pk.server_port = key->dport;
        struct dns_pending_val pv = {.ts_ns = now, .name_hash = name_hash, .qtype = qtype, .hook = hook};
        long err = dns_pending.insert(&pk, &pv);
        /* -EEXIST: pending already (a retransmission keeps the first, so the latency is the
         * total wait); anything else (-E2BIG, -ENOMEM): no room. */
        if (err == -17)
            dns_count(FLOWTEL_DNS_CNT_RETRANSMITS);
        else if (err != 0)
            dns_count(FLOWTEL_DNS_CNT_PENDING_FULL);
        return 0;
    }
    __builtin_memcpy(pk.client, key->daddr, 16);
    __builtin_memcpy(pk.server, key->saddr, 16);
    pk.client_port = key->dport;
    pk.server_port = key->sport;
    struct dns_pending_val *pv = dns_pending.lookup(&pk);
    if (!pv) {
        dns_count(FLOWTEL_DNS_CNT_UNMATCHED);
        return 0;
    }
    __u64 ts = pv->ts_ns;
    __u64 lat = now > ts ? now - ts : 0;
    /* A late response leaves its request to user space's sweep, which reports it unanswered;
     * of the kernel and the sweep, whoever deletes the entry owns it. */
    if (lat >= FLOWTEL_DNS_TIMEOUT_NS || dns_pending.delete(&pk) != 0) {
        dns_count(FLOWTEL_DNS_CNT_UNMATCHED);
        return 0;
    }
    if (lat == 0)
        lat = 1;  /* 0 means "not matched" to user space */
    dns_latency_observe(lat);
    return lat;
}

/* A TCP segment on a DNS port: copied to the ring for user space's framing. */
static __always_inline void dns_segment(struct __sk_buff *skb, const struct flow_key *key, __u8 hook,
                                        __u32 l4off, __u32 end, __u64 now, struct dns_event *ev)
{
    __u8 tcp[13];
    if (bpf_skb_load_bytes(skb, l4off, tcp, sizeof(tcp)) < 0)
        return;
    __u32 seq = ((__u32)tcp[4] << 24) | ((__u32)tcp[5] << 16) | ((__u32)tcp[6] << 8) | tcp[7];
    __u32 off = l4off + (tcp[12] >> 4) * 4;
    __u32 orig = end > off ? end - off : 0;
    if (orig == 0)
        return;  /* SYN, ACK, FIN without data: no DNS message */
    __u32 skb_len = skb->len;
    __u32 avail = skb_len > off ? skb_len - off : 0;
    __u32 want = orig < avail ? orig : avail;
    if (want > FLOWTEL_DNS_CAPTURE)
        want = FLOWTEL_DNS_CAPTURE;
    __u32 n = 0;
    if (want > 0) {
        /* Same value for want in [1, FLOWTEL_DNS_CAPTURE], and a form any verifier (5.8 on)
         * can bound without tracking the comparisons above: why the sizes are powers of two. */
        n = ((want - 1) & (FLOWTEL_DNS_CAPTURE - 1)) + 1;
        if (bpf_skb_load_bytes(skb, off, ev->payload, n) < 0)
            n = 0;  /* sent anyway with no payload: user space counts it as unparsable */
    }
    struct dns_event_hdr *h = &ev->hdr;
    h->ts_ns = now;
    h->latency_ns = 0;
    h->name_hash = 0;
    h->qtype = 0;
    h->server_port = 0;
    h->slot = 0;
    h->status = 0;
    h->is_response = 0;
    h->rcode = 0;
    __builtin_memcpy(h->saddr, key->saddr, 16);
    __builtin_memcpy(h->daddr, key->daddr, 16);
    h->ifindex = key->ifindex;
    h->orig_len = orig;
    h->tcp_seq = seq;
    h->sport = key->sport;
    h->dport = key->dport;
    h->cap_len = n;
    h->family = key->family;
    h->protocol = key->protocol;
    h->hook = hook;
    h->kind = FLOWTEL_DNS_EV_SEGMENT;
    if (dns_events.ringbuf_output(ev, sizeof(struct dns_event_hdr) + n, 0) == 0)
        dns_count(FLOWTEL_DNS_CNT_SEGMENTS);
    else
        dns_count(FLOWTEL_DNS_CNT_SEGMENTS_LOST);
}

/* A UDP datagram on a DNS port: parsed, counted, matched, maybe sampled. */
static __always_inline void dns_message(struct __sk_buff *skb, const struct flow_key *key, __u8 hook,
                                        __u32 l4off, __u64 now, struct dns_event *ev)
{
    __u8 udp[8];
    if (bpf_skb_load_bytes(skb, l4off, udp, sizeof(udp)) < 0)
        return;
    /* The UDP length, not the skb, says where the message ends: a first fragment holds only
     * part of it, and user space must know the capture is short. */
    __u32 ulen = (udp[4] << 8) | udp[5];
    __u32 off = l4off + 8;
    __u32 orig = ulen > 8 ? ulen - 8 : 0;
    __u32 skb_len = skb->len;
    __u32 avail = skb_len > off ? skb_len - off : 0;
    __u32 want = orig < avail ? orig : avail;
    if (want > FLOWTEL_DNS_BUF)
        want = FLOWTEL_DNS_BUF;
    __u32 n = 0;
    if (want > 0) {
        n = ((want - 1) & (FLOWTEL_DNS_BUF - 1)) + 1;
        if (bpf_skb_load_bytes(skb, off, ev->payload, n) < 0)
            n = 0;
    }

    struct dns_agg_key ak = {};
    __builtin_memcpy(ak.saddr, key->saddr, 16);
    __builtin_memcpy(ak.daddr, key->daddr, 16);
    ak.ifindex = key->ifindex;
    ak.family = key->family;
    ak.hook = hook;
    ak.port = FLOWTEL_IS_DNS_PORT(key->dport) ? key->dport : key->sport;
    ak.status = FLOWTEL_DNS_MALFORMED;
    __u16 id = 0;
    __u8 *p = ev->payload;
    if (n >= 12) {
        id = ((__u16)p[0] << 8) | p[1];
        ak.is_response = p[2] >> 7;
        ak.rcode = p[3] & 0x0f;
        __u16 qdcount = ((__u16)p[4] << 8) | p[5];
        if (qdcount == 0) {
            ak.status = FLOWTEL_DNS_OK;  /* legal (e.g. some NOTIFY forms): no name to key on */
        } else {
            __u16 qtype = 0;
            __u64 hash = 0;
            if (dns_question(p, n, &hash, &qtype) == FLOWTEL_DNS_OK) {
                ak.status = FLOWTEL_DNS_OK;
                ak.name_hash = hash;
                ak.qtype = qtype;
            }
        }
    }
    if (ak.status != FLOWTEL_DNS_OK) {
        /* Only what a parse error reports: nothing else of it is trusted. */
        ak.is_response = 0;
        ak.rcode = 0;
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
    __u64 latency = 0;
    if (ak.status == FLOWTEL_DNS_OK)
        latency = dns_match(key, hook, id, ak.is_response, ak.name_hash, ak.qtype, now);

    if (!dns_take_budget(now, created)) {
        dns_count(FLOWTEL_DNS_CNT_SAMPLES_SKIPPED);
        return;
    }

    __u32 cap = n;
    if (cap > FLOWTEL_DNS_CAPTURE)
        cap = FLOWTEL_DNS_CAPTURE;
    if (cap > 0)
        cap = ((cap - 1) & (FLOWTEL_DNS_CAPTURE - 1)) + 1;
    struct dns_event_hdr *h = &ev->hdr;
    h->ts_ns = now;
    h->latency_ns = latency;
    h->name_hash = ak.name_hash;
    __builtin_memcpy(h->saddr, key->saddr, 16);
    __builtin_memcpy(h->daddr, key->daddr, 16);
    h->ifindex = key->ifindex;
    h->orig_len = orig;
    h->tcp_seq = 0;
    h->sport = key->sport;
    h->dport = key->dport;
    h->cap_len = cap;
    h->qtype = ak.qtype;
    h->server_port = ak.port;
    h->family = key->family;
    h->protocol = key->protocol;
    h->hook = hook;
    h->kind = FLOWTEL_DNS_EV_MESSAGE;
    h->slot = slot;
    h->status = ak.status;
    h->is_response = ak.is_response;
    h->rcode = ak.rcode;
    /* No wakeup: the reader polls the rings every POLL_TIMEOUT_MS anyway, and waking it per
     * sample would cost a context switch each (TCP segments, which cannot be counted
     * otherwise, do wake it). Keys not yet seen have a ring of their own, so that a reader
     * that falls behind on repeats still learns every name. */
    long err;
    if (created)
        err = dns_names.ringbuf_output(ev, sizeof(struct dns_event_hdr) + cap, BPF_RB_NO_WAKEUP);
    else
        err = dns_events.ringbuf_output(ev, sizeof(struct dns_event_hdr) + cap, BPF_RB_NO_WAKEUP);
    if (err == 0)
        dns_count(FLOWTEL_DNS_CNT_SAMPLES);
    else
        dns_count(FLOWTEL_DNS_CNT_SAMPLES_LOST);
}

/* The one call from tc_flow.c: l4off is the transport header's offset (0: not read), end
 * the offset just past the IP packet per its header. Timestamps here are the precise clock
 * (latency), read only once the packet is known to be DNS: flows use the coarse one. */
static __always_inline void dns_observe(struct __sk_buff *skb, const struct flow_key *key, __u8 hook,
                                        __u32 l4off, __u32 end)
{
    if (!l4off || !(FLOWTEL_IS_DNS_PORT(key->dport) || FLOWTEL_IS_DNS_PORT(key->sport)))
        return;
    if (key->protocol != IPPROTO_UDP && key->protocol != IPPROTO_TCP)
        return;
    __u64 now = bpf_ktime_get_ns();
    __u32 zero = 0;
    /* The record is assembled in a per-CPU scratch buffer (tc runs with migration disabled
     * and does not nest on a CPU) so that bpf_ringbuf_output sends just the bytes captured. */
    struct dns_event *ev = dns_scratch.lookup(&zero);
    if (!ev)
        return;
    if (key->protocol == IPPROTO_UDP) {
        dns_message(skb, key, hook, l4off, now, ev);
    } else {
        __u32 skb_len = skb->len;
        /* A zero or oversized IP length (jumbograms, BIG TCP) says nothing: use the skb's. */
        __u32 stop = (end > l4off && end <= skb_len) ? end : skb_len;
        dns_segment(skb, key, hook, l4off, stop, now, ev);
    }
}

#endif /* FLOWTEL_DNS */
#endif /* FLOWTEL_DNS_H */
