#!/usr/bin/env python3
"""Generate the benchmark contexts that are too big to keep in git (bench/run.sh calls this).

usage: gen.py OUT_DIR

Writes, deterministically (the same bytes on every machine and every run):
  OUT_DIR/files20k/files/dNNN/fNNNNN  20,000 files in 200 directories, 200 MB in all; sizes
                                      from 1 to 19 KiB; half pseudo-random bytes, half text
  OUT_DIR/bigfile/seed/rand.bin       8 MiB of pseudo-random bytes  (bigfile's RUN repeats
  OUT_DIR/bigfile/seed/text.txt       8 MiB of text                  them into a 480 MiB file)
The 8 MiB chunks are longer than gzip's 32 KiB and zstd -3's 2 MiB windows, so the repeated
chunks compress no better than fresh data would.
"""
import os
import random
import sys

WORDS = (
    "the of and to in is that for it as with was on be by at this from or an are not have but "
    "layer image build registry digest manifest config overlay snapshot container namespace "
    "runtime mount kernel process cache context stage step copy push pull blob index platform"
).split()


def text_block(rng, size):
    out = bytearray()
    line = []
    while len(out) < size:
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 14):
            out += (" ".join(line) + ".\n").encode()
            line = []
    return bytes(out[:size])


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen.py OUT_DIR")
    out = sys.argv[1]
    rng = random.Random(20261130)
    text = text_block(rng, 1 << 20)
    # 20,000 files: sizes uniform in 1..19 KiB (mean 10 KiB, 200 MB in all).
    for i in range(20000):
        size = rng.randint(1, 19) * 1024
        if i % 2:
            data = rng.randbytes(size)
        else:
            start = rng.randrange(0, len(text) - size)
            data = text[start:start + size]
        write(os.path.join(out, "files20k", "files", "d%03d" % (i // 100), "f%05d" % i), data)
    write(os.path.join(out, "bigfile", "seed", "rand.bin"), rng.randbytes(8 << 20))
    write(os.path.join(out, "bigfile", "seed", "text.txt"), text_block(rng, 8 << 20))


if __name__ == "__main__":
    main()
