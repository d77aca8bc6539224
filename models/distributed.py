"""Data-parallel training over mx.distributed, and the launcher behind `moe-min train --ranks N`
(N processes on this machine, MLX's ring backend on loopback) and `--hostfile FILE` (the
machines of an `mlx.launch` hostfile: ring over TCP, or JACCL over Thunderbolt on Macs).

Each rank trains on its rows of the global batch (`--batch-size` stays the global batch); one
all_sum per step of every gradient and the loss, flattened into one array, averages them, so
every rank takes the same AdamW step and the weights never drift apart. Rank 0 alone reports,
evaluates and writes metrics and checkpoints. A run starts from what rank 0 holds (a fresh
init or its checkpoint), broadcast to the others, so no other machine needs a copy of --out.

What equals one process with the global batch, and what is per rank (the reference semantics):
- the objective: a rank's loss is the mean cross-entropy over its tokens plus each routed
  block's auxiliary losses, each a mean over routing groups or tokens (load balance, z-loss,
  importance, load, predictor and router BCE). Shares are equal, so the mean over ranks is the
  global mean: the same number up to float summation order, with no collective in the forward.
- routing groups: group="sequence" (token choice's default) and group="fixed" with groups that
  tile a rank's share are the same groups as in one process. group="batch" (expert choice's
  default) groups a rank's share only: per device, as vmoe and GShard group, which equals one
  process with group="fixed", group_size = batch·context/N. The global group would need the
  router logits all-gathered in every forward pass; we do not do that.
- routing noise and the encoder's masks: one stream per rank (seed·N + rank), so the same
  distribution as one process, not the same draws.
- the gradient norm and clipping act on the averaged gradient, the same on every rank;
  evaluation and routing statistics run on rank 0 with the full weights: one process's numbers.
Expert parallel (experts sharded over the ranks): models/expert_parallel.py.
May import: anything but cli; mlx.core only after moe_min.backends.ops_mlx (it loads a BLAS).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moe_min.models import configs

# gradients are all-summed in flat arrays of up to this size (scripts/bench_distributed.py on
# 2 ranks, loopback: tiny-moe's 6.4 MB in one array 3x faster than one all_sum per tensor;
# small-moe's 85 MB in one array 2x slower than in 16 MiB buckets or per tensor)
BUCKET_BYTES = 16 * 2 ** 20
# expert weights and their AdamW moments: what --expert-parallel shards over the ranks
SHARDED = re.compile(r"(^|\.)moe\.expert_w[123]$")
# a rank runs the CLI itself; `-c`, not a script path: mlx.launch ran a relative script path
# from another directory and still exited 0
CHILD = "import sys; from moe_min.cli import main; sys.exit(main(prog_name='moe-min'))"


def mlx_core():
    from moe_min.backends import ops_mlx  # noqa: F401, I001 - loads the BLAS before mlx.core

    import mlx.core as mx

    return mx


class World:
    """This process's place among `size` ranks; rank 0 reports and writes. The world of one
    process (ALONE) changes nothing: every method is then the identity."""

    def __init__(self, group=None, expert_parallel: bool = False):
        self.group, self.expert_parallel = group, expert_parallel and group is not None
        self.rank, self.size = (group.rank(), group.size()) if group is not None else (0, 1)
        self.analytic: dict = {}  # bytes per rank per step, by what sends them (set by check)

    def sharded(self, name: str) -> bool:
        return self.expert_parallel and SHARDED.search(name) is not None

    def check(self, ops, config, tc, params: dict) -> None:
        """Refuse what cannot split over the ranks; note the analytic traffic per step."""
        if self.size == 1:
            return
        if ops.name != "mlx":
            raise ValueError(f"backend {ops.name!r}: --ranks and --hostfile run on mlx "
                             "(mx.distributed)")
        if tc.batch_size % self.size:
            raise ValueError(f"batch size {tc.batch_size}: expected a multiple of the "
                             f"{self.size} ranks (each takes an equal share)")
        experts = getattr(getattr(config, "moe", None), "num_experts", 0)
        if self.expert_parallel and (not experts or experts % self.size):
            raise ValueError(f"--expert-parallel: {experts} experts per MoE layer; expected a "
                             f"positive multiple of the {self.size} ranks")
        self.analytic = analytic_bytes(self, config, tc.batch_size // self.size, params)

    def rows(self, batch: np.ndarray) -> np.ndarray:
        """This rank's equal share of the global batch's rows."""
        share = len(batch) // self.size
        return batch[self.rank * share:(self.rank + 1) * share]

    def stream(self, draw: int) -> int:
        """The seed of this rank's draws (routing noise, masks) at a step's `draw`."""
        return draw if self.size == 1 else draw * self.size + self.rank

    # ---- inside the compiled step ----------------------------------------------------------

    def reduce(self, value, grads: dict):
        """(loss, grads) averaged over the ranks: every replicated gradient and the loss,
        flattened into BUCKET_BYTES arrays, one all_sum each (tiny-moe: one per step). A
        sharded expert's gradient already holds every rank's tokens (the all-to-all's
        transpose), so it is only divided."""
        if self.size == 1:
            return value, grads
        mx = mlx_core()
        names = sorted(n for n in grads if not self.sharded(n)) + ["loss"]
        grads = {**grads, "loss": mx.reshape(value, (1,))}
        buckets, held = [[]], 0
        for name in names:
            if buckets[-1] and 4 * (held + grads[name].size) > BUCKET_BYTES:
                buckets, held = buckets + [[]], 0
            buckets[-1].append(name)
            held += grads[name].size
        out = {}
        for bucket in buckets:
            flat = mx.concatenate([mx.reshape(grads[n], (-1,)) for n in bucket])
            flat, at = mx.distributed.all_sum(flat, group=self.group) / self.size, 0
            for n in bucket:
                out[n] = mx.reshape(flat[at:at + grads[n].size], grads[n].shape)
                at += grads[n].size
        out.update({n: g / self.size for n, g in grads.items() if self.sharded(n)})
        return mx.reshape(out.pop("loss"), ()), out

    @property
    def norm(self):
        """The global gradient norm where the ranks hold different gradients (expert shards);
        None: each rank's own norm is the global one (optim.global_norm)."""
        return self._sharded_norm if self.expert_parallel else None

    def _sharded_norm(self, grads: dict):
        mx = mlx_core()
        shards = [mx.sum(g * g) for n, g in sorted(grads.items()) if self.sharded(n)]
        rest = [mx.sum(g * g) for n, g in sorted(grads.items()) if not self.sharded(n)]
        # after the gradients' all_sum, which `rest` reads: two collectives in one order
        shards = mx.depends(sum(shards), sum(rest))
        return mx.sqrt(sum(rest) + mx.distributed.all_sum(shards, group=self.group))

    # ---- moving state between ranks --------------------------------------------------------

    def _broadcast(self, value: np.ndarray) -> np.ndarray:
        """Rank 0's array on every rank: an all_sum to which the others add zeros (exact)."""
        mx = mlx_core()
        mine = value if self.rank == 0 else np.zeros_like(value)
        return np.array(mx.distributed.all_sum(mx.array(mine), group=self.group))

    def share(self, state):
        """Rank 0's (config, train settings, step, params, optimizer state or None, corpus id)
        on every rank: the JSON of the settings, then every array in one flat float32 array."""
        if self.size == 1:
            return state
        from moe_min.models.train import TrainConfig

        if self.rank == 0:
            config, tc, start, params, opt_state, corpus = state
            trees = {"params": params, "opt": opt_state or {}}
            meta = {"kind": type(config).__name__, "model": config.to_dict(), "train": asdict(tc),
                    "start": start, "corpus": corpus, "fresh": opt_state is None,
                    "shapes": {t: {k: list(v.shape) for k, v in tree.items()}
                               for t, tree in trees.items()}}
            text = np.frombuffer(json.dumps(meta).encode(), np.uint8).astype(np.int32)
            flat = np.concatenate([np.ravel(v).astype(np.float32) for tree in trees.values()
                                   for v in tree.values()] or [np.zeros(0, np.float32)])
        else:
            text, flat = np.zeros(0, np.int32), np.zeros(0, np.float32)
        size = self._broadcast(np.array([len(text), len(flat)], np.int32))
        text = self._broadcast(np.zeros(size[0], np.int32) if self.rank else text)
        flat = self._broadcast(np.zeros(size[1], np.float32) if self.rank else flat)
        meta = json.loads(text.astype(np.uint8).tobytes())
        trees, at = {}, 0
        for tree, shapes in meta["shapes"].items():
            trees[tree] = {}
            for name, shape in shapes.items():
                count = int(np.prod(shape, dtype=np.int64))
                trees[tree][name] = flat[at:at + count].reshape(shape)
                at += count
        config = getattr(configs, meta["kind"]).from_dict(meta["model"])
        return (config, TrainConfig.from_dict(meta["train"]), meta["start"], trees["params"],
                None if meta["fresh"] else trees["opt"], meta["corpus"])

    def shard(self, tree: dict) -> dict:
        """This rank's slice of the expert axis of every sharded array (NumPy, full E)."""
        if not self.expert_parallel:
            return tree
        out = dict(tree)
        for name, value in tree.items():
            if self.sharded(name):
                share = value.shape[0] // self.size
                out[name] = value[self.rank * share:(self.rank + 1) * share]
        return out

    def full(self, tree: dict) -> dict:
        """Every sharded array gathered whole (E experts) on every rank, computed now (a
        collective that some rank left unevaluated would leave the others waiting), after
        checking that the replicated arrays are bit for bit the same on every rank."""
        if self.size == 1:
            return tree
        mx = mlx_core()
        digest = hashlib.sha256()
        for name in sorted(n for n in tree if not self.sharded(n)):
            digest.update(np.asarray(tree[name]).tobytes())
        mine = np.frombuffer(digest.digest()[:8], np.int32)
        every = np.array(mx.distributed.all_gather(mx.array(mine), group=self.group))
        if not (every.reshape(self.size, -1) == mine).all():
            raise ValueError(f"rank {self.rank}: the ranks' weights differ (each rank must "
                             "compute the same update: same MLX version and device everywhere)")
        if not self.expert_parallel:
            return tree
        out = {k: mx.distributed.all_gather(v, group=self.group) if self.sharded(k) else v
               for k, v in tree.items()}
        mx.eval(list(out.values()))
        return out

    def wrap(self, ops):
        """The ops a training step runs on: expert parallel routes the experts' buffers to the
        rank that holds each expert."""
        if not self.expert_parallel:
            return ops
        from moe_min.models.expert_parallel import ExpertParallelOps

        return ExpertParallelOps(ops, self)


