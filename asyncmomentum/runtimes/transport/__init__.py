"""The link between workers and a :class:`~asyncmomentum.runtimes.server.ParameterServer`.

Everything that knows how a worker reaches the server lives here, behind one small interface
(:class:`Transport`), so that the server's rules and the code that drives workers do not change
with the engine:

* :mod:`.base`: the interface, the reply, flat buffers, the job's secret, and
  :class:`LocalTransport` (a server of this process, called directly);
* :mod:`.c10d`: the default, on ``torch.distributed`` process groups (one two-rank gloo pair
  per worker connection; nccl for CUDA payloads): :class:`C10dTransport` and :class:`C10dHost`;
* :mod:`.rpc`: ``torch.distributed.rpc`` (TensorPipe), kept as an option and as the baseline
  of the benchmarks: :class:`RpcTransport`, :func:`init_rpc`, :func:`serving`,
  :func:`shutdown_rpc`;
* :mod:`.rendezvous`: the job's store, listening on the chosen interface only.
"""

from asyncmomentum.runtimes.transport.base import (
    SECRET_ENV,
    LocalTransport,
    Reply,
    Servable,
    Transport,
    check_flat,
    check_secret,
    flatten,
    job_secret,
    load_flat,
    new_secret,
)
from asyncmomentum.runtimes.transport.c10d import (
    C10dHost,
    C10dTransport,
    active_transport,
)
from asyncmomentum.runtimes.transport.rendezvous import (
    connect_store,
    host_store,
    local_address_toward,
)
from asyncmomentum.runtimes.transport.rpc import (
    INLINE_MAX_BYTES,
    SERVER_NAME,
    RpcTransport,
    init_rpc,
    rpc_joined,
    serving,
    shutdown_rpc,
    worker_name,
)

#: The transports a job can run on; the first is the default.
TRANSPORTS = ("c10d", "rpc")

__all__ = [
    "INLINE_MAX_BYTES",
    "SECRET_ENV",
    "SERVER_NAME",
    "TRANSPORTS",
    "C10dHost",
    "C10dTransport",
    "LocalTransport",
    "Reply",
    "RpcTransport",
    "Servable",
    "Transport",
    "active_transport",
    "check_flat",
    "check_secret",
    "connect_store",
    "flatten",
    "host_store",
    "init_rpc",
    "job_secret",
    "load_flat",
    "local_address_toward",
    "new_secret",
    "rpc_joined",
    "serving",
    "shutdown_rpc",
    "worker_name",
]
