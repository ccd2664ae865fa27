"""All-reduce timing of torch.distributed with the gloo backend on loopback: the baseline that
protodino-collectives-bench compares its TCP ring with (same sizes, same schedule, same output).

Run with the reference virtualenv's python (torch 2.11.0):
    python crates/collectives/reference/bench_gloo.py --world 2 --min-bytes 1024 --max-bytes 268435456 --trials 5
Prints one line per size: RESULT <bytes> <seconds per call, slowest rank> <CPU seconds per call,
all ranks summed (user + system, getrusage)>.
Schedule (identical to the Rust benchmark): 2 warm-up calls, then --trials (5) timed runs, each a
barrier and clamp(256 MiB / bytes, 3, 200) calls of an in-place f32 SUM; the fastest run counts.
"""

import argparse
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def iterations(nbytes):
    return max(3, min(200, (256 << 20) // nbytes))


def sizes(lo, hi):
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out


def cpu_seconds():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def worker(rank, world, port, lo, hi, trials):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    buf = torch.zeros(hi // 4, dtype=torch.float32)
    for nbytes in sizes(lo, hi):
        t = buf[: nbytes // 4]
        for _ in range(2):
            dist.all_reduce(t)
        iters = iterations(nbytes)
        best = (float("inf"), 0.0)
        for _ in range(trials):
            dist.barrier()
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            for _ in range(iters):
                dist.all_reduce(t)
            wall = torch.tensor([(time.perf_counter() - t0) / iters])
            cpu = torch.tensor([(cpu_seconds() - cpu0) / iters])
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
            if wall.item() < best[0]:
                best = (wall.item(), cpu.item())
        if rank == 0:
            print(f"RESULT {nbytes} {best[0]:e} {best[1]:e}", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--min-bytes", type=int, default=1024)
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.add_argument("--trials", type=int, default=5)
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a.world, port, a.min_bytes, a.max_bytes, max(1, a.trials)), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
