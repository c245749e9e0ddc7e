/* flowtel.h — the one definition of every struct that crosses the kernel/user boundary.
 *
 * User space never keeps a copy of these layouts: bcc turns the map key/value types into
 * ctypes classes, and flowtel/lib/bpf/layout.py derives binary unpack formats from those.
 * Only UAPI types are used, so the layout does not depend on the kernel headers in use.
 */
#ifndef FLOWTEL_H
#define FLOWTEL_H

/* tc hook a packet was seen on, relative to the interface: */
#define FLOWTEL_HOOK_INGRESS 0   /* received by the interface (for a host-side veth: sent by the pod) */
#define FLOWTEL_HOOK_EGRESS  1   /* transmitted by the interface (for a host-side veth: to the pod) */

/* Aggregation key of one L3/L4 flow as seen on one interface and hook.
 * For ICMP, sport/dport carry type/code. For frames that are not IP, family is 0,
 * ethertype says what the frame was, and addresses/ports are zero. */
struct flow_key {
    __u8  saddr[16];     /* IPv4 in the first 4 bytes */
    __u8  daddr[16];
    __u32 ifindex;
    __u16 sport;         /* host byte order */
    __u16 dport;
    __u16 ethertype;     /* host byte order, e.g. 0x0800, 0x86dd, 0x0806 */
    __u8  family;        /* 4, 6, or 0 */
    __u8  protocol;      /* IANA L4 protocol */
    __u8  hook;          /* FLOWTEL_HOOK_* */
    __u8  pad[3];
};

/* Counters of one flow for one drain interval.
 *
 * Laid out for the cache, because under a flood every line a packet touches is likely cold
 * (the stack's own copies evict it between packets): the kernel stores a hash map element as
 * a 48-byte header, the key (48 bytes here) and then this value, in one preallocated array.
 * What every packet of a known flow reads or writes (packets, bytes, last_ns, tcp_flags) is
 * the first 32 bytes, which share the element's second 64-byte line with the end of the key;
 * what only the first packet or a SYN/FIN/RST touches follows. The padding makes an element
 * 192 bytes, three whole lines, so that every element starts on a line (at 160 bytes, every
 * other one straddled a line more). FLOWTEL_FLOW_STATS_SIZE is checked at compile time. */
struct flow_stats {
    __u64 packets;
    __u64 bytes;         /* skb->len at tc: includes the Ethernet header, as the link counters do */
    __u64 last_ns;       /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    __u8  tcp_flags;     /* union of the TCP flags byte of every segment */
    __u8  pad[7];
    __u64 first_ns;
    __u32 syn;           /* segments with SYN and not ACK */
    __u32 synack;
    __u32 fin;
    __u32 rst;
    __u8  pad2[40];
};
#define FLOWTEL_FLOW_STATS_SIZE 96

/* The classid the loader gives each tc filter of bpf/tc_flow.c (one program at both hooks;
 * cls_bpf hands it over as skb->tc_classid, which keeps 16 bits): (slot + 1) << 1 | hook,
 * where slot is the interface's counter slot (slot part 0: no slot was free). So the counter
 * index slot * 2 + hook is classid - 2, and a test run's classid 0 is ingress, no slot. */
#define FLOWTEL_CLASSID_SLOT_SHIFT 1
#define FLOWTEL_CLASSID_MAX_SLOTS  32767  /* (32767 + 1) << 1 | 1 = 0xffff */

/* Per-interface, per-hook totals (cumulative; exact even when the flow map overflows), one
 * per-CPU array element per (slot, hook): index slot * 2 + hook, where the slot is the one the
 * loader assigned to the interface (in the tc filter's classid, FLOWTEL_CLASSID_*). */
struct iface_stats {
    __u64 packets;
    __u64 bytes;
};

/* The per-CPU "last flow" cache of bpf/tc_flow.c: what a packet of the flow an interface and hook
 * saw last on this CPU adds, held here instead of in the flow map. Bulk traffic (a TCP stream,
 * a UDP flood) is the same key packet after packet; a hit is a compare of the key and plain adds
 * on a per-CPU line, where the flow map costs a hash of the 48-byte key, the map's bucket, the
 * element's header line and locked adds: all cold under a flood (the stack's copies evict them
 * between packets), ~100 ns of a TCP packet's ~190 (docs/performance.md §2). A packet of
 * another key flushes the entry's counts into the flow map and takes the entry.
 *
 * Double-buffered with the flow maps: index buffer * FLOWTEL_FLOW_CACHE_WAYS + way, the way
 * from the filter's classid (interface slot and hook, so interfaces share a way only when their
 * slots are 32 apart). A program writes only the half of the active buffer; after a flip and
 * the grace period user space reads the other half, adds its counts to the drained flows (an
 * entry whose key is not in the drained map is a flow of its own), and zeroes it before that
 * buffer is active again (receiver/ebpf/flowmap.py). ifindex 0 in the key: empty (tc always
 * has an interface). Counts exact; first_ns/last_ns as the flow map's. */
