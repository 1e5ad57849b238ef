"""Exit codes that cannot be confused (issue #12): 0 success, 1 rolled back or invalid,
2 usage or runtime error (one ``canaryd…: error: …`` line on stderr, a traceback only
with ``--debug``), 3 timeout; and the flags that used to end in a traceback."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from canaryd import cli, cluster_cli
from canaryd.cli import build_parser, main
from canaryd.playground import Playground, Sample

README = Path(__file__).resolve().parent.parent / "README.md"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(err: str) -> None:
    assert err.startswith("canaryd"), err
    assert ": error: " in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not exactly one line: {err!r}"
    assert "Traceback" not in err


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that gets past flag validation fails the test (nothing is contacted)."""

    def contacted(*_: Any) -> NoReturn:
        pytest.fail("the flags passed validation and the cluster command ran")

    monkeypatch.setattr(cluster_cli, "handle", contacted)


# -- documented ----------------------------------------------------------------------------


def test_top_level_help_lists_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run("--help")
    assert status == 0, err
    text = capsys.readouterr().out
    assert "exit codes" in text
    for code, meaning in (
        ("0", "success"),
        ("1", "rolled back"),
        ("2", "usage or runtime error"),
        ("3", "timeout"),
        ("4", "held"),
        ("130", "interrupted"),
    ):
        assert re.search(rf"^\s+{code}\s+.*{meaning}", text, re.MULTILINE), (code, text)
    assert "--debug" in text


def test_every_command_documents_its_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = sorted(sub.choices)
    assert {"simulate", "validate", "run", "promote", "status", "playground"} <= set(names)
    for name in names:
        assert run(name, "--help")[0] == 0
        text = capsys.readouterr().out
        assert "exit codes" in text, name
        assert "--debug" in text, name


