#!/usr/bin/env python3
"""The torchrun side of the recovery benchmark (`cargo xtask bench --only recovery`): three
elastic agents on this machine train the DINO loop of train_torch.py with checkpoint-and-restart,
one "node" is killed with SIGKILL after `--kill-at` steps, and the time until the survivors
complete their next step is measured.

    python scripts/bench/recovery_torch.py orchestrate --config configs/default.toml \
        --config configs/cpu-demo.toml --config configs/bench/e2e-fmnist.toml \
        --fmnist-raw <data_root>/fashion-mnist/raw --work /tmp/recovery-torch

`orchestrate` (this process) holds the rendezvous store and launches the agents:

    torchrun --nnodes 2:3 --nproc-per-node 1 --rdzv-backend c10d
             --rdzv-endpoint 127.0.0.1:PORT --rdzv-id ID --rdzv-conf is_host=false
             --max-restarts 3 --local-addr 127.0.0.1 recovery_torch.py train ...

The rendezvous store is a `TCPStore` server that this process starts on a port the OS assigns
(port 0; no bind-close-rebind race) before the agents start; `is_host=false` makes every agent a
client of it. That is how a real deployment runs c10d rendezvous (the endpoint on a host that
outlives the training nodes): with the default, the store lives inside whichever agent bound the
endpoint first, and killing that node would take the rendezvous down with it. The agents run with
`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`, torch's documented opt-out of sharing the rendezvous store
with the training processes: with the sharing (the default since 2.5), the store of the first
round is reused by every restart without a per-attempt prefix, and a restarted process reads the
previous attempt's gloo addresses (pytorch/pytorch#135712). Measured here with torch 2.11.0: the
first restart dialled the killed rank's old gloo port and failed, the second hung in
`init_process_group`; with the opt-out every round's rank 0 hosts a fresh store. Every other
setting is torchrun's default: rendezvous `last_call_timeout` 30 s, `join_timeout` 600 s,
keep-alive every 5 s (3 misses), `--monitor-interval` 0.1 s, gloo's 30 min operation timeout
(a killed peer's sockets close, so survivors fail at once, not after the timeout). `--rdzv-conf`
adds options (e.g. `last_call_timeout=2`) to measure a tuned setup.

A node is killed the way a machine dies: SIGKILL to its agent and every process below it (the
training process, which torchrun starts in a session of its own, and its DataLoader workers), at
once. The victim is the node whose training process has rank `--victim-rank` in the first round.
The survivors' all-reduce fails, their agents restart them (one of the `--max-restarts`), a new
rendezvous round forms with the 2 survivors (after the last call for a third), and the new
processes resume from the latest checkpoint.

`train` is the training process torchrun starts: `torch.distributed` over gloo, the model and step
of train_torch.py's `DinoLoop`, the same global batch at every world size (each rank takes every
W-th sample of the step's global batch, as protodino and `DistributedSampler` do; the batch of
step `i` is a function of `i` alone, so a resumed run sees the same data), rank 0 saving a
checkpoint (models, optimiser, centre) every `--checkpoint-every` steps, every process resuming
from the newest one. Each rank appends `{"step", "time", "world", "restart", "rank"}` JSON lines
(and `start` / `error` / `checkpoint` events) to `<work>/steps.jsonl`.

Figures (one JSON line on stdout, last): `recovery_s` = kill → the first step completed by every
rank of the restarted group; `regained_s` = kill → the first step past the last one completed
before the kill; `steps_lost` = the last step completed before the kill − the checkpoint step the
restart resumed from (the step in flight at the kill is not counted).
"""
import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_torch import (  # noqa: E402
    DinoLoop, FashionMnist, MultiCrop, merged,
)


# ------------------------------------------------------------------------------------------------
# The training process (one per node, started by torchrun).

class StepBatches(Sampler):
    """This rank's indices of steps `start..stop`: step `i` is the `G` consecutive entries from
    `(i mod steps_per_epoch) G` of epoch `i // steps_per_epoch`'s permutation (seeded by
    `seed + epoch`), of which rank `r` takes every `world`-th from `r`."""

    def __init__(self, n, global_batch, rank, world, seed, start, stop):
        self.n, self.g, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.stop = seed, start, stop
        self.per_epoch = n // global_batch

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        epoch, perm = -1, None
        for it in range(self.start, self.stop):
            if it // self.per_epoch != epoch:
                epoch = it // self.per_epoch
                gen = torch.Generator().manual_seed(self.seed + epoch)
                perm = torch.randperm(self.n, generator=gen).tolist()
            b = (it % self.per_epoch) * self.g
            yield perm[b + self.rank:b + self.g:self.world]