#define FLOWTEL_FLOW_CACHE_WAYS 64
struct flow_cache_entry {
    struct flow_key key;
    __u64 packets;       /* not yet in the flow map */
    __u64 bytes;
    __u64 last_ns;
    __u8  tcp_flags;
    __u8  pad[7];
    __u64 first_ns;      /* when this entry took the key */
    __u32 syn;
    __u32 synack;
    __u32 fin;
    __u32 rst;
    __u8  pad2[24];
};
#define FLOWTEL_FLOW_CACHE_ENTRY_SIZE 128

/* Indexes of the per-CPU counters array. */
#define FLOWTEL_CNT_FLOWS_CREATED_0   0  /* new entries inserted into flow map 0 */
#define FLOWTEL_CNT_FLOWS_CREATED_1   1  /* ... into flow map 1 */
#define FLOWTEL_CNT_FLOW_UPDATE_FAIL  2  /* packets not counted in a flow: insert failed */
#define FLOWTEL_CNT_IFACE_UPDATE_FAIL 3  /* packets not counted in interface totals: no slot */
#define FLOWTEL_CNT_DNS_EVENTS        4  /* unused (bpf/dns.h counts in dns_counters) */
#define FLOWTEL_CNT_DNS_LOST          5  /* unused (bpf/dns.h counts in dns_counters) */
#define FLOWTEL_CNT_MAX               6

/* ---- DNS (bpf/dns.h, included by tc_flow.c) ---------------------------------------
 * DNS messages over UDP and TCP are parsed in the kernel (header and first question) and
 * counted per (interface, hook, addresses, server port, query name hash, qtype, rcode, QR,
 * protocol) in a double buffer of arrays behind a set-associative index; requests are
 * matched to responses in a set-associative pending array for the latency histogram and the
 * unanswered count. Only samples of messages
 * reach the ring buffers: the first of each name, qtype and rcode in an interval (for names
 * and answers) and, within a per-CPU budget, others (per-message flows at low rates).
 */
#ifndef FLOWTEL_DNS_CAPTURE
#define FLOWTEL_DNS_CAPTURE 512  /* payload bytes sent per sample; a power of two (see dns.h) */
#endif
#define FLOWTEL_DNS_PARSE   512  /* payload bytes the kernel reads to parse the question: 12 + 255 + 4 fit */
#define FLOWTEL_DNS_BUF     (FLOWTEL_DNS_CAPTURE > FLOWTEL_DNS_PARSE ? FLOWTEL_DNS_CAPTURE : FLOWTEL_DNS_PARSE)
#define FLOWTEL_DNS_NAME_MAX 255 /* wire length of a name, root label included (RFC 1035 2.3.4) */
#define FLOWTEL_DNS_TCP_STREAMS 16384 /* dns_tcp_next entries: TCP messages running past their segment at once */
#define FLOWTEL_DNS_TCP_WALK 16  /* length prefixes after a segment's first message the kernel steps over */

/* dns_event_hdr.kind (0 is no kind: a zeroed record is never taken for a sample) */
#define FLOWTEL_DNS_EV_MESSAGE 1 /* a sample of a message the kernel has counted already: its own flow */
#define FLOWTEL_DNS_EV_NAME    2 /* a message first of its dns_seen_key this interval, over the sample budget:
                                  * it teaches user space the name and answer; it stays in its key's aggregate */

/* dns_event_hdr.status and dns_agg_key.status */
#define FLOWTEL_DNS_OK        0  /* header and first question read */
#define FLOWTEL_DNS_MALFORMED 1  /* no readable header and first question: counted as a parse error */

struct dns_event_hdr {
    __u64 ts_ns;         /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    __u64 latency_ns;    /* MESSAGE, a response matched to its request in the kernel: the request's age; else 0 */
    __u64 name_hash;     /* MESSAGE: FNV-1a 64 of the first question's name (wire form, lower case); 0: none */
    __u8  saddr[16];     /* IPv4 in the first 4 bytes */
    __u8  daddr[16];
    __u32 ifindex;
    __u32 orig_len;      /* the message's length: UDP per its header, TCP per its length prefix */
    __u16 sport;         /* host byte order */
    __u16 dport;
    __u16 cap_len;       /* payload bytes that follow the header in the record */
    __u16 qtype;         /* MESSAGE: the first question's type */
    __u16 server_port;   /* MESSAGE: dns_agg_key.port */
    __u8  family;        /* 4 or 6 */
    __u8  protocol;      /* IPPROTO_UDP or IPPROTO_TCP */
    __u8  hook;          /* FLOWTEL_HOOK_* */
    __u8  kind;          /* FLOWTEL_DNS_EV_* */
    __u8  slot;          /* MESSAGE: the aggregation buffer (dns_agg_<slot>) that counted it */
    __u8  status;        /* MESSAGE: FLOWTEL_DNS_OK or FLOWTEL_DNS_MALFORMED */
    __u8  is_response;   /* MESSAGE: the header's QR bit */
    __u8  rcode;         /* MESSAGE: the header's RCODE (4 bits; EDNS extended bits are user space's) */
    __u8  pad[6];
};

/* A ring buffer record is the header and its first cap_len payload bytes, not the whole struct.
 * The per-CPU scratch copy is FLOWTEL_DNS_BUF long so the parser can read a whole question. */