def test_readme_has_an_exit_codes_section() -> None:
    text = README.read_text()
    match = re.search(r"^## Exit codes\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Exit codes' section"
    section = match.group(1)
    for code in ("0", "1", "2", "3", "4", "130"):
        assert re.search(rf"^\| `{code}` \|", section, re.MULTILINE), code
    assert "--debug" in section


# -- unexpected exceptions ----------------------------------------------------------------


def test_an_unexpected_exception_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> int:
        raise RuntimeError("boom\nat the second line")

    monkeypatch.setattr(cli, "cmd_crd", broken)
    code, _, err = run("crd")
    assert code == 2
    assert_one_line_error(err)
    assert err.startswith("canaryd: error: unexpected RuntimeError: boom at the second line")
    assert "--debug" in err


@pytest.mark.parametrize("argv", [["--debug", "crd"], ["crd", "--debug"]])
def test_debug_adds_the_traceback(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    def broken(*_: Any) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_crd", broken)
    code, _, err = run(*argv)
    assert code == 2
    assert err.startswith("Traceback (most recent call last):")
    assert 'raise RuntimeError("boom")' in err
    assert err.splitlines()[-1] == "canaryd: error: unexpected RuntimeError: boom"


def test_an_unexpected_exception_in_a_cluster_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> int:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [KeyError("spec"), OSError()])

    monkeypatch.setattr(cluster_cli, "handle", broken)
    code, _, err = run("status", "--server", "http://user:s3cret@127.0.0.1:1")
    assert code == 2
    assert_one_line_error(err)
    assert err.startswith("canaryd: error: unexpected KeyError: 'spec' (and 1 more)")


def test_interrupt_and_broken_pipe_keep_their_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    raised: list[BaseException] = []

    def broken(*_: Any) -> int:
        raise raised[-1]

    monkeypatch.setattr(cli, "cmd_crd", broken)
    raised.append(KeyboardInterrupt())
    code, _, err = run("crd")
    assert (code, err) == (130, "\ncanaryd: interrupted\n")
    raised.append(BrokenPipeError())
    assert run("crd") == (0, "", "")
    raised.append(ValueError("and a bug"))
    code, _, err = run("crd")
    assert code == 2
    assert_one_line_error(err)


# -- flags that used to end in a traceback, or be accepted ---------------------------------

RUN = ("run", "--simulate", "healthy")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--seed", "-1"], "argument --seed: must be a whole number, 0 or more"),
        (["simulate", "--seed", "x"], "argument --seed: must be a whole number"),
        (
            ["status", "--request-timeout", "0"],
            "argument --request-timeout: must be longer than 0s",
        ),
        (["status", "--request-timeout", "1h"], "at most 10m (got '1h')"),
        (["promote", "x", "--request-timeout=-1s"], "durations cannot be negative"),
        (["promote", "x", "--wait", "--timeout", "0"], "argument --timeout: must be longer"),
        (["approve", "x", "--step", "0"], "argument --step: must be a whole number, more than 0"),
        (["approve", "x", "--step", "500"], "at most 100 (got '500')"),
        ([*RUN, "--lease-duration", "0"], "argument --lease-duration: must be at least 1s"),
        ([*RUN, "--lease-renew", "15s"], "--lease-renew 15s must be shorter than --lease-duration"),
        ([*RUN, "--lease-duration", "5s"], "--lease-renew 10s must be shorter than --lease-d"),
        ([*RUN, "--lease-retry", "0"], "argument --lease-retry: must be longer than 0s"),
        ([*RUN, "--lease-retry", "1m"], "--lease-retry 1m must be shorter than --lease-duration"),
        ([*RUN, "--resync", "0"], "argument --resync: must be at least 1s (got '0')"),
        ([*RUN, "--resync", "soon"], "argument --resync: 'soon' is not a duration"),
        ([*RUN, "--simulate-speed", "-1"], "argument --simulate-speed: must be a number, more"),
        ([*RUN, "--simulate-speed", "0"], "argument --simulate-speed: must be a number, more"),
        ([*RUN, "--simulate-speed", "inf"], "argument --simulate-speed: must be a number, more"),
        ([*RUN, "--prometheus-timeout", "0"], "argument --prometheus-timeout: must be longer"),
        ([*RUN, "--listen", "0.0.0.0"], "argument --listen: '0.0.0.0' (the flag or $CANARYD_"),
        ([*RUN, "--listen", "127.0.0.1:http"], "expected HOST:PORT"),
        ([*RUN, "--simulate-file", "f.yaml"], "give --simulate or --simulate-file, not both"),
        ([*RUN, "--prometheus-url", "http://p:9090"], "give either --prometheus-url"),
        (["run"], "no metrics source"),
        (["run", "--prometheus-url", "not a url"], "'not a url' (the flag or $CANARYD_PROM"),
        (["run", "--prometheus-url", "ftp://prom:9090"], "not an http:// or https:// URL"),
        (["run", "--prometheus-url", "http://:9090"], "no host"),
        (["run", "--prometheus-url", "http://prom:x"], "a port that is not a number"),
        (["run", "--prometheus-url", "http://prom/?q=1"], "a query or fragment"),
        ([*RUN, "--prometheus-header", "X-Org team-a"], "expected 'NAME: VALUE'"),
        ([*RUN, "--prometheus-client-cert", "c.pem"], "--prometheus-client-key go together"),
        ([*RUN, "--api-reads-need-token"], "--api-reads-need-token needs --api-token-file"),
        (["playground", "--speed", "0"], "argument --speed: must be a number, more than 0"),
        (["playground", "--listen", "9000"], "argument --listen: '9000': expected HOST:PORT"),
        (["playground", "--duration", "0"], "argument --duration: must be longer than 0s"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    no_cluster: None, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    for env in ("CANARYD_PROMETHEUS_URL", "CANARYD_LISTEN", "CANARYD_API_TOKEN_FILE"):
        monkeypatch.delenv(env, raising=False)
    code, out, err = run(*argv)
    assert code == 2, (out, err)
    assert_one_line_error(err)
    assert message in err
    assert err.startswith(f"canaryd {argv[0]}: error: ")
    assert err.endswith(f" (see 'canaryd {argv[0]} --help')\n")


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:s3cret@:9090",
        "admin:s3cret@prometheus:9090",
        "http://admin:s3/cret@prometheus:9090/x y",
        "https://prometheus:9090/?token=s3cret",
    ],
)
def test_a_bad_prometheus_url_is_echoed_without_its_credentials(
    no_cluster: None, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("CANARYD_PROMETHEUS_URL", url)  # from the environment, same check
    code, _, err = run("run")
    assert code == 2
    assert_one_line_error(err)
    assert "argument --prometheus-url: " in err
    assert "s3cret" not in err and "s3/cret" not in err
    assert "***" in err


def test_good_run_flags_pass_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[argparse.Namespace] = []

    def handle(args: argparse.Namespace, out: Any) -> int:
        ran.append(args)
        return 0

    monkeypatch.setattr(cluster_cli, "handle", handle)
    code, _, err = run(
        "run", "--prometheus-url", "https://user:pw@prom.example.com:9443/prometheus",
        "--lease-duration", "15s", "--lease-renew", "10s", "--lease-retry", "2s",
        "--resync", "1s", "--status-refresh", "0", "--listen", "[::1]:0",
        "--prometheus-header", "X-Scope-OrgID: team-a", "--request-timeout", "10m",
    )  # fmt: skip
    assert (code, err) == (0, "")
    args = ran[0]
    assert args.lease_duration == 15 and args.status_refresh == 0 and args.listen == "[::1]:0"
    assert args.prometheus_url == "https://user:pw@prom.example.com:9443/prometheus"


def test_an_unreadable_spec_for_validate_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = run("validate", str(tmp_path / "missing.yaml"))
    assert (code, out) == (2, "")
    assert_one_line_error(err)
    assert "missing.yaml: cannot read it: No such file or directory" in err


# -- malformed kubeconfig files ------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{{{", "not valid YAML at line 1, column 4"),
        ("apiVersion: v1\nclusters: 5\n", "'clusters' must be a list, got a number"),
        ("- just\n- a list\n", "expected a kubeconfig (apiVersion, clusters, contexts, users)"),
        ("clusters: [{name: a, cluster: 5}]\n", "clusters[0].cluster must be a mapping"),
        ("contexts: [5]\n", "contexts[0] must be a mapping with a 'name'"),
        ("", "the file is empty"),
    ],
)
@pytest.mark.parametrize("command", [("status",), ("run", "--simulate", "healthy")])
def test_a_malformed_kubeconfig_is_one_line(
    tmp_path: Path, content: str, message: str, command: tuple[str, ...]
) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(content)
    code, _, err = run(*command, "--kubeconfig", str(path))
    assert code == 2
    assert_one_line_error(err)
    assert err.startswith(f"canaryd: error: no usable Kubernetes configuration in {path}: ")
    assert message in err


# -- promote --wait on a rollback, through the playground's API ----------------------------


@pytest.fixture(scope="module")
def playground() -> Iterator[Playground]:
    pg = Playground(
        host="127.0.0.1", port=0, speed=120, interval_s=1.0, restart_after_s=3600,
        samples=(Sample("payments", "error-spike", "x"),), token="operator-token-exit-codes",
    )  # fmt: skip
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(pg.run(stop),), daemon=True)
    thread.start()
    for _ in range(200):
        if pg.hub.refs():
            break
        threading.Event().wait(0.05)
    assert pg.hub.refs(), "the playground never listed its canary"
    try:
        yield pg
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        loop.close()


def test_promote_wait_says_rolled_back_once(playground: Playground, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(playground.token + "\n")
    code, out, err = run(
        "promote", "payments", "-n", "shop", "--revision", "v9", "--wait", "--timeout", "60s",
        "--server", playground.url, "--token-file", str(token),
    )  # fmt: skip
    assert code == 1, (out, err)
    last = out.splitlines()[-1]
    assert last.startswith("rolled back: errors: canary"), out
    assert "rolled back: rolled back" not in out
