"""lm-eval's own `local-completions` client scoring (context, continuation) pairs by log-likelihood against a server.

Run under lm-eval's environment by evalpipe/interop/loglik_crosscheck.py (`<lm-eval python> lmeval_loglikelihood.py`);
it imports only the standard library and lm-eval, and talks JSON lines over pipes, so no question text (GPQA's
included) is written to disk. stdin: a header `{"base_url", "model", "tokenizer"}` (base_url: the server's
/v1/completions), then one item per line `{"context", "continuations"}`. stdout: one line per item, in input order,
`{"logprobs": [...]}` (lm-eval's log-likelihood of each continuation). What lm-eval does on the way is its own: it
moves the context's trailing whitespace onto the continuation, encodes both with the Hugging Face tokenizer, sends
the token ids (echo, logprobs 1, max_tokens 1, temperature 0) and sums the continuation's token logprobs.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lines = iter(sys.stdin)
    header = json.loads(next(lines))
    items = [json.loads(line) for line in lines if line.strip()]
    model = LocalCompletionsAPI(base_url=header["base_url"], model=header["model"], tokenizer=header["tokenizer"],
                                tokenizer_backend="huggingface", batch_size=4, num_concurrent=2, max_length=4096)
    requests = [Instance("loglikelihood", doc={}, arguments=(item["context"], continuation), idx=i)
                for item in items for i, continuation in enumerate(item["continuations"])]
    results = iter(model.loglikelihood(requests, disable_tqdm=True))
    for item in items:
        print(json.dumps({"logprobs": [next(results)[0] for _ in item["continuations"]]}), flush=True)


if __name__ == "__main__":
    main()
