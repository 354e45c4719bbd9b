"""Send a workload to an OpenAI-compatible endpoint and record what each request felt like.

Requests go one at a time (``qps=None``, ``concurrency=1``), as soon as one of ``concurrency`` slots is
free (``qps=None``), or arrive as a Poisson process at ``qps`` requests per second with at most
``concurrency`` in flight.  A user's
round only starts once the same user's previous round has been answered, as a
person would wait for the answer before asking the next question.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.workloads import Request
from kvmesh.router import ENGINE_HEADER


@dataclass(frozen=True, slots=True)
class RequestRecord:
    index: int
    user: int
    round: int
    prompt_tokens: int
    sent_at: float  # seconds after the run started
    ttft: float
    latency: float
    inter_token_latency: float | None
    output_tokens: int | None
    text: str
    error: str | None = None
    cached_tokens: int | None = None  # prompt tokens the server reported cached (usage.prompt_tokens_details)
    served_by: str | None = None  # the engine that answered, where a kvmesh router says (x-kvmesh-engine)


@dataclass
class RunRecord:
    system: str
    qps: float | None
    concurrency: int
    wall_seconds: float
    requests: list[RequestRecord]
    samples: list[dict[str, float]]  # cache metrics sampled during the run (kvmesh only)


def run_workload(base_url: str, model: str, requests: Sequence[Request], answer_tokens: int,
                 qps: float | None = None, concurrency: int = 1, seed: int = 0, label: str = "",
                 sample: Callable[[], dict[str, float]] | None = None, show_progress: bool = True,
                 warmup_rounds: int = 0, blend: bool = False) -> RunRecord:
    """Run ``requests`` in order of arrival; returns every request's timing and the sampled metrics.

    With ``qps`` or ``concurrency`` above 1, rounds below ``warmup_rounds`` go first, one at a time, and only
    the later rounds arrive concurrently: throughput and TTFT then describe the steady state (returning
    users), not a mix with every user's cold first request.  ``blend``: each request asks kvmesh to blend
    its passages (``Request.passages``, as token spans).
    """
    rng = random.Random(seed)
    done_events = {}
    previous_of: dict[int, int] = {}
    last_by_user: dict[int, int] = {}
    for index, request in enumerate(requests):
        done_events[index] = threading.Event()
        if request.user in last_by_user:
            previous_of[index] = last_by_user[request.user]
        last_by_user[request.user] = index
    records: list[RequestRecord | None] = [None] * len(requests)
    samples: list[dict[str, float]] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def send(index: int) -> None:
        request = requests[index]
        if index in previous_of:
            done_events[previous_of[index]].wait()
        sent = time.perf_counter() - started
        try:
            spans = [list(span) for span in request.passages]
            extra: dict[str, object] | None = \
                {"kv_transfer_params": {"kvmesh": {"blend": True, "passages": spans}}} if blend and spans else None
            reply = stream_completion(base_url, model, request.prompt, answer_tokens, extra=extra)
            record = RequestRecord(index, request.user, request.round, len(request.prompt), sent, reply.ttft,
                                   reply.latency, reply.inter_token_latency, reply.completion_tokens, reply.text,
                                   cached_tokens=reply.cached_tokens, served_by=reply.headers.get(ENGINE_HEADER))
        except Exception as err:  # noqa: BLE001 - a failed request is a result
            record = RequestRecord(index, request.user, request.round, len(request.prompt), sent,
                                   float("nan"), float("nan"), None, None, "", f"{type(err).__name__}: {err}")
        records[index] = record
        done_events[index].set()
        if sample is not None:
            try:
                snapshot = sample()
            except Exception:  # noqa: BLE001 - sampling is best effort
                snapshot = {}
            with lock:
                samples.append({"t": time.perf_counter() - started, **snapshot})

    columns = (TextColumn(f"[bold]{label or 'run'}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("requests", total=len(requests))
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            sequential = qps is None and concurrency <= 1
            warm = [i for i, r in enumerate(requests) if not sequential and r.round < warmup_rounds]
            for index in warm:  # first rounds one at a time: the sweep then measures the steady state
                pool.submit(send, index).result()
                progress.advance(task)
            if sequential:
                for index in range(len(requests)):
                    pool.submit(send, index).result()
                    progress.advance(task)
            else:
                slots = threading.Semaphore(max(1, concurrency))
                futures = []
                arrival = time.perf_counter() - started
                warm_set = set(warm)
                for index in (i for i in range(len(requests)) if i not in warm_set):
                    if qps is not None:  # a Poisson process; without a rate, each as soon as a slot is free
                        arrival += rng.expovariate(qps)
                        delay = arrival - (time.perf_counter() - started)
                        if delay > 0:
                            time.sleep(delay)
                    slots.acquire()

                    def finished(_future: object, _slots: threading.Semaphore = slots) -> None:
                        _slots.release()
                        progress.advance(task)

                    future = pool.submit(send, index)
                    future.add_done_callback(finished)
                    futures.append(future)
                for future in futures:
                    future.result()
    wall = time.perf_counter() - started
    return RunRecord(label, qps, concurrency, wall, [r for r in records if r is not None], samples)