def train(a):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    work = Path(a.work)
    log = open(work / "steps.jsonl", "a", buffering=1)

    def note(**kv):
        log.write(json.dumps({"rank": rank, "world": world, "restart": restart, **kv}) + "\n")
        log.flush()

    imported = time.time()
    dist.init_process_group("gloo")
    grouped = time.time()
    cfg = merged(a.config)
    c, t, d = cfg["crops"], cfg["train"], cfg["data"]
    torch.set_num_threads(a.threads)
    torch.manual_seed(t["seed"])
    preset = (c["global_crop_size"], tuple(c["global_crops_scale"]), c["local_crops_number"],
              c["local_crop_size"], tuple(c["local_crops_scale"]))
    ds = FashionMnist(a.fmnist_raw, d["limit"], MultiCrop(preset))
    g = a.global_batch
    assert g % world == 0, f"the global batch {g} does not divide over {world} ranks"
    per_epoch = len(ds) // g
    loop = DinoLoop(cfg, per_epoch, g)
    ckpt = work / "checkpoint.pt"
    start = 0
    if ckpt.exists():
        # Our own file (its schedule values are numpy scalars, which weights_only refuses).
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        loop.load_state_dict(state)
        start = state["step"]
    loaded = time.time()
    note(event="start", resume=start, pid=os.getpid(), ppid=os.getppid(),
         process_start=PROCESS_START, imported=imported, grouped=grouped, time=loaded)
    nt = d["num_threads"]
    sampler = StepBatches(len(ds), g, rank, world, t["seed"], start, a.steps)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=nt,
                        prefetch_factor=d["prefetch_batches"] if nt > 0 else None)
    try:
        for it, images in zip(range(start, a.steps), loader):
            loss = loop.step(it, images, world=world)
            note(step=it + 1, time=time.time(), loss=loss)
            if rank == 0 and a.checkpoint_every > 0 and (it + 1) % a.checkpoint_every == 0:
                tmp = work / "checkpoint.pt.tmp"
                torch.save({"step": it + 1, **loop.state_dict()}, tmp)
                os.replace(tmp, ckpt)
                note(event="checkpoint", step=it + 1, time=time.time())
    except Exception as e:
        note(event="error", time=time.time(), what=f"{type(e).__name__}: {e}"[:300])
        raise
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------
# The orchestrator: store, agents, kill, measurement.

