"""An asynchronous parameter server on ``torch.distributed`` (c10d process groups).

Rank 0 is the server: it owns the model and the optimizer. Every other rank is a worker that
loops: compute a gradient from the parameters it holds, push ``(gradients, version)`` and receive
the parameters as they are right after the gradient was applied, with their version. The server
applies each gradient as it arrives, with ``optimizer.step(staleness=version_now - version)``
when the optimizer is an :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` (any other
optimizer gets a plain ``step()``; staleness is measured and reported all the same).

Workers reach the server through :mod:`asyncmomentum.runtimes.transport` (one small interface;
by default a two-rank gloo process group per worker connection, ``ServerConfig(transport="rpc")``
for ``torch.distributed.rpc``). A push carries one flat gradient tensor and a reply
one flat tensor of all parameters, which the server holds as views of one buffer: per-message
overhead, not bytes, is what bounds a server of a small model.

Push and pull are one round trip, and the version a worker reads is the one right after its own
update. In the long run the mean staleness is then exactly ``M - 1`` for ``M`` workers whatever
their speeds (each worker sees the updates of the others during one of its cycles), which is what
the estimator of ``M`` assumes.

Fault tolerance. Every process's link ends on its own (no barrier over every rank, which never
completes once a worker is dead), and the end of the job is agreed on explicitly:

* the server stops on the first of: ``total_updates`` applied, ``max_seconds`` elapsed, or no
  worker left; gradients that arrive after that are answered with "stop" and not applied;
* a worker that is not heard from for ``worker_timeout`` seconds is dropped: its later gradients
  are refused, and the server stops waiting for it; a worker whose connection breaks (its
  process ended) is dropped at once;
* a leaving worker says so; the server ends only once every worker still alive has left (or
  timed out), so no reply is cut off mid-flight (:mod:`.links`).

Launch it with ``torchrun`` (rank 0 is the server) or with the usual environment variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) through :func:`run_from_env`, or as
one local job of spawned processes on 127.0.0.1 with :func:`launch_local`. Note that torchrun's
agent ends every process of its group as soon as one of them dies (torch's policy, not this
module's): to keep training through dead workers, start the processes without torchrun (by hand,
by a cluster scheduler, or with :func:`launch_local`). A stalled worker is dropped either way.

The package, one job per module: :mod:`.config` (what a job trains, how the server runs, what
they report), :mod:`.state` (:class:`ParameterServer`, the rules, callable in-process),
:mod:`.checkpoints`, :mod:`.links` (rendezvous and the end of a job, per transport),
:mod:`.processes` (the server's and a worker's process) and :mod:`.launch`
(:func:`launch_local`). Every public name is importable from here.

Example::

    job = ParameterServerJob(model_fn=make_model, optimizer_fn=make_optimizer,
                             batches_fn=make_batches)      # top-level functions: picklable
    result = launch_local(job, workers=3, config=ServerConfig(total_updates=500))
    print(result.server.estimated_workers, result.server.algorithmic_momentum)
"""

from asyncmomentum.runtimes.server.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointInfo,
    load_checkpoint,
)
from asyncmomentum.runtimes.server.config import (
    ParameterServerJob,
    ServerConfig,
    ServerResult,
    TracePoint,
    WorkerResult,
)
from asyncmomentum.runtimes.server.launch import LocalJobResult, WorkerOutcome, launch_local
from asyncmomentum.runtimes.server.processes import (
    request_checkpoint,
    run_from_env,
    run_server,
    run_worker,
)
from asyncmomentum.runtimes.server.state import ParameterServer
from asyncmomentum.runtimes.transport import (
    SECRET_ENV,
    SERVER_NAME,
    Reply,
    worker_name,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "SECRET_ENV",
    "SERVER_NAME",
    "CheckpointInfo",
    "LocalJobResult",
    "ParameterServer",
    "ParameterServerJob",
    "Reply",
    "ServerConfig",
    "ServerResult",
    "TracePoint",
    "WorkerOutcome",
    "WorkerResult",
    "launch_local",
    "load_checkpoint",
    "request_checkpoint",
    "run_from_env",
    "run_server",
    "run_worker",
    "worker_name",
]