ALONE = World()


def join(expert_parallel: bool = False) -> World:
    """This process's world, inside a run started by `launch` (or by mlx.launch itself)."""
    mx = mlx_core()
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise ValueError(f"no MLX distributed group to join ({str(e).strip()}): start the ranks "
                         "with --ranks N or --hostfile FILE") from None
    return World(group, expert_parallel)


# ---- communication volume ------------------------------------------------------------------

def analytic_bytes(world: World, config, local_batch: int, params: dict) -> dict:
    """Bytes one rank sends per step, by what sends them. A ring all_sum of n floats sends
    2·(N-1)/N·4n bytes from each rank (reduce-scatter, then all-gather); with expert parallel,
    each MoE layer exchanges its expert buffers (E, G·C+1, D) four times a step (forward and
    back, in the forward and the backward pass): expert_parallel.exchange_bytes."""
    n = world.size
    replicated = sum(int(np.prod(v.shape)) for k, v in params.items() if not world.sharded(k))
    out = {"all_sum": 2 * (n - 1) / n * 4 * (replicated + 1)}
    if world.expert_parallel:
        from moe_min.models.expert_parallel import exchange_bytes

        out["experts"] = exchange_bytes(config, local_batch, n)
    return out


def tcp_bytes_sent() -> int | None:
    """Payload bytes sent so far on this process's TCP sockets (Linux TCP_INFO's
    tcpi_bytes_sent, at byte 200 of struct tcp_info since Linux 4.19); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as sock:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:  # gone, or not a TCP socket
            continue
        if len(info) >= 208:
            total += struct.unpack_from("Q", info, 200)[0]
    return total


class Traffic:
    """Wraps a run's on_step: the bytes this rank sent during each step, and at the end one
    line comparing their median (startup and checkpoint gathers left out) with the analytic
    figures of World.check."""

    def __init__(self, world: World, on_step, log):
        self.world, self.on_step, self.log = world, on_step, log
        self.last, self.per_step = tcp_bytes_sent(), []

    def __call__(self, done: int, total: int, record: dict):
        now = tcp_bytes_sent()
        if now is not None and self.last is not None:
            self.per_step.append(now - self.last)
        self.last = now
        self.on_step(done, total, record)
        if done == total:
            self.log(self.summary())

    def summary(self) -> str:
        analytic = self.world.analytic
        parts = " + ".join(f"{name} {b / 1e6:.4g}" for name, b in analytic.items())
        measured = (f"{np.median(self.per_step) / 1e6:.4g} MB measured (TCP payload, median "
                    f"of {len(self.per_step)} steps)") if self.per_step else "not measured here"
        return (f"{self.world.size} ranks: bytes sent per rank per step {measured}; analytic "
                f"{sum(analytic.values()) / 1e6:.4g} MB ({parts})")


# ---- launching the ranks -------------------------------------------------------------------

def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv less the given options and their values (`--ranks 2`, `--ranks=2`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            out.append(arg)
    return out


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(argv: list[str], ranks: int, hostfile: str | None, expert_parallel: bool) -> int:
    """Run `moe-min <argv>` as `ranks` processes here, or on the machines of `hostfile`
    through mlx.launch; each rank joins with --distributed. Returns the exit status: the
    first failing rank's, else 0."""
    if hostfile and ranks > 1:
        raise ValueError(f"--ranks {ranks} and --hostfile {hostfile}: give one of them (a "
                         "hostfile lists the ranks)")
    if ranks == 1 and not hostfile:
        raise ValueError("--expert-parallel shards experts over ranks: add --ranks N (N >= 2) "
                         "or --hostfile FILE" if expert_parallel else "one rank: nothing to launch")
    command = [sys.executable, "-c", CHILD, *_without(argv, ("--ranks", "--hostfile")),
               "--distributed"]
    if hostfile:
        return _mlx_launch(hostfile, command)
    return run_local(ranks, command)


