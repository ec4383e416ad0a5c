"""What the loader's xxh3 checksum costs: load_into of one warm safetensors file, with and without it, alternating.

    python examples/loader_checksum.py              # 32 tensors of 256 MiB (8 GiB) into CUDA parameters
    python examples/loader_checksum.py --tensors 4 --device cpu   # a small run without a GPU

Also prints the raw xxh3_128 speed of this host on a 64 MiB buffer, and whether hashing releases the GIL (another
Python thread keeps running while a buffer is hashed), the two things the loader's second hashing thread needs.
"""

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save_file

from llmapi.engine.loader import fast_hasher, load_into

ROWS, COLS = 16384, 8192  # one bfloat16 tensor: 256 MiB


def hash_speed(buf) -> float:
    """GiB/s of xxh3_128 over `buf` (64 MiB), 16 times."""
    start = time.perf_counter()
    for _ in range(16):
        xxhash.xxh3_128(buf)
    return 16 * 64 / 1024 / (time.perf_counter() - start)


def other_thread_rate(buf) -> float:
    """Millions of loop iterations per second another Python thread makes while `buf` is hashed."""
    count, stop = [0], [False]

    def spin():
        while not stop[0]:
            count[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.2)
    before, start = count[0], time.perf_counter()
    hash_speed(buf)
    rate = (count[0] - before) / (time.perf_counter() - start) / 1e6
    stop[0] = True
    thread.join()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=32, help="256 MiB tensors in the file (default 32: 8 GiB)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=4)
    a = p.parse_args()

    path = Path(tempfile.mkdtemp(prefix="llmapi-loader-")) / "rank0.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16) for i in range(a.tensors)}, str(path))
    hasher = fast_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(64 << 20):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    gib = path.stat().st_size / 2**30

    buf = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=a.device == "cuda").numpy()
    print(f"xxh3_128 of a 64 MiB buffer: {hash_speed(buf):.1f} GiB/s")
    print(f"while hashing, another Python thread ran {other_thread_rate(buf):.2f} M loop iterations/s")

    params = {f"t{i}": torch.empty(ROWS, COLS, dtype=torch.bfloat16, device=a.device) for i in range(a.tensors)}
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    load_into(path, params)  # the file into the page cache
    times = {"checksum": [], "none": []}
    for _ in range(a.repeats):
        for kind in times:
            sync()
            start = time.perf_counter()
            load_into(path, params, checksum=digest if kind == "checksum" else None)
            sync()
            times[kind].append(time.perf_counter() - start)
    for kind, ts in times.items():
        median = statistics.median(ts)
        print(f"load_into {kind}: " + " ".join(f"{t:.3f}" for t in ts) + f"  median {median:.3f} s "
              f"({gib / median:.2f} GiB/s)")
    path.unlink()


if __name__ == "__main__":
    main()
