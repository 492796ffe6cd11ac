"""A tensor-parallel rank other than 0: `python -m runtime.server.rank_worker OPTIONS_JSON RANK STORE_PORT`.

Started by rank 0 (runtime.server.ranks), never by hand. Loads this rank's shard, joins the process group, then
runs every step rank 0 broadcasts until told to stop. A user error (bad checkpoint) is printed as one
`error: ...` line, which rank 0 reports; exit code 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from runtime.errors import UserError

log = logging.getLogger("runtime.server.rank_worker")


def _exit_with_parent() -> None:
    """Exit as soon as rank 0 is gone, even while blocked in a collective or still loading."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_rank(options_json: str, rank: int, store_port: int) -> int:
    import torch.distributed as dist

    from runtime.engine.model_runner import ModelRunner
    from runtime.engine.tp_runner import serve_steps
    from runtime.server.launch import kv_cache_blocks, load_served_model
    from runtime.server.options import ServeOptions
    from runtime.server.ranks import STORE_HOST, STORE_TIMEOUT, join_collectives, parallel_context, rank_device

    options = ServeOptions.from_json(options_json)
    store = dist.TCPStore(STORE_HOST, store_port, options.tp, is_master=False, timeout=STORE_TIMEOUT)
    device = rank_device(rank, options.tp)
    model, config = load_served_model(options, parallel_context(options, rank), device)
    engine_options = options.engine_options(config)
    try:
        local_blocks = kv_cache_blocks(model, engine_options, device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    store.set(f"loaded/{rank}", "1")
    channel, num_blocks = join_collectives(store, rank, options.tp, device, local_blocks)
    runner = ModelRunner(model, num_blocks, engine_options.block_size, device, batch_invariant=options.deterministic)
    log.info("rank %d ready: %d KV cache blocks on %s", rank, num_blocks, device)
    steps = serve_steps(runner, channel)
    log.info("rank %d stopping after %d steps", rank, steps)
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    options_json, rank, store_port = argv if argv is not None else sys.argv[1:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 coordinates the stop
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    try:
        return run_rank(options_json, int(rank), int(store_port))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