struct dns_event {
    struct dns_event_hdr hdr;
    __u8  payload[FLOWTEL_DNS_BUF];  /* the message from its first byte (over TCP: after its length prefix) */
};

/* dns_agg_0 / dns_agg_1: DNS messages per interval. Addresses are the packet's. */
struct dns_agg_key {
    __u8  saddr[16];     /* IPv4 in the first 4 bytes */
    __u8  daddr[16];
    __u64 name_hash;     /* as dns_event_hdr.name_hash; 0 when malformed or no question */
    __u32 ifindex;
    __u16 qtype;
    __u16 port;          /* the server's port (the configured DNS port of the two), host byte order */
    __u8  family;
    __u8  hook;          /* FLOWTEL_HOOK_* */
    __u8  is_response;
    __u8  rcode;
    __u8  status;        /* FLOWTEL_DNS_OK or FLOWTEL_DNS_MALFORMED */
    __u8  protocol;      /* IPPROTO_UDP or IPPROTO_TCP */
    __u8  pad[6];
};

/* dns_seen_0 / dns_seen_1: what user space has been sent a message of in this interval (a
 * per-interval seen-set beside dns_agg_<slot>, emptied with it): one name sample per name,
 * qtype, rcode and QR, whatever the interfaces, hooks and addresses it was seen with. */
struct dns_seen_key {
    __u64 name_hash;
    __u16 qtype;
    __u8  is_response;
    __u8  rcode;
    __u8  status;
    __u8  pad[3];
};

/* dns_agg_0 / dns_agg_1 hold a message's count in a struct dns_agg_entry, found through
 * dns_agg_ways_<slot>: no hash map (whose bucket, pointer chase and key compare cost ~330 ns a
 * message under dnsperf, measured by leaving the aggregation out). A key hashes to one set of
 * FLOWTEL_DNS_AGG_WAYS way words, one cache line; a word is 0 (free) or
 * (tag << FLOWTEL_DNS_AGG_ENTRY_BITS) | (entry + 1), the tag being high bits of the key's hash
 * (a filter: the entry's key is compared in full). Entries are appended in the order keys are
 * created (dns_agg_next[slot] counts them), so user space drains the first dns_agg_next ones
 * and zeroes the way words; an entry with no messages is one a racing CPU created and lost
 * (its way CAS failed) and is skipped. */
#define FLOWTEL_DNS_AGG_WAYS 8
#define FLOWTEL_DNS_AGG_ENTRY_BITS 24  /* entries + 1 < 2^24: max_aggregates <= 1 048 576 */
struct dns_agg_set {
    __u64 way[FLOWTEL_DNS_AGG_WAYS];
};

struct dns_agg_entry {
    struct dns_agg_key key;
    __u64 messages;
    __u64 first_ns;
    __u64 last_ns;
};

/* dns_pending: requests waiting for their response. A set-associative
 * array (no allocation, free list or bucket lock per message): a request hashes to one set of
 * FLOWTEL_DNS_PENDING_WAYS ways, each one cache line, and claims a free way with a
 * compare-and-swap on ts_ns (0: free). A request whose set is full is counted (PENDING_FULL),
 * never evicted silently. A response finds its request in its set and frees it with a CAS
 * while younger than the timeout; the requests that time out are freed and copied out by
 * flowtel_dns_sweep, a program user space runs (BPF_PROG_TEST_RUN) on a chunk of sets at a
 * time; user space reports them unanswered. Of the two CASes, whoever frees the way owns it.
 *
 * An exchange is keyed by its client end only (address, port, DNS id, family, protocol): each
 * message is counted once, at the first pod interface it crosses (bpf/dns.h), so the request
 * of a pod-to-pod exchange is seen at the client's interface and its response at the
 * server's, and a Service's DNAT has rewritten the server's address between the two (the
 * request goes to the ClusterIP, the response comes from the pod). Where the request was
 * seen, and the server it was sent to, are kept beside the key for its unanswered flow. */
#define FLOWTEL_DNS_PENDING_WAYS 4
#define FLOWTEL_DNS_SWEEP_SETS 256   /* sets one run of flowtel_dns_sweep looks at */
struct dns_pending_key {
    __u8  client[16];
    __u16 client_port;
    __u16 id;
    __u8  family;
    __u8  protocol;      /* IPPROTO_UDP or IPPROTO_TCP */
};

/* One way: 64 bytes, one cache line. */
struct dns_pending {
    __u64 ts_ns;         /* the request's bpf_ktime_get_ns (the first one, if retransmitted); 0: free */
    __u64 name_hash;
    struct dns_pending_key key;
    __u16 server_port;   /* the request's destination port */
    __u32 ifindex;       /* where the request was counted */
    __u8  server[16];    /* the request's destination address */
    __u16 qtype;
    __u8  hook;
    __u8  at_uplink;     /* 1: counted at a non-pod interface (a host's request): only a response seen
                          * there matches it (bpf/dns.h) */
};

struct dns_pending_set {
    struct dns_pending way[FLOWTEL_DNS_PENDING_WAYS];
};

