"""AsyncParameterServerStrategy: asynchronous training of any LightningModule over a server.

Every training process is a worker: it computes a gradient on its own batches, and its compute
group (:mod:`lightning_callbacks.compute_groups`) averages it and pushes it, tagged with the
parameter version it was computed from, to one
:class:`~asyncmomentum.runtimes.server.ParameterServer`; the reply carries the parameters right
after the update and their version. The server lives in rank 0, in threads of that process
(its wait loop, and one thread per connection of another group); it applies each update with
the optimizer of ``configure_optimizers`` and measures the exact staleness, so an
:class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` (or any torch optimizer driven by
:class:`~lightning_callbacks.AsyncMomentumCallback`) tunes its momentum to the asynchrony.

Processes start as Lightning's DDP starts them (its launcher for ``devices=N`` on one machine,
``torchrun``, SLURM or the usual environment variables across machines): this strategy is a
:class:`~pytorch_lightning.strategies.DDPStrategy` that does not wrap the model and replaces the
optimizer step. The link to the server is a :class:`~asyncmomentum.runtimes.transport.Transport`
(a two-rank ``torch.distributed`` process group to rank 0 for the leader of each group 1..G-1,
:class:`~asyncmomentum.runtimes.transport.C10dTransport`; a direct call for group 0).

Local SGD (the DiLoCo family): with ``sync_every=H`` and ``outer_optimizer=fn``, the optimizer of
``configure_optimizers`` is each group's *inner* optimizer and steps for real (on the gradient
averaged inside the group); every ``H`` inner steps the group pushes the pseudo-gradient
``params_read - params_now`` tagged with the version it read, and the server applies it with
``fn(server_params)``, the *outer* optimizer, with the exact staleness in outer updates.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import threading
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, cast

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.nn.utils import vector_to_parameters
from torch.optim import Optimizer
from typing_extensions import override

from asyncmomentum.core.validation import check_int, check_positive
from asyncmomentum.runtimes.batch_size import batch_size_of
from asyncmomentum.runtimes.local_sgd import check_outer_optimizer, check_sync_every
from asyncmomentum.runtimes.server import ParameterServer, ServerConfig, ServerResult, TracePoint
from asyncmomentum.runtimes.transport import (
    C10dHost,
    C10dTransport,
    LocalTransport,
    Transport,
    check_flat,
    connect_store,
    flatten,
    host_store,
    job_secret,
    load_flat,
    local_address_toward,
)
from lightning_callbacks.compute_groups import ComputeGroups, GroupReply

__all__ = ["AsyncParameterServerStrategy"]

# Without max_steps the workers end by epochs and the server stops once every group has left;
# the server still needs a time limit (it must end even if every worker dies): a year.
_NO_TIME_LIMIT_S = 365 * 24 * 3600.0

# Applied updates between two points of the server's trace (kept for the run's result).
_TRACE_EVERY = 50

# Lightning's advice to log epoch metrics with sync_dist=True (see _quiet_sync_dist_advice).
_SYNC_DIST_ADVICE = r"It is recommended to use `self\.log\(.*sync_dist=True\)`"

#: The checkpoint's key for what local SGD adds (the outer optimizer, with its tracker).
LOCAL_SGD_KEY = "async_parameter_server/local_sgd"


def _destroy_process_groups() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _destroy_process_groups_at_exit() -> None:
    """Have every process group destroyed at the process's exit (once, however many fits)."""
    atexit.unregister(_destroy_process_groups)  # a registration of an earlier fit
    atexit.register(_destroy_process_groups)


