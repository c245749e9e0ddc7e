/* flowtel.h — the one definition of every struct that crosses the kernel/user boundary.
 *
 * User space never keeps a copy of these layouts: bcc turns the map key/value types into
 * ctypes classes, and receiver/ebpf/layout.py derives binary unpack formats from those.
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

/* Counters of one flow for one drain interval. */
struct flow_stats {
    __u64 packets;
    __u64 bytes;         /* skb->len at tc: includes the Ethernet header, as the link counters do */
    __u64 first_ns;      /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    __u64 last_ns;
    __u32 syn;           /* segments with SYN and not ACK */
    __u32 synack;
    __u32 fin;
    __u32 rst;
    __u8  tcp_flags;     /* union of the TCP flags byte of every segment */
    __u8  pad[7];
};

/* Per-interface, per-hook totals (cumulative; exact even when the flow map overflows). */
struct iface_key {
    __u32 ifindex;
    __u32 hook;
};

struct iface_stats {
    __u64 packets;
    __u64 bytes;
};

/* Indexes of the per-CPU counters array. */
#define FLOWTEL_CNT_FLOWS_CREATED_0   0  /* new entries inserted into flow map 0 */
#define FLOWTEL_CNT_FLOWS_CREATED_1   1  /* ... into flow map 1 */
#define FLOWTEL_CNT_FLOW_UPDATE_FAIL  2  /* packets not counted in a flow: insert failed */
#define FLOWTEL_CNT_IFACE_UPDATE_FAIL 3  /* packets not counted in interface totals */
#define FLOWTEL_CNT_MAX               4

#endif /* FLOWTEL_H */