def run_local(ranks: int, command: list[str]) -> int:
    """The ring backend on loopback, set up as mlx.launch does it (MLX_HOSTFILE, MLX_RANK),
    without its relay: rank 0 keeps the terminal (the progress bar needs one), the others
    print only if they fail, and a failure is the exit status (mlx.launch 0.32 exits 0)."""
    with tempfile.TemporaryDirectory(prefix="moe-min-ranks-") as tmp:
        hosts = Path(tmp) / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in _free_ports(ranks)]))
        env = {**os.environ, "MLX_HOSTFILE": str(hosts)}
        # N processes share this machine's cores: OpenBLAS would start all of them in each
        env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
        procs, logs = [], []
        for rank in range(ranks):
            logs.append(None if rank == 0 else open(Path(tmp) / f"rank{rank}.err", "w+"))
            procs.append(subprocess.Popen(command, env={**env, "MLX_RANK": str(rank)},
                                          stdout=subprocess.DEVNULL if rank else None,
                                          stderr=logs[-1]))
        status = _wait(procs)
        for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
            if log is not None:
                log.seek(0)
                text = log.read()
                log.close()
                if proc.returncode not in (0, -15) and procs[0].returncode in (0, -15):
                    sys.stderr.write(f"rank {rank}: {text}")
        return status