/* dns_sweep (one entry): what user space asks of flowtel_dns_sweep and what it answers. */
struct dns_sweep_arg {
    __u64 deadline_ns;   /* in: requests at or before it are expired (now - timeout) */
    __u32 first_set;     /* in: the first of the FLOWTEL_DNS_SWEEP_SETS sets to look at */
    __u32 expired;       /* out: requests freed, copied to dns_expired[0 .. expired) */
};

/* dns_tcp_next: where the next message of a TCP stream starts, for a stream whose last
 * message ran past its segment (so that the segments continuing it are not read as messages).
 * An LRU map: a stream that ends inside a message leaves its entry to be evicted. */
struct dns_tcp_stream {
    __u8  saddr[16];
    __u8  daddr[16];
    __u32 ifindex;
    __u16 sport;
    __u16 dport;
    __u8  family;
    __u8  hook;
    __u8  pad[2];
};

/* Per-CPU latency histogram of matched exchanges (one entry; cumulative). */
#define FLOWTEL_DNS_LAT_MAX_BUCKETS 32
struct dns_latency {
    __u64 buckets[FLOWTEL_DNS_LAT_MAX_BUCKETS];  /* bucket i: bound[i-1] < ns <= bound[i]; then overflow */
    __u64 sum_ns;
    __u64 count;
};

/* Per-CPU sample budget: credit in nanoseconds, one sample costs FLOWTEL_DNS_SAMPLE_COST_NS. */
struct dns_budget {
    __u64 credit_ns;
    __u64 last_ns;
};

/* Indexes of the per-CPU dns_counters array (cumulative). */
#define FLOWTEL_DNS_CNT_SAMPLES          0  /* samples written to the ring */
#define FLOWTEL_DNS_CNT_SAMPLES_LOST     1  /* samples not written: ring full (counts stay exact) */
#define FLOWTEL_DNS_CNT_SAMPLES_SKIPPED  2  /* messages over the sample budget, names seen (counted only) */
#define FLOWTEL_DNS_CNT_UNKEYED_REQUESTS 3  /* counted messages that found no room in dns_agg_*: */
#define FLOWTEL_DNS_CNT_UNKEYED_RESPONSES 4 /* ... in node totals only */
#define FLOWTEL_DNS_CNT_UNKEYED_MALFORMED 5
#define FLOWTEL_DNS_CNT_RETRANSMITS      6  /* requests whose exchange was pending already */
#define FLOWTEL_DNS_CNT_PENDING_FULL     7  /* requests not tracked: dns_pending full */
#define FLOWTEL_DNS_CNT_UNMATCHED        8  /* responses with no pending request (or after the timeout) */
#define FLOWTEL_DNS_CNT_TCP_UNPARSED     9  /* TCP messages not counted: their header and question are not in
                                              * the segment that starts them, or a message before them in the
                                              * segment was (only the first of a segment is parsed) */
#define FLOWTEL_DNS_CNT_TCP_CONTINUATIONS 10 /* TCP segments that only continue a message (nothing to count) */
#define FLOWTEL_DNS_CNT_NOT_OBSERVED    11  /* DNS packets not parsed: flowtel_dns not installed (a loader bug) */
#define FLOWTEL_DNS_CNT_SEEN_BEFORE     12  /* DNS packets not counted again: counted at the pod interface they
                                              * came in by (dns.h, "once per message") */
#define FLOWTEL_DNS_CNT_NOT_HERE        13  /* DNS messages at a non-pod interface (the uplink) not counted
                                              * there: left to the pod interface they go to, or no pod's (dns.h) */
#define FLOWTEL_DNS_CNT_MAX             14
/* dns_pod_ifaces values */
#define FLOWTEL_DNS_POD_IFACE 1
/* ---- end of DNS ------------------------------------------------------------------- */

/* ==== kernel events (bpf/kernel_events.c): packet drops and TCP health ==================
 * Tracepoint programs; none of these structs depends on a kernel struct layout (the few
 * sk_buff/net_device offsets the drop program needs come from BTF at load time).
 */

/* Direction of a drop from the kernel's point of view (rule in kernel_events.c). */
#define FLOWTEL_DROP_INGRESS 0   /* the packet had been received by this network namespace */
#define FLOWTEL_DROP_EGRESS  1   /* locally sent, or being forwarded out of another device */

/* Per-CPU drop counters: one entry per (reason, direction). Exact even when the drop flow
 * maps overflow (as iface_stats are for flows). */
struct drop_key {
    __u32 reason;        /* enum skb_drop_reason; named from the kfree_skb tracefs format */
    __u32 direction;     /* FLOWTEL_DROP_* */
};

struct drop_stats {
    __u64 packets;       /* skbs freed with this reason (a GSO skb counts once) */
    __u64 bytes;         /* skb->len at the drop point */
};

/* Drops aggregated per flow, drained on an interval from a double buffer as the tc flow maps
 * are (drop_flows_<drop_active[0]>): a flood of drops costs user space one record per distinct
 * key and interval, whatever its rate. Addresses and ports are the packet's. */
