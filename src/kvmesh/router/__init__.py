"""``kvmesh router``: one OpenAI-compatible endpoint in front of several ``kvmesh serve`` engines.

Each request goes to the engine that would answer it first: the one whose node already holds most of its
prompt's KV, unless that engine's queue costs more than the prefill it saves.  The router computes the
same chunk keys the engine's connector will (the engine's tokenizer and chat template, the namespace the
engine registered with its daemon) and asks every node's daemon which prefix it holds, with a probe that
moves nothing between tiers.  Modules, one job each:

* ``nodes``: finding each engine's daemon, and the probe (how many leading tokens a node holds).
* ``prompts``: a request's prompt tokens, as the engine will make them, with a parity check against the
  engine's own ``/tokenize``.
* ``policy``: the choice (``cache``: lowest estimated time to first token; ``round-robin``; ``random``)
  and the per-engine load it is made on.
* ``app``: the HTTP proxy (forwarding, retries before the first byte, health, metrics).
"""

ENGINE_HEADER = "x-kvmesh-engine"  # on every routed answer: the engine that served it