def _wait(procs: list, grace: float = 3.0) -> int:
    """Wait for every rank; the first to fail stops the others after `grace` seconds (they
    would wait forever at the next collective; rank 0 may be saying why). Ctrl-C stops them
    all."""
    failed_at = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            failed_at = failed_at or (time.monotonic() if failed else None)
            if None not in codes or (failed and time.monotonic() - failed_at > grace):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        failed = [130]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return failed[0] if failed else 0


def _mlx_launch(hostfile: str, command: list[str]) -> int:
    """mlx.launch with the hostfile (ssh to each host, the backend the file names, ring by
    default); it exits 0 when a rank fails, so its warnings are read to find out."""
    if not Path(hostfile).is_file():
        raise ValueError(f"--hostfile {hostfile}: no such file")
    launcher = Path(sys.executable).with_name("mlx.launch")
    launcher = str(launcher) if launcher.exists() else shutil.which("mlx.launch")
    if launcher is None:
        raise ValueError("mlx.launch not found next to this Python or on PATH: pip install mlx")
    proc = subprocess.Popen([launcher, "--hostfile", hostfile, "--python", command[0], "--",
                             *command[1:]], stderr=subprocess.PIPE, text=True)
    failed = False
    for line in proc.stderr:
        sys.stderr.write(line)
        failed |= "Node with rank" in line and ("exited with code" in line or "killed" in line)
    return proc.wait() or int(failed)
