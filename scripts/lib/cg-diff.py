#!/usr/bin/env python3
"""Where a request's added instructions go: two callgrind profiles, each with the number of
requests it covered, compared function by function (by their own instructions, the sources
inlined into a function counted with it), per request.

    cg-diff.py BASE_PROFILE BASE_REQUESTS PROFILE REQUESTS [TOP [FELL]]

Prints the TOP (default 30) functions whose instructions per request grew most from the base
to the profile, then the FELL (default 0) that fell most (where code the base runs under one
name runs under another in the profile, inlined elsewhere, the two rows pair up), then the
total.
"""
import re
import subprocess
import sys
from collections import defaultdict

LINE = re.compile(r"^\s*([\d,]+)\s+\([\s\d.]+%\)\s+(.*?)(?:\s+\[[^\]]*\])?$")


def per_request(profile, requests):
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", profile],
        capture_output=True, text=True, check=True,
    ).stdout
    costs = defaultdict(float)
    total = 0.0
    section = 0
    for line in out.splitlines():
        if "PROGRAM TOTALS" in line:
            total = int(line.split()[0].replace(",", "")) / requests
            continue
        if "file:function" in line:
            section = 1
            continue
        if section != 1:
            continue
        if line.startswith("---"):
            # The function listing ends where the annotated sources begin.
            if costs:
                break
            continue
        m = LINE.match(line)
        if not m:
            continue
        # "file:function": a function's instructions may sit under several source files
        # (what was inlined into it); they are one function's here.
        name = m.group(2).split(":", 1)[-1]
        costs[name] += int(m.group(1).replace(",", "")) / requests
    return costs, total


def main():
    base, base_n, prof, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    top = int(sys.argv[5]) if len(sys.argv) > 5 else 30
    fell = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    a, a_total = per_request(base, base_n)
    b, b_total = per_request(prof, n)
    # Thread entry frames carry a whole thread's cost as their own when frames are missing;
    # they say nothing about where it went.
    skip = ("clone", "start_thread", "thread_start", "__rust_begin_short_backtrace",
            "call_once{{vtable.shim}}")
    rows = []
    for name in set(a) | set(b):
        if name.endswith(skip) or any(s in name for s in skip[3:]):
            continue
        rows.append((b.get(name, 0.0) - a.get(name, 0.0), a.get(name, 0.0), b.get(name, 0.0), name))
    rows.sort(reverse=True)
    print(f"| function | base/req | /req | added |")
    print(f"| --- | ---: | ---: | ---: |")
    shown = rows[:top] + [r for r in rows[::-1][:fell] if r[0] < 0 and r not in rows[:top]]
    for added, was, now, name in shown:
        short = name if len(name) <= 110 else name[:107] + "..."
        short = short.replace("|", "\\|")
        print(f"| `{short}` | {was:.0f} | {now:.0f} | {added:+.0f} |")
    print(f"| total | {a_total:.0f} | {b_total:.0f} | {b_total - a_total:+.0f} |")


if __name__ == "__main__":
    main()
