"""The runner and the report, end to end against the small streaming server."""

from html.parser import HTMLParser
from pathlib import Path

from kvmesh.bench.report import summarize, sustained_throughput, write_report
from kvmesh.bench.runner import run_workload
from kvmesh.bench.workloads import Request

REQUESTS = [Request(user, round_index, [1] * (10 + user)) for round_index in range(2) for user in range(3)]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_cell = tag in ("td", "th")

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells.append(data)


def test_sequential_run_records_every_request_in_order(server_url: str) -> None:
    run = run_workload(server_url, "m", REQUESTS, answer_tokens=2, label="seq", show_progress=False)
    assert [r.index for r in run.requests] == list(range(6))
    assert all(r.error is None and r.output_tokens == 2 for r in run.requests)
    sent = [r.sent_at for r in run.requests]
    assert sent == sorted(sent)
    # one at a time: each request is sent after the previous one finished
    for previous, current in zip(run.requests, run.requests[1:]):
        assert current.sent_at >= previous.sent_at + previous.latency - 0.01


def test_poisson_run_respects_the_concurrency_bound_and_user_order(server_url: str) -> None:
    run = run_workload(server_url, "m", REQUESTS, answer_tokens=2, qps=50.0, concurrency=2, seed=3,
                       show_progress=False)
    spans = [(r.sent_at, r.sent_at + r.latency) for r in run.requests]
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= 2
    by_key = {(r.user, r.round): r for r in run.requests}
    for user in range(3):
        first, second = by_key[(user, 0)], by_key[(user, 1)]
        assert second.sent_at >= first.sent_at + first.latency - 0.01


def test_without_a_rate_concurrency_keeps_that_many_in_flight(server_url: str) -> None:
    run = run_workload(server_url, "m", REQUESTS, answer_tokens=2, concurrency=3, show_progress=False)
    spans = [(r.sent_at, r.sent_at + r.latency) for r in run.requests]
    in_flight = [sum(1 for s, e in spans if s <= start < e) for start, _ in spans]
    assert max(in_flight) == 3  # the three first rounds go out together (each answer takes FIRST_DELAY)
    by_key = {(r.user, r.round): r for r in run.requests}
    for user in range(3):  # and a user's next round still waits for the previous answer
        assert by_key[(user, 1)].sent_at >= by_key[(user, 0)].sent_at + by_key[(user, 0)].latency - 0.01


def test_warmup_rounds_go_first_one_at_a_time(server_url: str) -> None:
    run = run_workload(server_url, "m", REQUESTS, answer_tokens=2, qps=50.0, concurrency=3, seed=1,
                       show_progress=False, warmup_rounds=1)
    first = sorted((r for r in run.requests if r.round == 0), key=lambda r: r.sent_at)
    later = [r for r in run.requests if r.round == 1]
    assert len(first) == 3 and len(later) == 3
    for previous, current in zip(first, first[1:]):
        assert current.sent_at >= previous.sent_at + previous.latency - 0.01
    last_warm_done = max(r.sent_at + r.latency for r in first)
    assert all(r.sent_at >= last_warm_done - 0.01 for r in later)


def test_report_files_and_html(server_url: str, tmp_path: Path) -> None:
    runs = [run_workload(server_url, "m", REQUESTS, 2, label=name, show_progress=False,
                         sample=lambda: {"kvmesh_lookup_tokens_total": 100.0, "kvmesh_hit_tokens_total": 40.0,
                                         "kvmesh_tier_hits{tier=l1}": 3.0})
            for name in ("a", "b")]
    summaries = [summarize(run, {"a": runs[0]}, ttft_objective=10.0) for run in runs]
    assert summaries[1]["answers_equal_a"] == 6
    assert summaries[0]["hit_rate"] == 0.4
    assert sustained_throughput(summaries, "b") == summaries[1]["returning_req_per_s"]
    returning = sorted(r.ttft for r in runs[0].requests if r.round > 0)  # 3: the median is the middle one
    assert summaries[0]["returning_p50_ttft"] == returning[1] <= summaries[0]["returning_p90_ttft"]
    files = write_report(runs, summaries, tmp_path, "test report", "kvmesh bench run --test", ["a note"])
    for key in ("json", "markdown", "html", "ttft_distribution", "hit_rate"):
        assert files[key].exists() and files[key].stat().st_size > 0
    page = _Page()
    page.feed(files["html"].read_text())
    assert len(page.images) == 2 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "system" in page.cells and "b" in page.cells
