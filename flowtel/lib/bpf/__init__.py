"""Helpers every flowtel eBPF loader shares (receiver/ebpf, receiver/fqdnpolicy, dnsproxy).

- :mod:`constants`: the ``#define`` constants of ``bpf/flowtel.h``, read from the header;
- :mod:`layout`: binary unpack formats from bcc's ctypes classes of the header's structs;
- :mod:`batch`: whole-map batch reads (``BPF_MAP_LOOKUP[_AND_DELETE]_BATCH``);
- :mod:`doublebuffer`: draining a pair of maps a program writes one at a time, losing nothing;
- :mod:`earlydrain`: when to drain a double buffer early, and watching its fill during a drain;
- :mod:`tcattach`: tc clsact attachment that follows interfaces as they come and go, with the
  per-interface counter slot each filter carries;
- :mod:`btf`, :mod:`tracefs`: kernel struct offsets and tracepoint formats of the running kernel.

bcc is the system's python3-bpfcc; modules import it only where they need it.
"""
