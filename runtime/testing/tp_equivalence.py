"""Tensor-parallel equivalence runs: prompts through a checkpoint at tp=N (N real processes over
torch.distributed: gloo on CPU, NCCL on GPUs) and at tp=1, giving every prompt's greedy continuation and the
logits along it.

    run_ranks(cases, new_tokens, world_size=2, device="cpu") -> {case name: CaseOutput}
    case_outputs(model, prompts, new_tokens, device) -> CaseOutput   (any model, e.g. tp=1 in-process)
    with_rank_experts(path, mode, ...) -> tp=1 model whose routed experts compute as tp=2's ranks do

Each rank is `python -m runtime.testing.tp_equivalence SPEC_JSON RANK PORT`; rank 0 saves the outputs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.tools.standalone import SingleSequence


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    prompts: list[list[int]]
    moe_parallel: str = "tp"
    dtype: str = "float32"
    moe_backend: str = "auto"
    linear_backend: str = "auto"


@dataclass
class CaseOutput:
    tokens: list[list[int]]  # per prompt: greedy continuation
    # per prompt: fp32 [prompt + continuation - 1, vocab] on the CPU, the prefill's rows then each decode step's
    logits: list[torch.Tensor]

    def select(self, indices: list[int]) -> "CaseOutput":
        return CaseOutput([self.tokens[i] for i in indices], [self.logits[i] for i in indices])


def greedy_with_logits(model, prompt: list[int], new_tokens: int, device: torch.device | str
                       ) -> tuple[list[int], torch.Tensor]:
    """Prefill, then decode greedily; returns the continuation and every logits row computed on the way."""
    seq = SingleSequence(model, len(prompt) + new_tokens, device=device)
    rows = [seq.step(prompt)]
    tokens: list[int] = []
    while len(tokens) < new_tokens:
        tokens.append(int(rows[-1][-1].argmax()))
        if len(tokens) < new_tokens:
            rows.append(seq.step(tokens[-1:]))
    return tokens, torch.cat(rows).cpu()


def case_outputs(model, prompts: list[list[int]], new_tokens: int, device: torch.device | str) -> CaseOutput:
    runs = [greedy_with_logits(model, p, new_tokens, device) for p in prompts]
    return CaseOutput([t for t, _ in runs], [lg for _, lg in runs])


class RankExpertSum(nn.Module):
    """A routed-expert layer computed as the sum of the rank shards' layers, in the activation dtype as the
    all-reduce sums them: a tp=1 model with a tp=N layout's expert numerics (bf16-rounded partial outputs, and in
    EP mode each rank's own static activation scales)."""

    def __init__(self, shards: list[nn.Module]):
        super().__init__()
        self.shards = nn.ModuleList(shards)

    def forward(self, x, topk_ids, topk_weights, routed_scaling_factor=1.0):
        total = None
        for shard in self.shards:
            out = shard(x, topk_ids, topk_weights, routed_scaling_factor).to(x.dtype)
            total = out if total is None else total + out
        return total


def with_rank_experts(path, mode: str, world_size: int = 2, **load_options):
    """The tp=1 model of `path` whose routed-expert layers are RankExpertSum over the `world_size` rank shards."""
    from runtime.models import load_model
    from runtime.parallel import ParallelContext

    model, _ = load_model(path, **load_options)
    shards = [load_model(path, parallel=ParallelContext(r, world_size, mode), **load_options)[0]
              for r in range(world_size)]
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts = RankExpertSum([s.model.layers[i].mlp.experts for s in shards])
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cases: list[Case], new_tokens: int, world_size: int = 2, device: str = "cpu",
              timeout_s: float = 600) -> dict[str, CaseOutput]:
    """Run every case at tp=world_size in `world_size` fresh processes; raises if a rank fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outputs.pt"
        spec = json.dumps({"cases": [asdict(c) for c in cases], "new_tokens": new_tokens,
                           "world_size": world_size, "device": device, "out": str(out)})
        port = str(_free_port())
        logs = [Path(tmp) / f"rank{rank}.log" for rank in range(world_size)]
        procs = []
        for rank, log in enumerate(logs):
            with log.open("w") as sink:  # files, not pipes: a full pipe would stall a rank mid-collective
                procs.append(subprocess.Popen([sys.executable, "-m", __name__, spec, str(rank), port], stdout=sink,
                                              stderr=subprocess.STDOUT))
        try:
            for proc in procs:
                proc.wait(timeout=timeout_s)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"ranks failed {failed}:\n" + "\n".join(log.read_text() for log in logs))
        raw = torch.load(out)
    return {name: CaseOutput(**fields) for name, fields in raw.items()}


def _rank_main(spec_json: str, rank: int, port: int) -> None:
    import torch.distributed as dist

    from runtime.models import load_model
    from runtime.parallel import ParallelContext, TorchDistributedComm

    spec = json.loads(spec_json)
    world_size = spec["world_size"]
    if spec["device"] == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results = {}
    for fields in spec["cases"]:
        case = Case(**fields)
        parallel = ParallelContext(rank, world_size, case.moe_parallel, TorchDistributedComm())
        model, _ = load_model(case.path, dtype=case.dtype, moe_backend=case.moe_backend,
                              linear_backend=case.linear_backend, parallel=parallel, device=device)
        results[case.name] = asdict(case_outputs(model, case.prompts, spec["new_tokens"], device))
        del model
    if rank == 0:
        torch.save(results, spec["out"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