struct drop_flow_key {
    __u8  saddr[16];     /* IPv4 in the first 4 bytes */
    __u8  daddr[16];
    __u64 location;      /* kernel address where the skb was freed */
    __u32 reason;        /* enum skb_drop_reason */
    __u32 netns;         /* inode number of the device's (or sending socket's) namespace; 0 unknown */
    __u32 ifindex;       /* skb->dev->ifindex, within that namespace; 0 unknown */
    __u16 sport;         /* host byte order; ICMP: type */
    __u16 dport;         /* ICMP: code */
    __u16 ethertype;     /* skb->protocol, host byte order */
    __u8  family;        /* 4, 6, or 0 (not IP / unreadable) */
    __u8  protocol;      /* IANA L4 protocol */
    __u8  direction;     /* FLOWTEL_DROP_* */
    __u8  pad[3];
};

struct drop_flow_stats {
    __u64 packets;
    __u64 bytes;         /* skb->len at the drop point */
    __u64 first_ns;      /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    __u64 last_ns;
    __u8  tcp_flags;     /* union of the flags bytes of the TCP segments dropped */
    __u8  pad[7];
};

/* The per-CPU "last drop" cache of flowtel_drop (bpf/kernel_events.c, drop_cache: one entry per
 * drop flow buffer): a flood of one drop key (a full socket refusing datagram after datagram)
 * adds to this CPU's entry, with no hash of the 64-byte key, no LRU touch and no atomics; the
 * counts move into drop_flows_<buffer> when another key's drop arrives on the CPU, and a drain
 * takes what is left (after the flip's grace, when nothing writes that buffer) and adds it to
 * the drained drop flow of the same key. Fields after the key: drop_flow_stats's, in order. */
struct drop_cache_entry {
    struct drop_flow_key key;
    __u64 packets;       /* not yet in the drop flow map */
    __u64 bytes;
    __u64 first_ns;      /* when this entry took the key */
    __u64 last_ns;
    __u8  tcp_flags;
    __u8  pad2[7];
};
#define FLOWTEL_DROP_CACHE_ENTRY_SIZE 104

/* Per-CPU budget of drop samples (one struct kernel_event of kind FLOWTEL_KEV_DROP per drop,
 * on top of the counting above, for the exact time and detail of individual drops): a token
 * bucket of credit in nanoseconds, refilled at one per nanosecond up to
 * FLOWTEL_DROP_SAMPLE_BUDGET_NS (events_per_second samples' worth, about one second); a sample
 * costs FLOWTEL_DROP_SAMPLE_COST_NS (1 s / drops.events_per_second, rounded up). So a CPU
 * emits at most events_per_second * (seconds + 1) samples in any span of seconds. */
struct drop_sample_budget {
    __u64 credit_ns;
    __u64 last_ns;
};

/* Kinds of struct kernel_event. */
#define FLOWTEL_KEV_DROP            1
#define FLOWTEL_KEV_TCP_ESTABLISHED 2
#define FLOWTEL_KEV_TCP_CLOSED      3
#define FLOWTEL_KEV_TCP_RETRANSMIT  4
#define FLOWTEL_KEV_TCP_RESET_SENT  5
#define FLOWTEL_KEV_TCP_RESET_RECV  6

/* kernel_event.flags (0x01 was TCP_CLOSED's lifetime flag: connection events are
 * aggregated in conn_flows_* now and never cross one by one) */
#define FLOWTEL_KEV_F_TCP_SEQ       0x02  /* DROP: value_ns is the dropped TCP segment's sequence number */

/* One event in the kernel_events ring buffer. Addresses and ports are the local socket's
 * (TCP events) or the packet's (drops); for TCP, src is the local end. */
struct kernel_event {
    __u64 time_ns;       /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    __u64 value_ns;      /* DROP (a sample): the TCP sequence number, if FLOWTEL_KEV_F_TCP_SEQ; else 0 */
    __u64 location;      /* DROP: kernel address where the skb was freed */
    __u8  saddr[16];     /* IPv4 in the first 4 bytes */
    __u8  daddr[16];
    __u32 reason;        /* DROP: skb_drop_reason; RESET_SENT: sk_rst_reason (if the kernel has it) */
    __u32 len;           /* DROP: skb->len; RETRANSMIT: segments (as TcpRetransSegs counts) */
    __u32 netns;         /* DROP: inode number of the device's network namespace, 0 if unknown */
    __u32 ifindex;       /* DROP: skb->dev->ifindex, within that namespace */
    __s32 error;         /* RETRANSMIT: the kernel's transmit result (0: sent) */
    __u16 sport;         /* host byte order; ICMP: type */
    __u16 dport;         /* ICMP: code */
    __u16 ethertype;     /* DROP: skb->protocol, host byte order */
    __u8  kind;          /* FLOWTEL_KEV_* */
    __u8  family;        /* 4, 6, or 0 (not IP / unknown) */
    __u8  protocol;      /* IANA L4 protocol */
    __u8  direction;     /* DROP: FLOWTEL_DROP_* */
    __u8  state;         /* TCP: state at the event (CLOSED: the state it left) */
    __u8  tcp_flags;     /* DROP of a TCP segment: its flags byte */
    __u8  flags;         /* unused (0) */
    __u8  pad[3];
};

