"""The MPI session of a rank: rank and size from mpi4py, then torch.distributed groups over a rendezvous shared by MPI."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from llmapi.distributed.mapping import Mapping

logger = logging.getLogger(__name__)

# The control group waits between steps for as long as the LLM stays idle; a dead peer still breaks
# its sockets at once, so only a hung (not dead) peer would wait this long.
CONTROL_TIMEOUT = datetime.timedelta(days=30)
MASTER_ADDR_ENV = "LLMAPI_MASTER_ADDR"

_current: Optional["Session"] = None


def current() -> Optional["Session"]:
    """The session of this process when it is rank 0 of a launched job (llmapi-launch), else None."""
    return _current


def set_current(session: Optional["Session"]) -> None:
    global _current
    _current = session


def _master_addr() -> str:
    """Where rank 0's rendezvous store listens: $LLMAPI_MASTER_ADDR, $MASTER_ADDR, else this host's address."""
    addr = os.environ.get(MASTER_ADDR_ENV) or os.environ.get("MASTER_ADDR")
    if addr:
        return addr
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    if addr.startswith("127."):
        # Some hosts map their name to loopback; other nodes need the address of the outbound interface
        # (a UDP "connect" only picks the route, it sends nothing).
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("10.255.255.255", 1))
                addr = s.getsockname()[0]
        except OSError:
            pass
    return addr


class Session:
    """One rank of the MPI job: COMM_WORLD rank/size, the local rank on this host, and torch.distributed.

    Groups: `control` (gloo, every rank) carries rank 0's calls, `tokens` (gloo) the sampled tokens of the
    last stage, `feed` (the default backends) the sampled ids the first stage embeds next; the default group
    (gloo on CPU, NCCL for CUDA tensors) carries activations between stages; `tp_group` is this rank's
    stage. Groups depend on the mapping, so they are made when an LLM starts (`configure`).
    """

    broken: str = ""
    """Why the job's ranks can no longer be driven (a step the watchdog gave up on); the launcher then aborts
    the MPI job instead of telling the ranks to exit."""

    def __init__(self):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        self.pids = comm.gather(os.getpid(), root=0)  # rank 0: every rank's pid
        store = None
        if self.rank == 0:
            # Port 0: the store picks a free port itself, so there is no window for another process to take it.
            store = dist.TCPStore(_master_addr(), 0, self.world_size, is_master=True,
                                  timeout=datetime.timedelta(seconds=300), wait_for_workers=False)
            address = (store.host, store.port)
        else:
            address = None
        host, port = comm.bcast(address, root=0)
        if store is None:
            store = dist.TCPStore(host, port, self.world_size, is_master=False,
                                  timeout=datetime.timedelta(seconds=300))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.tokens = dist.new_group(backend="gloo")  # sampled tokens, last stage -> rank 0
        # Sampled ids on the device, sampling rank -> first stage (async scheduling's placeholders): a group of
        # its own, so that these small messages never queue behind the stages' activations.
        self.feed = dist.new_group()
        self.mapping: Optional[Mapping] = None
        self.tp_group = None
        self.shutdown_hooks = []  # launched mode: shut the script's LLMs down before the ranks exit
        logger.debug("rank %d of %d (local rank %d) joined the job", self.rank, self.world_size, self.local_rank)

    def configure(self, mapping: Mapping) -> None:
        """Make the TP groups of `mapping` (every rank calls this with the same mapping)."""
        if mapping.world_size != self.world_size:
            raise ValueError(f"tensor_parallel_size * pipeline_parallel_size = {mapping.world_size}, but the MPI "
                             f"job has {self.world_size} ranks")
        if self.mapping == mapping.for_rank(self.rank):
            return
        self.mapping = mapping.for_rank(self.rank)
        groups = [dist.new_group(mapping.stage_ranks(s)) for s in range(mapping.pp_size)]
        self.tp_group = groups[self.mapping.pp_rank]

    def device(self, device_type: str) -> torch.device:
        """This rank's device: its local GPU, or the CPU."""
        if device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
