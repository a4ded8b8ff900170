"""Static shapes on the device: StaticRunner (one function over fixed input buffers, captured once as a CUDA
graph and replayed), the per-side cache of runners keyed by shape, and staging host inputs towards those buffers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from telepathy.bridge.runtime.fastpath.config import FastPathConfig

log = logging.getLogger(__name__)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # per GPU: warm-up and capture of every StaticRunner


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class StaticRunner:
    """`fn(**inputs)` over fixed input buffers; with `graph=True` (CUDA) it is captured once and replayed.

    Outputs are static tensors too: they are overwritten by the next run, so copy out what you keep.
    """

    def __init__(self, fn: Callable[..., Any], inputs: dict[str, torch.Tensor], graph: bool, pool: Any = None, warmup: int = 2,
                 device: torch.device | None = None):
        self.fn, self.inputs, self.graph = fn, inputs, None
        self.device = device if device is not None else next(iter(inputs.values())).device
        if graph:
            # Streams, capture and replay belong to the inputs' GPU, which need not be the current one (a sender on
            # cuda:0 and a receiver on cuda:1 in one process): without this the capture runs on cuda:0's stream.
            with torch.cuda.device(self.device):
                # Warm up on a side stream of this GPU (lazy inits, cuBLAS workspaces, kernel selection), then
                # capture on that same stream. torch.cuda.graph's own default capture stream is made once per
                # process, on whichever GPU was current then: a second GPU's capture must not use it.
                side = _side_stream(self.device)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(warmup):
                        fn(**inputs)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                    self.outputs = fn(**inputs)

    @torch.no_grad()
    def run(self) -> Any:
        if self.graph is None:
            return self.fn(**self.inputs)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs


class _RunnerCache:
    """Runners keyed by static shape; at most `max_graphs` of them are captured graphs."""

    def __init__(self, device: torch.device, config: FastPathConfig):
        self.device = device
        self.use_graphs = config.cuda_graphs and device.type == "cuda"
        self.max_graphs = config.max_graphs
        if self.use_graphs:
            with torch.cuda.device(device):
                self.pool = torch.cuda.graph_pool_handle()
        else:
            self.pool = None
        self.runners: dict[tuple, StaticRunner] = {}
        self.graphs = 0

    def get(self, key: tuple, build: Callable[[], tuple[Callable[..., Any], dict[str, torch.Tensor]]]) -> StaticRunner:
        runner = self.runners.get(key)
        if runner is None:
            fn, inputs = build()
            graph = self.use_graphs and self.graphs < self.max_graphs
            if self.use_graphs and not graph:
                log.warning("fast path: %d graphs captured; shape %s runs without a graph", self.graphs, key)
            runner = StaticRunner(fn, inputs, graph=graph, pool=self.pool, device=self.device)
            self.graphs += int(graph)
            self.runners[key] = runner
        return runner


def _stage(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor → device, asynchronously from pinned memory (PyTorch's pinned cache tracks the copy)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