/* tcp_conn_set.info (FLOWTEL_CONN_ROLE_MASK) and conn_flow_key.role: which end of the connection the local socket is. */
#define FLOWTEL_TCP_ROLE_UNKNOWN 0  /* first seen after its handshake (older than the programs) */
#define FLOWTEL_TCP_ROLE_CLIENT  1  /* active open: SYN_SENT -> ESTABLISHED */
#define FLOWTEL_TCP_ROLE_SERVER  2  /* passive open: SYN_RECV -> ESTABLISHED */

/* TCP sockets seen changing state since the programs were attached: the tcp_conns array, a
 * set-associative table (a socket lives in one of the FLOWTEL_CONN_WAYS ways of the set a hash of
 * its address picks, one array element; sk 0 marks a free way, claimed with compare-and-swap).
 * An array rather than a hash map because its lookups are inlined and a way needs no lock or
 * allocation: a hash map's insert and delete cost ~320 ns per socket on this machine kind,
 * measured. One lookup per state change gives every way of the set.
 *
 * A set is two cache lines, and holds only what a state change reads or writes: line 0 the
 * ways' addresses (the search) and states (all a mid-life change touches: FIN_WAIT*, CLOSE_WAIT,
 * LAST_ACK, CLOSING), line 1 their start times and role bits (births, ESTABLISHED, CLOSE). The
 * array is mmapable only so that the kernel allocates its values page-aligned (user space does
 * not map it): a plain array's values follow struct bpf_array's header (312 bytes on 6.18, so
 * they start 56 bytes into a line), and every set would straddle three. Ways of 64 bytes with
 * the tuple in them (before) made the search touch up to eight lines of a 16 MB table; the set's first line was flowtel_state's largest single
 * cost. */
#define FLOWTEL_CONN_WAYS 7
#define FLOWTEL_CONN_ROLE_MASK 0x03  /* info: FLOWTEL_TCP_ROLE_* */
#define FLOWTEL_CONN_BORN_SEEN 0x04  /* info: its first state change was its birth (lifetimes are whole) */
#define FLOWTEL_CONN_SYN_SENT  0x08  /* info: it entered SYN_SENT at start_ns (the handshake RTT's start) */
struct tcp_conn_set {
    __u64 sk[FLOWTEL_CONN_WAYS];        /* the sockets' kernel addresses; 0: a free way */
    __u8  state[FLOWTEL_CONN_WAYS];     /* current TCP state */
    __u8  pad0;
    __u64 start_ns[FLOWTEL_CONN_WAYS];  /* bpf_ktime_get_ns of its birth or first sight (0 for a
                                         * listener: its start is never reported) */
    __u8  info[FLOWTEL_CONN_WAYS];      /* FLOWTEL_CONN_ROLE_MASK | _BORN_SEEN | _SYN_SENT */
    __u8  pad1;
};

/* Each way's ends, for inspection only (KernelEvents.tcp_connections): the tcp_conn_tuples
 * array, indexed by set * FLOWTEL_CONN_WAYS + way, written and never read by the program (a
 * store to a cold line does not stall it as a load does). Written when the socket is first seen
 * and again when it is established (a client's port is bound after SYN_SENT, a passive child's
 * ends are set after SYN_RECV); the connection flow keys come from the tracepoint itself. */
struct tcp_conn_tuple {
    __u8  saddr[16];
    __u8  daddr[16];
    __u16 sport;
    __u16 dport;
    __u8  family;        /* 4 or 6 */
    __u8  pad[3];
};

/* Connection events (established, closed) aggregated in the kernel per interval, drained from
 * a double buffer as the drop flow maps are (conn_flows_<conn_active[0]>): a connection-rate
 * workload costs user space one record per distinct key and interval, not one per connection.
 * The key leaves out what varies per short connection, the client's ephemeral port: a client's
 * key has sport 0 (its own port), a server's dport 0 (its peer's); both ports are kept for a
 * socket of unknown role (older than the programs: a bounded set). Local end = saddr/sport. */
struct conn_flow_key {
    __u8  saddr[16];     /* local address; IPv4 in the first 4 bytes */
    __u8  daddr[16];     /* remote address */
    __u16 sport;         /* local port, host byte order; 0 for a client */
    __u16 dport;         /* remote port; 0 for a server */
    __u8  family;        /* 4 or 6 */
    __u8  role;          /* FLOWTEL_TCP_ROLE_* */
    __u8  kind;          /* FLOWTEL_KEV_TCP_ESTABLISHED or FLOWTEL_KEV_TCP_CLOSED */
    __u8  state;         /* CLOSED: the state the sockets left; ESTABLISHED: ESTABLISHED */
};

struct conn_flow_stats {
    __u64 connections;   /* sockets counted (each end of a connection counts on its own key) */
    __u64 rtt_sum_ns;    /* ESTABLISHED, client: handshake RTTs (SYN_SENT -> ESTABLISHED) ... */
    __u64 rtt_count;     /* ... and how many */
    __u64 lifetime_sum_ns; /* CLOSED: lifetimes of the sockets whose birth was seen ... */
    __u64 lifetime_count;  /* ... and how many */
    __u64 first_ns;      /* bpf_ktime_get_ns (CLOCK_MONOTONIC) of the first and last counted */
    __u64 last_ns;
    __u64 last_value_ns; /* the last one's RTT (ESTABLISHED) or lifetime (CLOSED), 0: none */
    __u16 last_port;     /* the last one's port left out of the key (the client's), host order */
    __u8  pad[6];
};

