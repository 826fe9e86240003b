#!/usr/bin/env python3
"""Latencies as the loopback saw them: from a tcpdump capture (`-s 96` is enough), each HTTP/1.1
request's first packet to its response's first packet, per connection, in order.

    wire-latency.py CAPTURE SERVER_PORT [UPSTREAM_PORT]

Prints one line per leg: `client` (the load generator's requests to the server on SERVER_PORT)
and, with UPSTREAM_PORT, `upstream` (the server's requests to its upstream), each as
`leg n p50 p99 p999 max` (milliseconds). The client leg is what the server under test and
everything behind it took, without the time the load generator's own threads took to write the
request and read the answer: the difference between it and the generator's own figures is the
generator's.
"""
import struct
import sys
from collections import defaultdict, deque


def packets(path):
    """(time, source port, destination port, first payload bytes) of each TCP packet."""
    with open(path, "rb") as f:
        head = f.read(24)
        magic = struct.unpack("<I", head[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
        link = struct.unpack(endian + "I", head[20:24])[0]
        # Ethernet (what tcpdump gives for lo), Linux cooked, BSD loopback; raw IP otherwise.
        offset = {1: 14, 113: 16, 0: 4}.get(link, 0)
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return
            sec, frac, incl, _ = struct.unpack(endian + "IIII", rec)
            data = f.read(incl)
            ip = data[offset:]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            tcp = ip[(ip[0] & 15) * 4:]
            if len(tcp) < 20:
                continue
            sport, dport = struct.unpack(">HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4:][:8]
            yield sec + frac / (1e9 if nano else 1e6), sport, dport, payload


def quantile(sorted_xs, q):
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def main():
    path, server = sys.argv[1], int(sys.argv[2])
    upstream = int(sys.argv[3]) if len(sys.argv) > 3 else None
    legs = {server: "client"}
    if upstream:
        legs[upstream] = "upstream"
    waiting = defaultdict(deque)
    latencies = defaultdict(list)
    for t, sport, dport, payload in packets(path):
        if dport in legs and payload[:4] in (b"POST", b"GET ", b"PUT ", b"PATC", b"DELE"):
            waiting[(dport, sport)].append(t)
        elif sport in legs and payload.startswith(b"HTTP/"):
            sent = waiting[(sport, dport)]
            if sent:
                latencies[legs[sport]].append(t - sent.popleft())
    for leg in ("client", "upstream"):
        xs = sorted(latencies.get(leg, []))
        if not xs:
            continue
        ms = [quantile(xs, q) * 1e3 for q in (0.5, 0.99, 0.999)] + [xs[-1] * 1e3]
        print(leg, len(xs), " ".join(f"{v:.2f}" for v in ms))


if __name__ == "__main__":
    main()