def descendants(root):
    """`root` and every process below it (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def kill_tree(root, sig=signal.SIGKILL):
    for pid in descendants(root):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Steps:
    """What the ranks have logged so far in `steps.jsonl`."""

    def __init__(self, path):
        self.path, self.offset = path, 0
        self.starts, self.errors, self.checkpoints = [], [], []
        self.done = {}  # (restart, step) -> {rank: time}
        self.world = {}  # restart -> world

    def poll(self):
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind("\n") + 1
        self.offset += len(chunk[:end].encode())
        for line in chunk[:end].splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            ev = r.get("event")
            if ev == "start":
                self.starts.append(r)
                self.world[r["restart"]] = r["world"]
            elif ev == "error":
                self.errors.append(r)
            elif ev == "checkpoint":
                self.checkpoints.append(r)
            else:
                self.done.setdefault((r["restart"], r["step"]), {})[r["rank"]] = r["time"]

    def completed(self, restart, step):
        """When every rank of `restart` had completed `step` (None: not yet)."""
        ranks = self.done.get((restart, step), {})
        if len(ranks) < self.world.get(restart, 1 << 30):
            return None
        return max(ranks.values())

    def last_completed(self, restart):
        steps = [s for (r, s) in self.done if r == restart and self.completed(r, s) is not None]
        return max(steps, default=0)

    def last_logged_before(self, t):
        """The highest step any rank logged before `t`."""
        return max((s for (_, s), ranks in self.done.items() if min(ranks.values()) < t), default=0)


def orchestrate(a):
    work = Path(a.work)
    if work.exists():
        for p in work.iterdir():
            p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          multi_tenant=True, timeout=timedelta(seconds=60))
    port = store.port
    conf = ",".join(["is_host=false"] + [c for c in a.rdzv_conf.split(",") if c])
    run_id = f"recovery-{uuid.uuid4().hex[:8]}"
    train_args = [__file__, "train", "--work", str(work), "--fmnist-raw", str(a.fmnist_raw),
                  "--global-batch", str(a.global_batch), "--steps", str(a.steps),
                  "--checkpoint-every", str(a.checkpoint_every), "--threads", str(a.threads)]
    for c in a.config:
        train_args += ["--config", str(c)]
    launcher = [sys.executable, "-m", "torch.distributed.run",
                "--nnodes", f"{a.min_nodes}:{a.nodes}", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", run_id, "--rdzv-conf", conf,
                "--max-restarts", str(a.max_restarts), "--local-addr", "127.0.0.1"]
    print("torchrun: " + " ".join(launcher[3:]) + " recovery_torch.py train ...", flush=True)
    agents = []
    # The agents' INFO log (rendezvous rounds, restarts) in node-*.log; it changes nothing else.
    env = {**os.environ, "LOGLEVEL": os.environ.get("LOGLEVEL", "INFO"),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    for i in range(a.nodes):
        out = open(work / f"node-{i}.log", "w")
        agents.append(subprocess.Popen(launcher + train_args, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=env))
    steps = Steps(work / "steps.jsonl")
    result = {"impl": "torchrun", "nodes": a.nodes, "share_rdzv_tcp_store": False, "min_nodes": a.min_nodes,
              "global_batch": a.global_batch, "checkpoint_every": a.checkpoint_every,
              "kill_at": a.kill_at, "victim_rank": a.victim_rank, "rdzv_conf": conf,
              "max_restarts": a.max_restarts, "recovered": False}
    t_kill = None
    deadline = time.time() + a.timeout
    try:
        while time.time() < deadline:
            time.sleep(0.05)
            steps.poll()
            if any(p.poll() is not None for p in agents if t_kill is None):
                raise SystemExit(f"an agent exited before the kill; see {work}/node-*.log")
            if t_kill is None:
                # The newest full group (a first round that formed without the third node is
                # restarted with it).
                r0 = max((s["restart"] for s in steps.starts), default=0)
                if steps.world.get(r0) != a.nodes or steps.last_completed(r0) < a.kill_at:
                    continue
                victim = next(s for s in steps.starts if s["restart"] == r0 and s["rank"] == a.victim_rank)
                node = next((i for i, p in enumerate(agents) if victim["pid"] in descendants(p.pid)), None)
                if node is None:
                    raise SystemExit(f"rank {a.victim_rank} (pid {victim['pid']}) is under no agent")
                t_kill = time.time()
                kill_tree(agents[node].pid)
                steps.poll()
                before = steps.last_logged_before(t_kill)
                result.update(victim_node=node, steps_before_kill=before)
                print(f"torchrun: killed node {node} (rank {a.victim_rank}, agent pid "
                      f"{agents[node].pid}) after step {before}", flush=True)
                deadline = t_kill + a.timeout
                continue
            restarts = sorted({s["restart"] for s in steps.starts if s["restart"] > r0})
            if not restarts:
                continue
            r = restarts[-1]
            resumed = min(s["resume"] for s in steps.starts if s["restart"] == r)
            first = steps.completed(r, resumed + 1)
            if first is None:
                continue
            regained = steps.completed(r, result["steps_before_kill"] + 1)
            if regained is None and a.steps > result["steps_before_kill"]:
                continue
            new = [s for s in steps.starts if s["restart"] == r]
            errors = [e for e in steps.errors if e["time"] >= t_kill]
            result.update(
                recovered=True, restart=r, world_after=steps.world[r], resumed_from=resumed,
                steps_lost=result["steps_before_kill"] - resumed,
                recovery_s=first - t_kill,
                regained_s=(regained - t_kill) if regained is not None else None,
                timeline={
                    "survivors_failed_s": min((e["time"] for e in errors), default=t_kill) - t_kill,
                    "restarted_processes_started_s": min(s["process_start"] for s in new) - t_kill,
                    "torch_imported_s": max(s["imported"] for s in new) - t_kill,
                    "process_group_formed_s": max(s["grouped"] for s in new) - t_kill,
                    "checkpoint_loaded_s": max(s["time"] for s in new) - t_kill,
                    "first_step_s": first - t_kill,
                },
                survivor_error=errors[0]["what"] if errors else None,
            )
            break
    finally:
        for p in agents:
            if p.poll() is None:
                kill_tree(p.pid, signal.SIGTERM)
        stop = time.time() + 10
        for p in agents:
            try:
                p.wait(timeout=max(0.1, stop - time.time()))
            except subprocess.TimeoutExpired:
                kill_tree(p.pid)
                p.wait()
        del store
    if not result["recovered"]:
        result["waited_s"] = a.timeout
    print(json.dumps(result), flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("orchestrate", "train"):
        p = sub.add_parser(name)
        p.add_argument("--config", action="append", required=True, type=Path)
        p.add_argument("--fmnist-raw", required=True, type=Path)
        p.add_argument("--work", required=True, type=Path)
        p.add_argument("--global-batch", type=int, default=48)
        p.add_argument("--steps", type=int, default=40, help="steps of the whole run")
        p.add_argument("--checkpoint-every", type=int, default=10)
        p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    o = sub.choices["orchestrate"]
    o.add_argument("--nodes", type=int, default=3)
    o.add_argument("--min-nodes", type=int, default=2)
    o.add_argument("--kill-at", type=int, default=15, help="kill once every rank completed this step")
    o.add_argument("--victim-rank", type=int, default=1)
    o.add_argument("--max-restarts", type=int, default=3)
    o.add_argument("--rdzv-conf", default="", help="extra rendezvous options, comma separated")
    o.add_argument("--timeout", type=float, default=300,
                   help="seconds to wait for the start, and then for the recovery")
    a = ap.parse_args()
    return orchestrate(a) if a.cmd == "orchestrate" else train(a)


if __name__ == "__main__":
    sys.exit(main())