#define FLOWTEL_TCP_STATE_SLOTS 16  /* per-CPU signed counts of tracked sockets, by state */

/* Indexes of the per-CPU kev_counters array. */
#define FLOWTEL_KEV_CNT_RINGBUF_FULL     0  /* events not emitted: ring buffer full */
#define FLOWTEL_KEV_CNT_DROP_MAP_FULL    1  /* drops not counted by reason: drop_stats full */
#define FLOWTEL_KEV_CNT_CONN_TABLE_FULL  2  /* sockets not tracked: no free slot of tcp_conns */
#define FLOWTEL_KEV_CNT_RETRANS_SEGS     3  /* retransmitted segments */
#define FLOWTEL_KEV_CNT_RESETS_SENT      4
#define FLOWTEL_KEV_CNT_RESETS_RECEIVED  5
#define FLOWTEL_KEV_CNT_RTT_SUM_NS       6  /* client handshake RTTs: sum ... */
#define FLOWTEL_KEV_CNT_RTT_COUNT        7  /* ... and count */
#define FLOWTEL_KEV_CNT_DROP_FLOWS_CREATED_0 8  /* new entries inserted into drop_flows_0 */
#define FLOWTEL_KEV_CNT_DROP_FLOWS_CREATED_1 9  /* ... into drop_flows_1 */
#define FLOWTEL_KEV_CNT_DROP_FLOW_UPDATE_FAIL 10 /* drops not counted in a drop flow: insert failed */
#define FLOWTEL_KEV_CNT_RTT_HIST         11 /* 11 + i: client handshake RTTs in bucket i */
#define FLOWTEL_KEV_RTT_BUCKETS          16 /* index = FLOWTEL_RTT_BUCKET(ns), an expression the loader sets from the histogram bounds */
#define FLOWTEL_KEV_CNT_DROP_SAMPLES     27 /* drop samples written to the ring (the drops are counted above anyway) */
#define FLOWTEL_KEV_CNT_DROP_SAMPLES_SUPPRESSED 28 /* drops over the sample budget: counted, not sampled (not lost) */
#define FLOWTEL_KEV_CNT_CONN_FLOWS_CREATED_0 29 /* new entries inserted into conn_flows_0 */
#define FLOWTEL_KEV_CNT_CONN_FLOWS_CREATED_1 30 /* ... into conn_flows_1 */
#define FLOWTEL_KEV_CNT_CONN_FLOW_UPDATE_FAIL 31 /* connection events not counted: insert failed */
/* CLOSEs of sockets seen born that never reached the program (their address is a new socket's
 * while their way still holds them): each a connection's CLOSED not counted. */
#define FLOWTEL_KEV_CNT_CONN_CLOSE_UNSEEN 32
#define FLOWTEL_KEV_CNT_MAX              33
/* ==== end of kernel events ============================================================== */

/* ==== FQDN egress policy (bpf/fqdn_policy.c, dnsproxy/) ==================================
 * Maps are pinned under the dnsproxy's pin directory (default /sys/fs/bpf/flowtel/dnsproxy)
 * so enforcement outlives the proxy process. Addresses are 16 bytes, IPv4 in the first 4.
 */
#define FLOWTEL_FQDN_MAX_PORTS 8

#define FLOWTEL_FQDN_MODE_ENFORCE 1
#define FLOWTEL_FQDN_MODE_AUDIT   2

/* One allowed L4 destination: protocol 0 = any; port 0 = any; [port, end_port] inclusive. */
struct fqdn_port {
    __u16 port;
    __u16 end_port;
    __u8  protocol;
    __u8  pad[3];
};

/* Which ports an allowance covers: all (any_port = 1) or up to FLOWTEL_FQDN_MAX_PORTS ranges. */
struct fqdn_l4 {
    __u8  any_port;
    __u8  nports;
    __u8  pad[6];
    struct fqdn_port ports[FLOWTEL_FQDN_MAX_PORTS];
};

/* fqdn_endpoints: policed pod address -> how it is policed. Absent = not policed. */
struct fqdn_endpoint_key {
    __u8  addr[16];
};

struct fqdn_endpoint {
    __u32 mode;          /* FLOWTEL_FQDN_MODE_* */
    __u32 pad;
};

/* fqdn_allow: (pod, destination) learned from an allowed DNS answer. */
struct fqdn_allow_key {
    __u8  pod[16];
    __u8  dst[16];
};

struct fqdn_allow_val {
    __u64 expires_ns;    /* bpf_ktime_get_ns clock: end of the record's TTL (min TTL applied) */
    __u64 until_ns;      /* expires_ns + grace: the datapath allows up to here */
    struct fqdn_l4 l4;
};