class AsyncParameterServerStrategy(DDPStrategy):
    """Asynchronous data-parallel training through a parameter server in rank 0.

    ``groups=G`` splits the ``N`` processes (``devices x num_nodes``) into ``G`` compute groups of
    consecutive ranks: synchronous inside a group (a gradient all-reduce over a
    ``torch.distributed`` subgroup, gloo on CPU, nccl on GPU), asynchronous across groups. The
    server sees ``G`` workers: ``groups=1`` is synchronous data-parallel training through the
    server, ``groups=N`` (the default) is fully asynchronous.

    What Lightning does as usual: ``max_steps`` counts the updates the server applied
    (``trainer.global_step`` is the server's version a process last read); validation during
    ``fit`` runs in rank 0 on the server's current parameters over the whole validation set
    (the other processes skip it, so no process waits for another); checkpoints hold the
    server's model and optimizer (tuner included) and ``ckpt_path=`` resumes them;
    ``trainer.validate``/``trainer.test`` after ``fit`` run on the final server parameters
    (rank 0's, shared with every process at their start).

    Differences from DDP, because groups do not wait for each other during ``fit``:
    ``self.log(..., sync_dist=True)``, ``barrier`` and ``broadcast`` act on the calling process
    only (a collective over all processes would make every group wait for the slowest, and
    hang on a dead one); only rank 0 logs and checkpoints. Learning-rate schedulers step the
    optimizer Lightning holds, not the server's: they are refused.

    Faults: a group not heard from for ``worker_timeout`` seconds is dropped by the server and
    the others finish. A process that dies takes its group with it (the group's collectives
    fail after ``worker_timeout``). Lightning's own launcher, and ``torchrun``, end every process
    when one dies: resume from the last checkpoint with ``ckpt_path=``; processes started by
    hand or by a scheduler (``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` set) keep going.

    Local SGD (``sync_every=H``, ``outer_optimizer=fn``): each group takes ``H`` steps of the
    optimizer of ``configure_optimizers`` (its *inner* optimizer, e.g. AdamW; synchronous inside
    the group as above; learning-rate schedulers step it and are allowed), then pushes the
    pseudo-gradient; ``fn(params)`` builds the server's *outer* optimizer over the server's
    parameters (e.g. ``lambda p: AsyncMomentumSGD(p, lr=0.7, momentum=0.9, nesterov=True)``,
    DiLoCo's outer step, which then tunes its momentum to the staleness of the pushes).
    ``max_steps`` and ``trainer.global_step`` count a process's *inner* steps; the server stops
    once every group has left (a last round shorter than ``H`` is not pushed). Checkpoints hold
    the server's model, the inner optimizer of rank 0 under ``optimizer_states``, and the outer
    optimizer (tracker included) under :data:`LOCAL_SGD_KEY`; ``ckpt_path=`` resumes both.
    :class:`~lightning_callbacks.AsyncMomentumCallback` reads (and, for a torch optimizer,
    tunes) the outer optimizer.

    Args:
        groups: number of compute groups ``G``, in ``1 .. N``; ``None``: ``N`` (every process
            its own group).
        sync_every: local SGD: inner steps of a group between two pushes (``>= 1``); ``None``
            (the default): one gradient per push, as described above.
        outer_optimizer: local SGD: ``fn(params)`` builds the outer optimizer over the server's
            parameters (all of them); needed with ``sync_every``.
        worker_timeout: seconds after which the server drops a silent group (and a group's
            collectives give up on a silent member).
        rpc_timeout: seconds each call to the server may take.
        start_method: how Lightning starts the processes on one machine, as for
            :class:`~pytorch_lightning.strategies.DDPStrategy` (``"popen"`` re-runs the script;
            ``"spawn"``/``"fork"`` start them from this process).
        **kwargs: passed to :class:`~pytorch_lightning.strategies.DDPStrategy` (``accelerator``,
            ``cluster_environment``, ``process_group_backend``, ``timeout``, ...).

    Raises:
        ValueError: for a bad argument; at the start of ``fit``, for a module with manual
            optimization, several optimizers or learning-rate schedulers, or ``groups`` above
            the number of processes.
    """

    strategy_name = "async_parameter_server"

    def __init__(
        self,
        groups: int | None = None,
        *,
        sync_every: int | None = None,
        outer_optimizer: Callable[[list[torch.nn.Parameter]], Optimizer] | None = None,
        worker_timeout: float = 60.0,
        rpc_timeout: float = 120.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        if groups is not None:
            check_int(groups, "groups (number of compute groups)", 1)
        check_positive(worker_timeout, "worker_timeout")
        check_positive(rpc_timeout, "rpc_timeout")
        if sync_every is not None:
            check_sync_every(sync_every)
            if not callable(outer_optimizer):
                raise ValueError(
                    "local SGD (sync_every set) needs outer_optimizer=fn, where fn(params) builds "
                    "the server's outer optimizer, e.g. lambda p: AsyncMomentumSGD(p, lr=0.7, "
                    f"momentum=0.9, nesterov=True); got {outer_optimizer!r}"
                )
        elif outer_optimizer is not None:
            raise ValueError(
                "outer_optimizer is for local SGD: give sync_every (inner steps between pushes)"
            )
        super().__init__(start_method=start_method, **kwargs)
        self.groups = groups
        self.sync_every = sync_every
        self.outer_optimizer = outer_optimizer
        self._inner_steps = 0  # inner steps since the last push (local SGD)
        self._batch_samples = 0  # this process's samples since the last push
        self._read: Tensor | None = None  # the flat parameters read (local SGD)
        self._outer_snapshot: dict[str, Any] | None = None
        self.worker_timeout = float(worker_timeout)
        self.rpc_timeout = float(rpc_timeout)
        self._layout: ComputeGroups | None = None
        self._served_model: torch.nn.Module | None = None
        self._served_optimizers: list[Optimizer] = []
        self._server: ParameterServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._store: torch.distributed.TCPStore | None = None
        self._host: C10dHost | None = None
        self._transport: Transport | None = None
        self._sync_dist_filter: Any = None
        self._secret = ""
        self._version = 0
        self._offset = 0
        self._stopped = False
        self._asynchronous = False
        self._listeners: list[Callable[[int, int], None]] = []
        self._snapshot: dict[str, Any] | None = None
        self._wrapped: Optimizer | None = None
        self._worker_params: Tensor | None = None
        self._numel = 0
        #: What the server did, in rank 0 once ``fit`` has ended.
        self.server_result: ServerResult | None = None
        self._allowed_empty: bool | None = None

    # -- what the callback reads (lightning_callbacks.roles.ServedUpdates) --------------------

    @property
    def served_optimizers(self) -> list[Optimizer]:
        """The server's optimizers, in rank 0 (empty elsewhere)."""
        return list(self._served_optimizers)

    @property
    def updates_per_second(self) -> float:
        """Updates the server applied per second so far (rank 0; 0 elsewhere)."""
        server = self._server
        if server is None:
            return 0.0
        result = server.result()
        return result.updates_per_second

    @property
    def _module(self) -> pl.LightningModule:
        module = self.lightning_module
        assert module is not None  # connected by the Trainer before any hook that uses it
        return module

    @property
    def server(self) -> ParameterServer | None:
        """The parameter server, in rank 0 while ``fit`` trains (else ``None``)."""
        return self._server

    @property
    def compute_groups(self) -> ComputeGroups | None:
        """This process's compute group, once ``fit`` has set it up."""
        return self._layout

    def add_update_listener(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(optimizer_index, staleness)`` after every update the server applies.

        Args:
            listener: runs in a server thread, right after the update.
        """
        self._listeners.append(listener)

    # -- set-up -------------------------------------------------------------------------------

    @override
    def setup_distributed(self) -> None:
        """Set up as DDP does; the process groups are then destroyed when the process exits.

        Lightning destroys them at exit for nccl only. A gloo group left to the interpreter's
        own teardown can abort a process whose work is done ("terminate called without an
        active exception", pytorch/pytorch#179291: gloo's threads still hold work whose tensors
        need the interpreter), so they are destroyed while it is still whole.
        """
        super().setup_distributed()
        _destroy_process_groups_at_exit()

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: gradients are averaged inside a compute group, not over every rank."""

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Set up as DDP does; for ``fit``, also the groups and the server's copies.

        Args:
            trainer: the trainer.
        """
        # Collectives over every process work again until the groups start (fit) or for good
        # (validate, test: every process runs them together).
        self._asynchronous = False
        self._batch_samples = 0
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._quiet_sync_dist_advice()
            self._setup_fit(trainer)

    def _quiet_sync_dist_advice(self) -> None:
        """Silence Lightning's advice to log with ``sync_dist=True``, for ``fit`` only.

        During ``fit`` only rank 0 validates, on the server's parameters and the whole
        validation set: its epoch metrics are already the job's, and a sync would make every
        group wait for the others. The filter is removed in ``teardown`` (``validate`` and
        ``test`` after ``fit`` run on every process, where the advice applies).
        """
        warnings.filterwarnings("ignore", message=_SYNC_DIST_ADVICE, category=PossibleUserWarning)
        self._sync_dist_filter = warnings.filters[0]

    def _setup_fit(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        if not module.automatic_optimization:
            raise ValueError(
                "AsyncParameterServerStrategy trains with automatic optimization only: the "
                "server applies one gradient per step of the one optimizer"
            )
        if self._layer_sync is not None:
            raise ValueError(
                "AsyncParameterServerStrategy cannot synchronize batch norm over every process "
                "(Trainer(sync_batchnorm=True)): groups do not wait for each other"
            )
        if len(self.optimizers) != 1 or (self.lr_scheduler_configs and self.sync_every is None):
            raise ValueError(
                "AsyncParameterServerStrategy needs configure_optimizers to return exactly one "
                f"optimizer and no learning-rate scheduler (found {len(self.optimizers)} "
                f"optimizer(s), {len(self.lr_scheduler_configs)} scheduler(s)): the server "
                "steps its own copy of the optimizer, which Lightning's schedulers never see"
            )
        groups = self.world_size if self.groups is None else self.groups
        if groups > self.world_size:
            raise ValueError(
                f"groups={groups} but the job has {self.world_size} processes "
                "(devices x num_nodes); use at most one group per process"
            )
        self._layout = ComputeGroups(
            self.global_rank,
            self.world_size,
            groups,
            backend=self._get_process_group_backend(),
            timeout=timedelta(seconds=self.worker_timeout),
        )
        self._numel = sum(p.numel() for p in module.parameters())
        if not self.is_global_zero:
            # Only rank 0 validates during fit: the others' validation loaders are empty.
            self._allowed_empty = module.allow_zero_length_dataloader_with_multiple_devices
            module.allow_zero_length_dataloader_with_multiple_devices = True
        if self.is_global_zero and self.sync_every is not None:
            # Local SGD: the server's model, and the outer optimizer over its parameters.
            assert self.outer_optimizer is not None
            self._served_model = copy.deepcopy(module).cpu()
            served = list(self._served_model.parameters())
            outer = self.outer_optimizer(served)
            check_outer_optimizer(outer, served)
            self._served_optimizers = [outer]
        elif self.is_global_zero:
            # The server's model and optimizer: copies over their own parameters, taken after
            # Lightning restored the module (ckpt_path); the optimizer's state comes later.
            memo: dict[int, Any] = {}
            self._served_model = copy.deepcopy(module, memo).cpu()
            self._served_optimizers = [copy.deepcopy(self.optimizers[0], memo)]
        self._setup_store(groups)
        self._wrap_optimizer(self.optimizers[0])

    def _wrap_optimizer(self, optimizer: Optimizer) -> None:
        """Make ``optimizer.step`` the exchange with the server, once for the whole ``fit``.

        Lightning's precision plugin runs the closure (forward, backward, hooks, clipping) inside
        ``optimizer.step(closure)``; this step runs it, then pushes the gradient and installs the
        server's reply: the optimizer Lightning holds never applies anything. ``teardown`` puts
        the optimizer's own step back. (After the server's copy is taken: that one steps.)

        Args:
            optimizer: the optimizer Lightning steps.
        """

        def exchange(closure: Callable[[], Any] | None = None, **_: Any) -> Any:
            loss = closure() if closure is not None else None
            self._exchange(loss)
            return loss

        inner_step = optimizer.step

        def local_round(closure: Callable[[], Any] | None = None, **_: Any) -> Any:
            loss = closure() if closure is not None else None
            self._inner_step(inner_step, loss)
            return loss

        optimizer.step = exchange if self.sync_every is None else local_round  # type: ignore[method-assign]
        self._wrapped = optimizer

    def _unwrap_optimizer(self) -> None:
        optimizer, self._wrapped = self._wrapped, None
        if optimizer is not None:
            with contextlib.suppress(AttributeError):
                del optimizer.step

    def _setup_store(self, groups: int) -> None:
        """Open the store through which the other groups' leaders connect to rank 0 (``G > 1``).

        Lightning's process group already holds ``MASTER_PORT``: rank 0 hosts a store on a
        fresh port of ``MASTER_ADDR`` only and tells the leaders its port and the job's secret
        over Lightning's process group (the last collective of the job before training).
        """
        assert self._layout is not None
        assert self.cluster_environment is not None
        if groups == 1:
            return
        host = self.cluster_environment.main_address
        message: list[Any] = [0, ""]
        if self.is_global_zero:
            self._store = host_store(host, 0, timeout=self.rpc_timeout)
            # A user's secret (exported to every process) wins; else one per job.
            message = [self._store.port, job_secret(create=True)]
        dist.broadcast_object_list(message, src=0)
        port, self._secret = int(message[0]), str(message[1])
        if self._layout.is_leader and not self.is_global_zero:
            self._store = connect_store(host, port, timeout=self.rpc_timeout)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Load the checkpoint's optimizer state into the server's optimizer (rank 0).

        Args:
            checkpoint: the Lightning checkpoint.
        """
        if self.sync_every is not None:
            # Local SGD: the inner optimizer is Lightning's; the outer one is the server's.
            for optimizer, state in zip(
                self.optimizers, checkpoint["optimizer_states"], strict=True
            ):
                optimizer.load_state_dict(state)
            saved = checkpoint.get(LOCAL_SGD_KEY)
            if self._served_optimizers and saved is not None:
                self._served_optimizers[0].load_state_dict(saved["outer_optimizer"])
            return
        targets = self._served_optimizers or self.optimizers
        for optimizer, state in zip(targets, checkpoint["optimizer_states"], strict=True):
            optimizer.load_state_dict(state)

    # -- the start and the end of training -----------------------------------------------------

    @override
    def on_train_start(self) -> None:
        """Start the server (rank 0); every group then reads the parameters it starts from."""
        super().on_train_start()
        trainer = self._module.trainer
        layout = self._layout
        assert layout is not None
        self._offset = trainer.global_step
        if self.is_global_zero:
            self._start_server(trainer)
        # The last collective over every process: the server is up before any group joins.
        super().barrier("async_parameter_server.start")
        self._asynchronous = True
        if layout.is_leader:
            self._transport = (
                LocalTransport(self._server)
                if self._server is not None  # rank 0 (global zero) started it
                else self._connect(layout.server_rank)
            )
        reply = self._ask(lambda transport: transport.join(layout.server_rank))
        self._install(reply)

    def _start_server(self, trainer: pl.Trainer) -> None:
        assert self._layout is not None
        assert self._served_model is not None
        remaining = None if trainer.max_steps < 0 else max(trainer.max_steps - self._offset, 1)
        if self.sync_every is not None:
            remaining = None  # max_steps counts inner steps: the groups leave by themselves
        config = ServerConfig(
            total_updates=remaining,
            max_seconds=_NO_TIME_LIMIT_S if remaining is None else None,
            worker_timeout=self.worker_timeout,
            rpc_timeout=self.rpc_timeout,
            trace_every=_TRACE_EVERY,
            progress_every=1,
            on_progress=self._after_update,
        )
        server = ParameterServer(
            self._served_model, self._served_optimizers[0], self._layout.count, config
        )
        if self._store is not None:
            # Server rank g + 1 is group g; group 0 is this process (a direct call).
            assert self.cluster_environment is not None
            self._host = C10dHost(
                server,
                self._store,
                range(2, self._layout.count + 1),
                flatten([p.detach() for p in self._served_model.parameters()]),
                address=local_address_toward(self.cluster_environment.main_address),
                join_timeout=self.rpc_timeout,
                worker_timeout=self.worker_timeout,
                reply_timeout=self.rpc_timeout,
            )
            self._host.start()
        self._server = server
        server.start()
        self._serve_thread = threading.Thread(
            target=server.serve, name="asyncmomentum-server", daemon=True
        )
        self._serve_thread.start()

    def _connect(self, server_rank: int) -> C10dTransport:
        """A leader's connection to the server in rank 0, as server rank ``server_rank``."""
        assert self._store is not None
        assert self.cluster_environment is not None
        module = self.lightning_module
        assert module is not None
        like = flatten([p.detach() for p in module.parameters()]).cpu()
        return C10dTransport(
            self._store,
            server_rank,
            like,
            timeout=self.rpc_timeout,
            secret=self._secret,
            server_address=self.cluster_environment.main_address,
        )

    def _after_update(self, point: TracePoint) -> None:
        for listener in self._listeners:
            listener(0, int(point.staleness))  # the server's: one update's, whole

    @override
    def on_train_end(self) -> None:
        """Leave the server; rank 0 waits for the server to stop and takes its parameters."""
        super().on_train_end()
        self._finish()

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Leave the server and close the connections when training fails, so the process can end.

        Args:
            exception: what ended training.
        """
        super().on_exception(exception)
        self._finish(failed=True)

    def _finish(self, failed: bool = False) -> None:
        layout = self._layout
        if layout is None:
            return
        self._layout = None
        try:
            if layout.is_leader and self._transport is not None:
                # Also after the server said stop: it then waits for the goodbye. A server that
                # is gone already needs none.
                with contextlib.suppress(ConnectionError):
                    self._transport.leave(layout.server_rank)
            if self.is_global_zero:
                self._stop_server(layout, failed)
        finally:
            if isinstance(self._transport, C10dTransport):
                self._transport.close()
            self._transport = None
            self._store = None

    def _stop_server(self, layout: ComputeGroups, failed: bool) -> None:
        server, thread = self._server, self._serve_thread
        if server is None or thread is None:
            return
        if not failed:
            thread.join()  # until max_steps, every group left, or the silent ones were dropped
            host = self._host

            def signed_off(rank: int, timeout_s: float) -> bool:
                # Server rank 1 is group 0: this process.
                return rank == 1 or host is None or host.signed_off(rank, timeout_s)

            server.await_departures(signed_off)
        if self._host is not None:
            self._host.close()
            self._host = None
        self.server_result = server.result()
        self._server = None
        self._serve_thread = None
        # The module leaves fit with the server's final parameters (test/validate share them).
        module = self.lightning_module
        assert module is not None
        assert self._served_model is not None
        with torch.no_grad():
            for mine, served in zip(
                module.parameters(), self._served_model.parameters(), strict=True
            ):
                mine.copy_(served)

    @override
    def teardown(self) -> None:
        """Release what ``fit`` opened, then tear down as DDP does."""
        filters = cast(list[Any], warnings.filters)
        if self._sync_dist_filter in filters:
            filters.remove(self._sync_dist_filter)
            warnings._filters_mutated()  # type: ignore[attr-defined]
        self._sync_dist_filter = None
        self._finish(failed=True)
        self._unwrap_optimizer()
        module = self.lightning_module
        if module is not None and self._allowed_empty is not None:
            module.allow_zero_length_dataloader_with_multiple_devices = self._allowed_empty
            self._allowed_empty = None
        super().teardown()

    # -- the step -----------------------------------------------------------------------------

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the closure (forward, backward, hooks, clipping), then push instead of stepping.

        The optimizer's ``step`` is the exchange with the server (set once in ``setup``); once
        the server has stopped, only the closure runs.

        Args:
            optimizer: the optimizer Lightning steps.
            closure: computes the loss and the gradients.
            model: the module.
            **kwargs: passed on to the precision plugin.
        """
        if self._layout is None or self._stopped:
            return closure()
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Lightning's training step; the batch's samples are counted for the next push.

        Args:
            *args: the batch, then its index, as Lightning passes them.
            **kwargs: passed on.
        """
        if args:
            self._batch_samples += batch_size_of(args[0]) or 0
        return super().training_step(*args, **kwargs)

    def _exchange(self, loss: Any) -> None:
        layout = self._layout
        module = self.lightning_module
        assert layout is not None
        assert module is not None
        params = list(module.parameters())
        flat = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        present = tuple(i for i, p in enumerate(params) if p.grad is not None)
        flat = layout.average(flat)
        value = float(loss.detach()) if isinstance(loss, Tensor) else float("nan")
        # The group's gradient averages every member's batch; the sampler gives members batches
        # of one size, so the group's batch is this process's times the group's size.
        samples, self._batch_samples = self._batch_samples, 0
        reply = self._ask(
            lambda transport: transport.push(
                layout.server_rank,
                flat.cpu(),
                self._version,
                value,
                None if len(present) == len(params) else present,
                samples * layout.size or None,
            )
        )
        self._install(reply)
        # Lightning adds this step after it returns: keep global_step = the server's version.
        self._set_global_step(self._offset + self._version - 1)

    def _inner_step(self, inner_step: Callable[[], Any], loss: Any) -> None:
        """Local SGD: one inner step on the group's average gradient; every H, a push."""
        layout = self._layout
        module = self.lightning_module
        assert layout is not None
        assert module is not None
        sync_every = self.sync_every
        assert sync_every is not None
        if layout.size > 1:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if grads:
                load_flat(grads, layout.average(flatten(grads)))  # in place
        inner_step()
        self._inner_steps += 1
        if self._inner_steps < sync_every:
            return
        self._inner_steps = 0
        self._batch_samples = 0  # a pseudo-gradient has no batch of its own
        read = self._read
        assert read is not None
        value = float(loss.detach()) if isinstance(loss, Tensor) else float("nan")

        def push(transport: Transport) -> Any:
            now = flatten([p.detach() for p in module.parameters()])
            delta = (read - now).cpu()
            return transport.push(layout.server_rank, delta, self._version, value)

        self._install(self._ask(push))

    def _ask(self, call: Callable[[Transport], Any]) -> GroupReply:
        """The leader asks the server; every member of the group gets the reply."""
        layout = self._layout
        assert layout is not None
        reply = None
        if layout.is_leader:
            assert self._transport is not None
            answer = call(self._transport)
            reply = GroupReply(answer.params, answer.version, answer.stop)
        like = next(self._module.parameters())
        return layout.share(reply, self._numel, like.detach())

    def _install(self, reply: GroupReply) -> None:
        if reply.stop:
            # The server's final count of updates: global_step ends at max_steps.
            self._version = max(self._version, reply.version)
            self._stopped = True
            self._module.trainer.should_stop = True
            return
        params = list(self._module.parameters())
        flat = reply.params.to(device=params[0].device, dtype=params[0].dtype)
        # Each reply is a fresh tensor: the parameters become views of it (no copy).
        vector_to_parameters(check_flat(flat, params, "the server's parameters"), params)
        self._version = reply.version
        if self.sync_every is not None:
            self._read = flat.detach().clone()  # the inner steps change flat in place

    def _set_global_step(self, value: int) -> None:
        progress = self._module.trainer.fit_loop.epoch_loop.automatic_optimization
        step = progress.optim_progress.optimizer.step
        step.total.completed = value
        step.current.completed = value

    # -- validation and checkpoints on the server's parameters ---------------------------------

    @override
    def on_validation_start(self) -> None:
        """In ``fit``, rank 0 validates the server's current parameters."""
        super().on_validation_start()
        server = self._server
        if server is None or not self._asynchronous:
            return
        params = list(self._module.parameters())
        self._worker_params = flatten([p.detach() for p in params])
        served = server.snapshot()["model"]
        # Parameters only: the server's buffers are its initial ones (only parameters travel).
        with torch.no_grad():
            for name, param in self._module.named_parameters():
                param.copy_(served[name])

    @override
    def on_validation_end(self) -> None:
        """Rank 0 goes back to the parameters its group computes from."""
        super().on_validation_end()
        if self._worker_params is not None:
            vector_to_parameters(self._worker_params, list(self._module.parameters()))
            self._worker_params = None

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The server's model, in rank 0 (a consistent copy while training)."""
        if self._server is not None:
            self._snapshot = self._server.snapshot()
            return self._snapshot["model"]
        if self._served_model is not None:
            return self._served_model.state_dict()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The server's optimizer state (tuner included), in rank 0.

        Args:
            optimizer: an optimizer Lightning holds.
        """
        if not self._served_optimizers:
            return super().optimizer_state(optimizer)
        snapshot, self._snapshot = self._snapshot, None
        if self.sync_every is not None:
            # Local SGD: the outer optimizer goes under its own key (save_checkpoint).
            outer = self._served_optimizers[0]
            self._outer_snapshot = {
                "outer_optimizer": copy.deepcopy(outer.state_dict())
                if snapshot is None
                else snapshot["optimizer"],
                "outer_optimizer_class": type(outer).__name__,
                "sync_every": self.sync_every,
            }
            return super().optimizer_state(optimizer)
        if snapshot is not None:
            return snapshot["optimizer"]
        return self._served_optimizers[0].state_dict()

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Save as DDP does; in local SGD, with the outer optimizer under :data:`LOCAL_SGD_KEY`.

        Args:
            checkpoint: the checkpoint Lightning dumped.
            filepath: where to write it.
            storage_options: passed on to the checkpoint I/O.
        """
        outer, self._outer_snapshot = self._outer_snapshot, None
        if outer is not None:
            checkpoint = {**checkpoint, LOCAL_SGD_KEY: outer}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """During ``fit``, only rank 0 validates (the others get no validation batches).

        Args:
            dataloader: the dataloader Lightning prepared.
        """
        if self._evaluating_in_fit() and not self.is_global_zero:
            return []
        return dataloader

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Shards of the training data; during ``fit``, rank 0 validates on the whole set."""
        if self._evaluating_in_fit():
            return {"num_replicas": 1, "rank": 0}
        return super().distributed_sampler_kwargs

    def _evaluating_in_fit(self) -> bool:
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        if trainer is None:
            return False
        return trainer.state.fn == TrainerFn.FITTING and trainer.state.stage in (
            RunningStage.VALIDATING,
            RunningStage.SANITY_CHECKING,
        )

    # -- collectives while the groups run asynchronously ---------------------------------------

    @property
    @override
    def world_size(self) -> int:
        """The number of processes; 1 while groups train asynchronously.

        Lightning broadcasts a SIGTERM flag from rank 0 before every training batch when the
        world size is above 1: that collective would put every group in lock-step with rank 0
        and hang on a dead process. Each process handles its own signals instead.
        """
        if self._asynchronous:
            return 1
        return super().world_size

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """A barrier over every process, except while groups train asynchronously (none)."""
        if not self._asynchronous:
            super().barrier(*args, **kwargs)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """A broadcast, except while groups train asynchronously (each process keeps its own).

        Args:
            obj: the object.
            src: the rank that sends.
        """
        if self._asynchronous:
            return obj
        return super().broadcast(obj, src)

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """A reduction, except while groups train asynchronously (the process's own value).

        Args:
            tensor: the value.
            group: the process group.
            reduce_op: the reduction.
        """
        if self._asynchronous:
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """A decision over every process, except while groups train asynchronously (its own).

        Args:
            decision: this process's decision.
            all: whether every process must agree (else any).
        """
        if self._asynchronous:
            return decision
        return super().reduce_boolean_decision(decision, all=all)
