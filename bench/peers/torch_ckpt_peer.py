#!/usr/bin/env python3
"""PyTorch checkpointing on the same optimizer-shaped state as `lazarus-bench ckpt`.

The state is three flat f32 arrays (params, adam_m, adam_v) of equal length, as the ckpt suite
uses for a size. Measured, each once cold and then `--reps` times (medians reported):

  torch_save      one process saves the whole state to one file with torch.save; blocking is
                  the call, durable adds fsync of the file and of its directory.
  dcp_save        torch.distributed.checkpoint.save from `--ranks` gloo ranks (processes), each
                  holding its 1/N slice of every array as a DTensor sharded on dim 0; it is
                  synchronous, so blocking is the call; durable adds fsync of the rank's files
                  and (rank 0) of the metadata file and the directory.
  dcp_async_save  torch.distributed.checkpoint.async_save: blocking until it returns the future,
                  durable until the future's result plus the same fsyncs.
  dcp_load        torch.distributed.checkpoint.load of the last dcp_save into preallocated
                  DTensors of the same sharding, after dropping the page cache where allowed.

Times of the DCP rows are the slowest rank's, measured from a barrier. One JSON object goes to
stdout; everything else goes to stderr.

Usage: torch_ckpt_peer.py (--elems-per-array N | --state-bytes B) --ranks N --dir DIR [--reps R]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time

ARRAYS = ("params", "adam_m", "adam_v")
BYTES_PER_ELEM = 4
# Scales of the synthetic arrays: weights ~ N(0, 0.02), first moments ~ N(0, 1e-3), second
# moments the squares of such values (AdamW state looks like this).
SCALE_PARAMS = 0.02
SCALE_M = 1e-3


def log(msg):
    print(f"torch peer: {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--elems-per-array", type=int, help="elements in each of the three arrays")
    size.add_argument(
        "--state-bytes",
        type=int,
        help="bytes of the three f32 arrays together (elements per array = bytes // 12)",
    )
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks for the DCP measurements")
    p.add_argument("--dir", required=True, help="scratch directory on the disk to measure")
    p.add_argument("--reps", type=int, default=1, help="measured repetitions after a cold one")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.elems_per_array is None:
        args.elems_per_array = args.state_bytes // (BYTES_PER_ELEM * len(ARRAYS))
    if args.elems_per_array <= 0 or args.ranks <= 0 or args.reps <= 0:
        p.error("elements per array, --ranks and --reps must be positive")
    if args.ranks > args.elems_per_array:
        p.error("more ranks than elements per array")
    return args


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_page_cache():
    """Writes back dirty pages and drops the clean ones; False without the right to."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def synth_arrays(torch, n, seed, which_rank):
    """The three arrays of `n` elements, seeded by (seed, rank) so each rank differs."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + which_rank)
    params = torch.randn(n, generator=g) * SCALE_PARAMS
    m = torch.randn(n, generator=g) * SCALE_M
    v = (torch.randn(n, generator=g) * SCALE_M) ** 2
    return dict(zip(ARRAYS, (params, m, v)))


def chunk_range(n, world, rank):
    """Elements of rank `rank` under DTensor's Shard(0), which follows torch.chunk."""
    c = -(-n // world)
    return min(rank * c, n), min((rank + 1) * c, n)


def summary(cold, samples):
    """Cold sample and medians of the measured ones, in ms."""
    out = {f"cold_{k}": v for k, v in cold.items()}
    for k in samples[0]:
        out[k] = statistics.median(s[k] for s in samples)
    out["samples"] = samples
    return out


def measure_torch_save(torch, args, root):
    state = synth_arrays(torch, args.elems_per_array, args.seed, 0)
    runs = []
    for rep in range(args.reps + 1):
        d = os.path.join(root, f"torch-save-{rep}")
        os.makedirs(d)
        path = os.path.join(d, "state.pt")
        os.sync()
        t0 = time.perf_counter()
        torch.save(state, path)
        blocking = time.perf_counter() - t0
        fsync_path(path)
        fsync_path(d)
        durable = time.perf_counter() - t0
        shutil.rmtree(d)
        runs.append({"blocking_ms": blocking * 1e3, "durable_ms": durable * 1e3})
    return summary(runs[0], runs[1:])


def fsync_rank_files(d, rank):
    """fsync of the files this rank wrote (`__<rank>_*.distcp`), and on rank 0 of the rest."""
    for name in os.listdir(d):
        mine = name.startswith(f"__{rank}_")
        other_rank = name.startswith("__") and not mine
        if mine or (rank == 0 and not other_rank):
            fsync_path(os.path.join(d, name))
    if rank == 0:
        fsync_path(d)


def slowest(torch, dist, values):
    """Elementwise maximum over ranks of a list of floats."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def dcp_state(torch, args, rank, world, mesh, fill):
    from torch.distributed.tensor import DTensor, Shard

    n = args.elems_per_array
    lo, hi = chunk_range(n, world, rank)
    if fill:
        local = synth_arrays(torch, hi - lo, args.seed, rank + 1)
    else:
        local = {k: torch.full((hi - lo,), float("nan")) for k in ARRAYS}
    return {
        k: DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=(n,), stride=(1,))
        for k, t in local.items()
    }


def wait_future(resp):
    """Waits for an async_save result, whichever of its return types this torch gives."""
    upload = getattr(resp, "upload_completion", None)
    (upload if upload is not None else resp).result()


def dcp_save_once(torch, dist, dcp, state, d, rank, use_async):
    if rank == 0:
        os.sync()
    dist.barrier()
    t0 = time.perf_counter()
    if use_async:
        resp = dcp.async_save(state, checkpoint_id=d)
        blocking = time.perf_counter() - t0
        wait_future(resp)
    else:
        dcp.save(state, checkpoint_id=d)
        blocking = time.perf_counter() - t0
    fsync_rank_files(d, rank)
    durable = time.perf_counter() - t0
    blocking, durable = slowest(torch, dist, [blocking, durable])
    return {"blocking_ms": blocking * 1e3, "durable_ms": durable * 1e3}


def dcp_load_once(torch, dist, dcp, args, rank, world, mesh, d, expect):
    out = dcp_state(torch, args, rank, world, mesh, fill=False)
    cold = drop_page_cache() if rank == 0 else True
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(out, checkpoint_id=d)
    (elapsed,) = slowest(torch, dist, [time.perf_counter() - t0])
    for k in ARRAYS:
        if not torch.equal(out[k].to_local(), expect[k].to_local()):
            raise RuntimeError(f"DCP load of `{k}` on rank {rank} returned different values")
    cold_all = slowest(torch, dist, [0.0 if cold else 1.0])[0] == 0.0
    return {"ms": elapsed * 1e3}, cold_all


def remove_dir(dist, rank, d):
    dist.barrier()
    if rank == 0:
        shutil.rmtree(d)
    dist.barrier()


def dcp_worker(rank, world, args, root, port, queue):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        state = dcp_state(torch, args, rank, world, mesh, fill=True)
        result = {}
        for key, use_async in (("dcp_save", False), ("dcp_async_save", True)):
            runs = []
            for rep in range(args.reps + 1):
                d = os.path.join(root, f"{key}-{rep}")
                runs.append(dcp_save_once(torch, dist, dcp, state, d, rank, use_async))
                keep = key == "dcp_save" and rep == args.reps
                if not keep:
                    remove_dir(dist, rank, d)
            result[key] = summary(runs[0], runs[1:])
        d = os.path.join(root, f"dcp_save-{args.reps}")
        loads, cold = [], True
        for _ in range(args.reps + 1):
            sample, c = dcp_load_once(torch, dist, dcp, args, rank, world, mesh, d, state)
            loads.append(sample)
            cold = cold and c
        remove_dir(dist, rank, d)
        result["dcp_load"] = summary(loads[0], loads[1:])
        result["dcp_load"]["cold_cache"] = cold
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv):
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch
    import torch.multiprocessing as mp

    root = os.path.join(args.dir, f"torch-peer-{os.getpid()}")
    os.makedirs(root)
    try:
        log(f"torch.save of {args.elems_per_array} elements per array")
        torch_save = measure_torch_save(torch, args, root)
        log(f"DCP save, async_save and load on {args.ranks} gloo ranks")
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.spawn(
            dcp_worker,
            args=(args.ranks, args, root, free_port(), queue),
            nprocs=args.ranks,
            join=True,
        )
        dcp_result = queue.get()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = args.elems_per_array
    report = {
        "peer": "pytorch",
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "ranks": args.ranks,
        "elems_per_array": n,
        "state_bytes": n * BYTES_PER_ELEM * len(ARRAYS),
        "reps": args.reps,
        "torch_save_measures": "one process, the whole state, one file",
        "dcp_measures": (
            f"{args.ranks} gloo ranks (processes), each its 1/{args.ranks} of every array as a "
            "DTensor Shard(0); FileSystemWriter defaults (one file per rank, sync_files=True); "
            "times of the slowest rank"
        ),
        "torch_save": torch_save,
        **dcp_result,
        "runtime_s": time.perf_counter() - t_start,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