/* fqdn_cidr (LPM trie): prefixlen counts bits of pod (always 128) + bits of dst, where an IPv4
 * dst is written IPv4-mapped (::ffff:a.b.c.d, so v4 /n is 128 + 96 + n). Filled from
 * toCIDR/toCIDRSet (except removes by longer prefixes with deny = 1) and toEndpoints. */
struct fqdn_cidr_key {
    __u32 prefixlen;
    __u8  pod[16];
    __u8  dst[16];
};

/* fqdn_cidr_val.deny */
#define FLOWTEL_FQDN_CIDR_ALLOW   0
#define FLOWTEL_FQDN_CIDR_EXCEPT  1  /* an `except` hole (or no rule): no CIDR allowance; learned names may still allow */
#define FLOWTEL_FQDN_CIDR_DENY    2  /* egressDeny: overrides every allowance, learned names and DNS included */

struct fqdn_cidr_val {
    __u8  deny;          /* FLOWTEL_FQDN_CIDR_*: longest match wins, so a hole overrides the CIDR */
    __u8  pad[7];
    struct fqdn_l4 l4;
};

/* fqdn_ct (LRU): a connection a peer opened to the pod (its replies are not new egress);
 * fqdn_conn (LRU, same key and value): one the pod opened to a learned FQDN address (it stays
 * open past the answer's TTL, as Cilium's conntrack keeps it). Keyed from the pod's side; the
 * value is when it last carried
 * a packet from the pod, and an entry idle longer than Cilium's conntrack lifetimes no longer
 * allows anything. */
#define FLOWTEL_FQDN_CT_TCP_IDLE_S  21600  /* Cilium's --bpf-ct-timeout-regular-tcp */
#define FLOWTEL_FQDN_CT_ANY_IDLE_S  60     /* Cilium's --bpf-ct-timeout-regular-any */
struct fqdn_ct_key {
    __u8  pod[16];
    __u8  peer[16];
    __u16 pod_port;
    __u16 peer_port;
    __u8  protocol;
    __u8  pad[3];
};

/* Verdicts in struct fqdn_denied_key. */
#define FLOWTEL_FQDN_VERDICT_DROPPED 1
#define FLOWTEL_FQDN_VERDICT_AUDIT   2

/* fqdn_denied (LRU hash, pinned): every denied packet (dropped, or let through in audit mode),
 * counted in the kernel per pod, interface, destination, port, protocol and verdict. Values are
 * cumulative and nobody deletes entries: readers (the agent's fqdnpolicy receiver, the proxy's
 * flow log) each diff successive reads, so several can read without disturbing one another.
 * An entry the LRU evicts is recognised by a new first_ns; fqdn_denied_created counts
 * insertions, so created - live = evicted entries (their counts since the last read are lost).
 * The source port is not part of the key (each new connection attempt would be a new entry):
 * last_sport keeps the most recent one. */
struct fqdn_denied_key {
    __u8  saddr[16];     /* the policed pod; IPv4 in the first 4 bytes */
    __u8  daddr[16];
    __u32 ifindex;       /* host-side veth the packet was seen on (tc ingress: sent by the pod) */
    __u16 dport;         /* host byte order; 0 for protocols without ports and non-first fragments */
    __u8  family;        /* 4 or 6 */
    __u8  protocol;      /* IANA L4 protocol */
    __u8  verdict;       /* FLOWTEL_FQDN_VERDICT_* */
    __u8  pad[3];
};

struct fqdn_denied_stats {
    __u64 packets;       /* cumulative since the entry was created */
    __u64 bytes;         /* skb->len at tc: includes the Ethernet header, as the link counters do */
    __u64 first_ns;      /* bpf_ktime_get_ns (CLOCK_MONOTONIC) at creation: identifies the entry */
    __u64 last_ns;
    __u16 last_sport;    /* host byte order: source port of the most recent packet */
    __u8  tcp_flags;     /* union of the TCP flags byte of every segment */
    __u8  pad[5];
};

/* Indexes of the per-CPU fqdn_denied_created array (its own map, so that an existing pinned
 * fqdn_counters keeps its size across an upgrade). */
#define FLOWTEL_FQDN_DENIED_CNT_CREATED 0   /* entries inserted into fqdn_denied */
#define FLOWTEL_FQDN_DENIED_CNT_MAX     1

/* Indexes of the per-CPU fqdn_counters array. */
#define FLOWTEL_FQDN_CNT_ALLOWED_FQDN   0
#define FLOWTEL_FQDN_CNT_ALLOWED_CIDR   1
#define FLOWTEL_FQDN_CNT_ALLOWED_DNS    2   /* to port 53: redirected to the proxy */
#define FLOWTEL_FQDN_CNT_ALLOWED_REPLY  3
#define FLOWTEL_FQDN_CNT_DROPPED        4
#define FLOWTEL_FQDN_CNT_AUDIT          5
#define FLOWTEL_FQDN_CNT_EVENTS_LOST    6   /* denied packets not counted in fqdn_denied: insert failed */
#define FLOWTEL_FQDN_CNT_EXPIRED        7   /* packets to a learned IP past its deadline */
#define FLOWTEL_FQDN_CNT_MAX            8
/* ==== end of FQDN egress policy ========================================================== */

#endif /* FLOWTEL_H */
