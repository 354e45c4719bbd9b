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


def test_prewarm_names_a_file_it_cannot_use_before_it_sends_anything(tmp_path) -> None:
    runner = CliRunner()
    (tmp_path / "chat.json").write_text('{"system": "no messages"}')
    (tmp_path / "doc.txt").write_text("a document")
    for files, fragment in (([tmp_path / "missing.txt"], "cannot read"), ([tmp_path / "chat.json"], "chat messages")):
        # the engine's URL answers nothing: the files are read and checked before it is asked
        result = runner.invoke(app, ["prewarm", "--engine", "http://127.0.0.1:9", *map(str, files)])
        assert result.exit_code == 1 and fragment in " ".join(result.output.split()), result.output
    unreachable = runner.invoke(app, ["prewarm", "--engine", "http://127.0.0.1:9", str(tmp_path / "doc.txt")])
    assert unreachable.exit_code == 1 and "did not answer" in unreachable.output
    assert runner.invoke(app, ["unpin", "--engine", "http://127.0.0.1:9"]).exit_code == 2  # no file, no --all
