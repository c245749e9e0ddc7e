/* tick_clock.h — CLOCK_MONOTONIC at tick resolution, read once per jiffy and CPU.
 *
 * For flow first/last times, where no exact interval is computed from them (tc flows, drop and
 * connection flows). bpf_jiffies64() is a load of jiffies_64 that the verifier inlines; the
 * clock helper (~20 ns here, a kvm-clock read) runs only on a CPU's first call of a jiffy. A time
 * can lag by up to two ticks instead of one (a read between the jiffies increment and the
 * timekeeping update keeps the older value for that tick).
 *
 * Kernel-only (user space never reads the entry), so not in flowtel.h. Each program keeps its
 * own per-CPU entry in a map of its own (BPF_PERCPU_ARRAY(name, struct flowtel_tick_clock, 1)):
 * programs of one kind do not nest on a CPU (tc runs do not; a tracepoint's program is skipped
 * while another tracing program runs there), so an entry needs no atomics, but a tc run can
 * interrupt a tracepoint run on the same CPU, so the two kinds must not share one.
 * Expanded into the program text by bpf/__init__.py; the guard keeps one copy when tc_flow.c
 * and kernel_events.c are compiled as one module. */
#ifndef FLOWTEL_TICK_CLOCK_H
#define FLOWTEL_TICK_CLOCK_H

struct flowtel_tick_clock {
    __u64 jiffies;  /* the jiffy ns was read in */
    __u64 ns;       /* 0: not read yet */
};

/* The clock itself: coarse (CLOCK_MONOTONIC_COARSE, kernels 5.11+, cheaper) or precise. coarse
 * is a compile-time constant at every call site, so the other branch is compiled out. */
static __always_inline __u64 flowtel_tick_read(int coarse)
{
    return coarse ? bpf_ktime_get_coarse_ns() : bpf_ktime_get_ns();
}

/* The time read during the current jiffy on this CPU; c is the program's per-CPU entry (0 if its
 * lookup failed, which cannot happen for index 0 of a per-CPU array: then the clock itself). */
static __always_inline __u64 flowtel_tick_time(struct flowtel_tick_clock *c, int coarse)
{
    __u64 j = bpf_jiffies64();
    if (!c)
        return flowtel_tick_read(coarse);
    if (c->jiffies != j || !c->ns) {
        c->ns = flowtel_tick_read(coarse);
        c->jiffies = j;
    }
    return c->ns;
}

#endif /* FLOWTEL_TICK_CLOCK_H */
