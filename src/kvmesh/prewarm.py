"""``kvmesh prewarm``: a prompt's KV computed and stored before any request needs it, and optionally pinned.

The engine computes the prompt once (a request for one token; a chat's messages without the assistant's turn
opened, so a conversation that goes on from them finds them as its prefix) and its connector stores it as for
any request.  ``--pin`` then asks the engine's node daemon to keep those chunks in L1 for a while (a system
prompt, an agent's tool definitions): eviction passes over them within ``l1_pin_fraction`` of L1, until
``kvmesh unpin`` or the time runs out.  A file ending in ``.json`` is a chat (a list of messages, or an object
with ``messages`` and optionally ``tools``); any other file is a completion prompt (its text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kvmesh.config import KVMeshConfig
from kvmesh.keys import ChunkKey, PartKeys
from kvmesh.router.nodes import NODE_FAULTS, EngineKeys, NodeLink, find_node
from kvmesh.router.prompts import PromptRequest


class PrewarmError(ValueError):
    """A file, engine or daemon that cannot be used (named in the message)."""


@dataclass(frozen=True)
class Prewarmed:
    name: str
    prompt_tokens: int
    cached_before: int  # tokens the engine found cached when asked (vLLM's own and kvmesh's)
    stored_tokens: int  # leading tokens the node holds now (-1: its daemon could not be asked)
    pinned: int = 0  # chunks pinned in L1
    not_pinned: int = 0  # chunks not in L1, or past the pin budget


def read_prompt(path: Path) -> PromptRequest:
    """A file as the prompt it holds (``.json``: a chat, opened for no assistant turn; else a text prompt)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise PrewarmError(f"cannot read {path}: {err}") from None
    if path.suffix != ".json":
        return PromptRequest("completion", {"prompt": text})
    try:
        data = json.loads(text)
    except ValueError as err:
        raise PrewarmError(f"{path} is not JSON: {err}") from None
    fields = {"messages": data} if isinstance(data, list) else data
    if not isinstance(fields, dict) or not isinstance(fields.get("messages"), list) or not fields["messages"]:
        raise PrewarmError(f"{path}: expected a list of chat messages, or an object with \"messages\" (and "
                           "optionally \"tools\")")
    chat = {name: fields[name] for name in ("messages", "tools", "chat_template_kwargs") if name in fields}
    return PromptRequest("chat", {**chat, "add_generation_prompt": False})


def _served_model(http: httpx.Client, url: str) -> str:
    try:
        return str(http.get(f"{url}/v1/models").json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as err:
        raise PrewarmError(f"the engine at {url} did not answer /v1/models: {err}") from None


def _compute(http: httpx.Client, url: str, model: str, prompt: PromptRequest) -> tuple[int, int]:
    """Ask the engine for one token of the prompt: it computes (and kvmesh stores) the whole prompt."""
    path = "/v1/chat/completions" if prompt.kind == "chat" else "/v1/completions"
    body: dict[str, Any] = {"model": model, "max_tokens": 1, "temperature": 0, **prompt.fields}
    if prompt.kind == "chat" and "tools" in body:
        body["tool_choice"] = "none"
    reply = http.post(f"{url}{path}", json=body)
    if reply.status_code != 200:
        raise PrewarmError(f"the engine at {url} refused the prompt: HTTP {reply.status_code} {reply.text[:300]}")
    usage = reply.json().get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return int(usage.get("prompt_tokens") or 0), int(details.get("cached_tokens") or 0)


def _tokens(http: httpx.Client, url: str, model: str, prompt: PromptRequest) -> list[int]:
    reply = http.post(f"{url}/tokenize", json=prompt.tokenize_body(model))
    if reply.status_code != 200:
        raise PrewarmError(f"the engine at {url} could not tokenize the prompt: {reply.text[:300]}")
    return [int(t) for t in reply.json()["tokens"]]


def engine_node(config: KVMeshConfig, url: str, model: str) -> tuple[NodeLink, EngineKeys]:
    """The engine's node daemon (found by the engine's port, else the configured instance)."""
    links: dict[str, NodeLink] = {}
    found = find_node(config, url, model, None, links) or find_node(config, url, model, config.instance, links)
    if found is None:
        raise PrewarmError(f"no kvmesh daemon serves the engine at {url} (looked among this user's daemons "
                           f"in {config.socket_path().parent}); start it with kvmesh serve, or name its "
                           "daemon with --set instance=NAME")
    return found


def _part_keys(engine: EngineKeys, keys: list[ChunkKey]) -> list[ChunkKey]:
    return [part.key(key) for part in PartKeys.every_part(engine.tp_world, engine.groups) for key in keys]


def prewarm(config: KVMeshConfig, url: str, paths: list[Path], pin_seconds: float | None = None,
            progress: Any = None) -> list[Prewarmed]:
    """Compute and store each file's prompt on the engine at ``url``; pin it for ``pin_seconds`` if given."""
    prompts = [(path.name, read_prompt(path)) for path in paths]  # every file checked before any is sent
    url = url.rstrip("/")
    results = []
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as http:
        model = _served_model(http, url)
        link, engine = engine_node(config, url, model) if pin_seconds is not None else (None, None)
        try:
            for name, prompt in prompts:
                prompt_tokens, cached = _compute(http, url, model, prompt)
                tokens = _tokens(http, url, model, prompt)
                if link is None or engine is None:
                    results.append(Prewarmed(name, prompt_tokens, cached, -1))
                else:
                    results.append(_pin(link, engine, name, tokens, prompt_tokens, cached, float(pin_seconds or 0)))
                if progress is not None:
                    progress()
        finally:
            if link is not None:
                link.close()
    return results


def _pin(link: NodeLink, engine: EngineKeys, name: str, tokens: list[int], prompt_tokens: int, cached: int,
         seconds: float) -> Prewarmed:
    held = link.held(engine, tokens, engine.namespace).tokens
    keys = [key for key in engine.keys(tokens, engine.namespace) if key.end <= held]
    reply = link.pin(_part_keys(engine, keys), seconds)
    return Prewarmed(name, prompt_tokens, cached, held, reply.pinned, reply.missing + reply.over_budget)


def unpin(config: KVMeshConfig, url: str, paths: list[Path], every: bool = False) -> int:
    """Let L1 evict the chunks of these files' prompts again (``every``: all pinned ones); how many were."""
    prompts = [read_prompt(path) for path in paths]
    url = url.rstrip("/")
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as http:
        model = _served_model(http, url)
        link, engine = engine_node(config, url, model)
        try:
            keys = [] if every else [key for prompt in prompts
                                     for key in engine.keys(_tokens(http, url, model, prompt), engine.namespace)]
            return link.unpin(_part_keys(engine, keys), every)
        except NODE_FAULTS as err:
            raise PrewarmError(f"the engine's kvmesh daemon could not be asked: {err}") from None
        finally:
            link.close()
