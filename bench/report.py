#!/usr/bin/env python3
"""Turn bench/run.sh's raw figures into Markdown tables (medians, ratios, the issue 7 targets).

usage: report.py RESULTS.tsv...
Each line of each file: pair tool entry mode run seconds peak-rss-kb [cpu-seconds].
"""
import statistics
import sys
from collections import defaultdict

ENTRY_ORDER = ["tiny", "files20k", "bigfile", "multistage", "debian", "steps40"]
MODE_ORDER = ["cold", "warm", "incremental", "push"]
PAIR_TITLE = {
    "overlay": "kernel overlayfs (shmocker `--snapshotter overlayfs`) vs buildah `--storage-driver overlay`",
    "copy": "copying (shmocker `--snapshotter copy`) vs buildah `--storage-driver vfs`",
    "fuse": "fuse-overlayfs (shmocker `--snapshotter fuse-overlayfs`) vs buildah overlay with "
    "`mount_program=/usr/bin/fuse-overlayfs`",
}


def target(mode, buildah_secs):
    """The issue 7 target for shmocker/buildah, as a ratio."""
    if mode == "cold":
        return 0.5
    if mode == "warm":
        return 0.5 if buildah_secs < 0.4 else 0.2
    if mode == "incremental":
        return 0.3
    return 0.5


def fmt_s(x):
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def add(a, b):
    return None if a is None or b is None else a + b


def cpu_cells(s, b):
    """shmocker's and buildah's CPU seconds and their ratio (blank for figures without CPU)."""
    if s[3] is None or b[3] is None:
        return " | | "
    ratio = f"{s[3] / b[3]:.2f}" if b[3] > 0 else ""
    return f"{fmt_s(s[3])} | {fmt_s(b[3])} | {ratio}"


def main():
    runs = defaultdict(list)  # (pair, tool, entry, mode) -> [(secs, kb)]
    by_run = {}  # (pair, tool, entry, mode, file, run) -> seconds
    for path in sys.argv[1:]:
        for line in open(path):
            if line.startswith("#"):
                continue
            pair, tool, entry, mode, run, secs, kb, *cpu = line.rstrip("\n").split("\t")
            cpu = float(cpu[0]) if cpu else None
            runs[(pair, tool, entry, mode)].append((float(secs), int(kb), cpu))
            by_run[(pair, tool, entry, mode, path, run)] = float(secs)

    def paired_ratio(pair, entry, mode):
        """The median over runs of shmocker/buildah within one run: the two builds ran next to
        each other, so a change of the machine's load between runs cancels out."""
        ratios = [
            secs / by_run[(pair, "buildah", entry, mode, path, run)]
            for (p, tool, e, m, path, run), secs in by_run.items()
            if (p, tool, e, m) == (pair, "shmocker", entry, mode)
            and by_run.get((pair, "buildah", entry, mode, path, run))
        ]
        return statistics.median(ratios) if ratios else None

    def med(pair, tool, entry, mode):
        xs = runs.get((pair, tool, entry, mode))
        if not xs:
            return None
        cpus = [c for _, _, c in xs if c is not None]
        return (
            statistics.median(s for s, _, _ in xs),
            statistics.median(k for _, k, _ in xs),
            len(xs),
            statistics.median(cpus) if cpus else None,
        )

    pairs = [p for p in PAIR_TITLE if any(k[0] == p for k in runs)]
    entries = [e for e in ENTRY_ORDER if any(k[2] == e for k in runs)]
    for pair in pairs:
        print(f"### {PAIR_TITLE[pair]}\n")
        print(
            "| entry | mode | shmocker s | buildah s | ratio (paired) | target | met "
            "| shmocker CPU s | buildah CPU s | CPU ratio | shmocker RSS MB | buildah RSS MB | runs |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for entry in entries:
            for mode in MODE_ORDER:
                s = med(pair, "shmocker", entry, mode)
                b = med(pair, "buildah", entry, mode)
                if not s or not b:
                    continue
                ratio = paired_ratio(pair, entry, mode)
                t = target(mode, b[0])
                print(
                    f"| {entry} | {mode} | {fmt_s(s[0])} | {fmt_s(b[0])} | {ratio:.2f} | ≤ {t} | "
                    f"{'yes' if ratio <= t else '**no**'} | {cpu_cells(s, b)} | "
                    f"{s[1] / 1024:.0f} | {b[1] / 1024:.0f} | {min(s[2], b[2])} |"
                )
            # buildah compresses layers when it pushes, shmocker when it builds: the sum of the
            # cold build and the push is what a CI job that builds and pushes pays.
            sc, sp = med(pair, "shmocker", entry, "cold"), med(pair, "shmocker", entry, "push")
            bc, bp = med(pair, "buildah", entry, "cold"), med(pair, "buildah", entry, "push")
            if sc and sp and bc and bp:
                st, bt = sc[0] + sp[0], bc[0] + bp[0]
                print(
                    f"| {entry} | cold + push | {fmt_s(st)} | {fmt_s(bt)} | {st / bt:.2f} | — | | "
                    f"{cpu_cells((0, 0, 0, add(sc[3], sp[3])), (0, 0, 0, add(bc[3], bp[3])))} | | | |"
                )
        print()

    # Snapshotters against kernel overlayfs, per tool.
    others = [p for p in ("fuse", "copy") if p in pairs]
    if "overlay" in pairs and others:
        print("### Each tool's storage against its kernel overlay (median seconds, ratio to overlay)\n")
        head = "| entry | mode | tool | overlay s |" + "".join(f" {p} s | {p}/overlay |" for p in others)
        print(head)
        print("| --- | --- | --- | ---: |" + " ---: | ---: |" * len(others))
        for entry in entries:
            for mode in MODE_ORDER:
                for tool in ("shmocker", "buildah"):
                    base = med("overlay", tool, entry, mode)
                    if not base:
                        continue
                    cells = []
                    for p in others:
                        o = med(p, tool, entry, mode)
                        cells.append(f" {fmt_s(o[0])} | {o[0] / base[0]:.2f} |" if o else " | |")
                    print(f"| {entry} | {mode} | {tool} | {fmt_s(base[0])} |" + "".join(cells))
        print("\nExpected for shmocker: fuse-overlayfs ≤ 1.5× overlayfs, copy ≤ 5×.\n")

    # Peak RSS of shmocker across layer sizes.
    print("### shmocker peak RSS by entry (MB, median of the runs; target ≤ 64 MB, flat in layer size)\n")
    print("| entry | " + " | ".join(f"{p} {m}" for p in pairs for m in ("cold", "push")) + " |")
    print("| --- |" + " ---: |" * (2 * len(pairs)))
    for entry in entries:
        cells = []
        for p in pairs:
            for m in ("cold", "push"):
                r = med(p, "shmocker", entry, m)
                cells.append(f"{r[1] / 1024:.0f}" if r else "")
        print(f"| {entry} | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    main()
