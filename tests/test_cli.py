"""The command names users type: `kvmesh daemon`, and `kvmesh server` kept as its old name."""

from __future__ import annotations

from typer.testing import CliRunner

from kvmesh.cli import app


def test_the_daemon_command_and_its_old_name_both_run_the_node_daemon() -> None:
    runner = CliRunner()
    daemon = runner.invoke(app, ["daemon", "--help"])
    old = runner.invoke(app, ["server", "--help"])
    assert daemon.exit_code == 0, daemon.output
    assert old.exit_code == 0, old.output
    assert "Run the node daemon in the foreground" in daemon.output
    assert "kvmesh daemon" in old.output  # the alias says what it is the old name of


def test_the_top_level_help_lists_daemon_not_server() -> None:
    commands = [line.strip("│ ").split(" ")[0] for line in CliRunner().invoke(app, ["--help"]).output.splitlines()]
    assert "daemon" in commands
    assert "server" not in commands  # hidden: scripts keep working, new users see one name


def test_a_bad_dtype_is_refused_naming_it_before_anything_starts() -> None:
    runner = CliRunner()
    bench = runner.invoke(app, ["bench", "run", "--dtype", "int4", "--systems", "vllm"])
    assert bench.exit_code == 2 and "int4" in bench.output and "float32" in bench.output
    demo = runner.invoke(app, ["demo", "--dtype", "float16"])
    assert demo.exit_code == 2 and "float16" in demo.output


def test_bad_router_arguments_are_refused_naming_them() -> None:
    runner = CliRunner()
    for args, fragment in ((["router"], "at least one --engine"),
                           (["router", "--engine", "localhost:8000"], "'localhost:8000'"),
                           (["router", "--engine", "http://127.0.0.1:8000", "--policy", "sticky"], "'sticky'"),
                           (["router", "--engine", "http://a:1", "--engine", "http://a:1/"], "more than once")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, args
        assert fragment in " ".join(result.output.split()), (args, result.output)
