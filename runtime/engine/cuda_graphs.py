"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (as vLLM and SGLang do).

A decode step launches hundreds of small kernels; at small batches the host cannot issue them as fast as the GPU
runs them. Each bucket's forward pass is captured once at start-up over static device buffers (token ids,
positions, cache slots, block tables, context lengths) and replayed: a step copies its inputs into the buffers
with one host-to-device copy and launches one graph.

A batch of B decoding sequences runs in the smallest bucket >= B. The padded rows are sequences of one token
that live in a cache block no real sequence owns (`pad_block`): they write their K/V there, attend only to it,
and their hidden states are dropped. Prefill chunks, batches above the largest bucket and contexts wider than
the captured block tables run eagerly (ModelRunner).

Attention metadata comes from `ForwardBatch.decode_context_lens` (runtime.layers.attention): device ops of fixed
shape only. A step that reads back from the GPU (the torch reference MoE backends loop over the experts present)
cannot be captured: the runner then stays eager for every bucket (logged).
"""

from __future__ import annotations

import logging
import time

import torch

from runtime.model_api import CausalLM, ForwardBatch

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8 up to max_batch (max_batch itself always last)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


class DecodeGraphs:
    """Static decode inputs for up to `max_batch` sequences, and the graphs captured over them.

    A bucket without a graph (nothing captured, or no CUDA) runs the same padded static batch eagerly.
    """

    # Columns of the staging buffer before the block table: token id, position, cache slot, context length.
    _IDS, _POS, _SLOT, _CTX = range(4)

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], block_size: int, max_model_len: int,
                 max_batch: int, pad_block: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.buckets = batch_buckets(max_batch)
        self.width = -(-max_model_len // block_size)  # block-table columns: the longest sequence's blocks
        self.pad_block = pad_block
        rows = self.buckets[-1]
        # One int64 row per sequence: [id, position, slot, context length, block table...]. Pinned, so that the
        # copy of a step's inputs is one asynchronous transfer.
        self._host = torch.empty(rows, 4 + self.width, dtype=torch.long, pin_memory=device.type == "cuda")
        self._static = torch.empty(rows, 4 + self.width, dtype=torch.long, device=device)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._fill_padding(0)
        self._static.copy_(self._host)
        # Column views of the static buffer, one per bucket (graphs capture their addresses).
        self._batches = {b: self._batch(b) for b in self.buckets}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def _fill_padding(self, start: int) -> None:
        pad = self._host[start:]
        pad[:, self._IDS] = 0
        pad[:, self._POS] = 0
        pad[:, self._SLOT] = self.pad_block * self.block_size
        pad[:, self._CTX] = 1
        pad[:, 4:] = self.pad_block

    def _batch(self, b: int) -> ForwardBatch:
        s = self._static[:b]
        return ForwardBatch(
            input_ids=s[:, self._IDS], positions=s[:, self._POS], query_lens=[1] * b, context_lens=[1] * b,
            block_tables=s[:, 4:], slot_mapping=s[:, self._SLOT], kv_caches=self.kv_caches,
            block_size=self.block_size, decode_context_lens=s[:, self._CTX],
        )

    def bucket(self, query_lens: list[int], table_width: int) -> int | None:
        """The bucket a step runs in, or None when it must run eagerly."""
        n = len(query_lens)
        if n > self.buckets[-1] or table_width > self.width or any(q != 1 for q in query_lens):
            return None
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool; on failure keep none (eager).

        Each bucket first runs outside the graph (Triton compiles, lazily grown workspaces reach this bucket's
        size) with synchronising CUDA calls made errors: a step that reads back from the GPU cannot be captured,
        and is found here, before a capture that would fail.
        """
        start = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        b = self.buckets[-1]
        try:
            for b in reversed(self.buckets):
                batch = self._batches[b]
                torch.cuda.set_sync_debug_mode("error")
                try:
                    self.model.forward(batch)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._outputs[b] = self.model.forward(batch)
                self._graphs[b] = graph
        except RuntimeError as exc:
            self._graphs.clear()
            self._outputs.clear()
            log.warning("CUDA graphs off, decode steps run eagerly: the batch-%d decode step cannot be captured (%s)",
                        b, " ".join(str(exc).split())[:200])
            return
        torch.cuda.synchronize(self.device)
        log.info("CUDA graphs: decode batches %s captured in %.1f s", self.buckets, time.monotonic() - start)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            context_lens: list[int], block_tables: torch.Tensor, bucket: int) -> torch.Tensor:
        """Hidden states [bucket, hidden] of a decode step (rows past len(context_lens) are padding)."""
        n = len(context_lens)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's transfer has read the staging buffer
        host = self._host
        host[:n, self._IDS] = input_ids
        host[:n, self._POS] = positions
        host[:n, self._SLOT] = slot_mapping
        host[:n, self._CTX] = torch.tensor(context_lens, dtype=torch.long)
        width = block_tables.shape[1]
        host[:n, 4 : 4 + width] = block_tables.clamp(min=0)
        host[:n, 4 + width :] = self.pad_block
        self._fill_padding(n)
        self._static[:bucket].copy_(host[:bucket], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        graph = self._graphs.get(bucket)
        if graph is None:
            return self.model.forward(self._batches[bucket])
        graph.replay()
        return self._outputs[bucket]
