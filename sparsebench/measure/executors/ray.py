"""The Ray executor: each case a Ray task (remote.serve_job, which runs it in a worker.Worker child
process on the node the task lands on). Without ``--address`` a local Ray cluster is started for
the run (as ``ray.init()`` does); with ``--address auto`` or ``HOST:PORT`` sparsebench joins that
cluster; where Ray is already initialised in this process, it is used as it is.

No two cases share a device: a CUDA case asks for a whole GPU (``num_gpus=1``); a CPU case asks for
a whole node: the custom resource ``sparsebench_node`` (1 per node; the local cluster is started
with it, a joined cluster's nodes need ``ray start ... --resources='{"sparsebench_node": 1}'``),
or, where the cluster's nodes lack it, as many CPUs as the smallest node has (with a warning: a
larger node may then run two CPU cases at once). The scenario's ``ray: {resources: {...}}`` is added
to every task's request, to pin the cases to a hardware class (``{"accelerator_type:H100": 0.001}``
or a resource of your own). Tasks are not retried by Ray (``max_retries=0``): the runner retries
a case whose worker or node was lost once itself, and counts it."""

from __future__ import annotations

from typing import Any

from sparsebench.measure.executors.base import Done, Executor, Job, Options, TestKill, forwarded_env, register, require

NODE_RESOURCE = "sparsebench_node"


class RayExecutor(Executor):
    name = "ray"
    up_front = False

    def __init__(
        self,
        address: str | None = None,
        resources: dict[str, float] | None = None,
        capacity: int | None = None,
        warn=None,
        test_kill: TestKill | None = None,
    ) -> None:
        self._ray = require("ray", "ray")
        self.address = address
        self.resources = dict(resources or {})
        self.capacity = capacity
        self._warn = warn
        self._test_kill = test_kill
        self._refs: dict[Any, Job] = {}
        self._started = False
        self._fn = None
        self._cpu_request: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "resources": self.resources, "capacity": self.capacity}

    def start(self, folder) -> None:
        from sparsebench.measure.executors import remote

        ray = self._ray
        if not ray.is_initialized():
            import logging

            # the cases' own output stays in the workers' logs; Ray's notices below errors stay quiet
            opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
            if self.address is None:
                opts["resources"] = {NODE_RESOURCE: 1}  # a local cluster: one node, one CPU case at a time
            else:
                opts["address"] = self.address
            try:
                ray.init(**opts)
            except Exception as exc:  # noqa: BLE001 - the engine's own error, in one line
                from sparsebench.errors import ScenarioError

                where = self.address or "a local cluster"
                raise ScenarioError(
                    f"--executor ray: cannot start or join {where}: {str(exc).splitlines()[0]}"
                ) from None
            self._started = True
        self._fn = ray.remote(remote.serve_job)

    def _request(self, job: Job) -> dict[str, Any]:
        """The task's resources: a whole GPU, or a whole node on CPU; plus the scenario's pins."""
        if job.case.device.startswith("cuda"):
            req: dict[str, Any] = {"num_gpus": 1, "resources": dict(self.resources)}
        else:
            if self._cpu_request is None:
                self._cpu_request = self._whole_node()
            req = {**self._cpu_request, "resources": {**self._cpu_request.get("resources", {}), **self.resources}}
        return req

    def _whole_node(self) -> dict[str, Any]:
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        if nodes and all(n.get("Resources", {}).get(NODE_RESOURCE) for n in nodes):
            return {"num_cpus": 0, "resources": {NODE_RESOURCE: 1}}
        cpus = min((int(n.get("Resources", {}).get("CPU", 1)) for n in nodes), default=1)
        sizes = {int(n.get("Resources", {}).get("CPU", 1)) for n in nodes}
        if len(sizes) > 1 and self._warn:
            self._warn(
                f"ray: the nodes lack the resource {NODE_RESOURCE}; a CPU case asks for {cpus} CPUs (the smallest "
                "node), so a larger node may run two at once; start each node with "
                f"--resources='{{\"{NODE_RESOURCE}\": 1}}'"
            )
        return {"num_cpus": max(cpus, 1)}

    def submit(self, job: Job) -> None:
        payload = job.payload(forwarded_env())
        if self._test_kill is not None:
            payload["test_kill"] = vars(self._test_kill)
        ref = self._fn.options(max_retries=0, retry_exceptions=False, **self._request(job)).remote(payload)
        self._refs[ref] = job

    def wait(self, timeout: float) -> list[Done]:
        ray = self._ray
        if not self._refs:
            return []
        ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if ready:  # everything else that has ended too
            ready, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
        out = []
        for ref in ready:
            job = self._refs.pop(ref)
            try:
                out.append(Done(job, ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - a lost worker or node, a task that failed: the engine's reason
                text = str(exc).strip().splitlines()
                out.append(Done(job, lost=f"ray: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")))
        return out

    def cancel(self) -> None:
        for ref in list(self._refs):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already ended
                pass
        self._refs.clear()

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


@register("ray")
def create(options: Options, plan, warn=None) -> RayExecutor:
    from sparsebench.measure.executors.base import parse_parallel

    n = parse_parallel(options.parallel)
    return RayExecutor(
        address=options.address,
        resources=dict(plan.scenario.ray.resources),
        capacity=None if n in (None, "auto") else int(n),
        warn=warn,
    )
