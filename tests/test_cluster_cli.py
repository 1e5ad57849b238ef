"""The cluster commands against the Kubernetes API double (no daemon running)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from canaryd.cli import main
from kubedouble.apiserver import KubeApiServer
from tests.conftest import NS


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def commands(server: KubeApiServer) -> list[dict[str, object]]:
    obj = server.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert obj is not None
    return list(json.loads(obj["metadata"]["annotations"]["canaryd.io/commands"]))


def test_commands_are_written_on_the_resource(cluster: KubeApiServer, kubeconfig: Path) -> None:
    kc = ("--kubeconfig", str(kubeconfig))
    assert run("promote", "checkout", *kc, "--revision", "v7")[0] == 0
    assert run("approve", "checkout", *kc, "--step", "50")[0] == 0
    code, out, _ = run("abort", "checkout", *kc, "--reason", "pager went off")
    assert code == 0
    assert out.startswith(f"abort requested on {NS}/checkout")
    written = commands(cluster)
    assert [c["kind"] for c in written] == ["promote", "approve", "abort"]
    assert written[0]["revision"] == "v7"
    assert written[1]["weight"] == 50
    assert written[2]["reason"] == "pager went off"
    assert len({c["id"] for c in written}) == 3


def test_acknowledged_commands_are_pruned_when_a_new_one_is_added(
    cluster: KubeApiServer, kubeconfig: Path
) -> None:
    kc = ("--kubeconfig", str(kubeconfig))
    run("promote", "checkout", *kc, "--revision", "v1")
    first = commands(cluster)[0]["id"]
    obj = cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert obj is not None
    cluster.put_raw(
        "canaryd.io", "v1alpha1", "canaries", {**obj, "status": {"acknowledged": [first]}}
    )
    run("abort", "checkout", *kc)
    assert [c["kind"] for c in commands(cluster)] == ["abort"]


def test_promote_wait_times_out_with_exit_3(cluster: KubeApiServer, kubeconfig: Path) -> None:
    code, out, _ = run(
        "promote", "checkout", "--kubeconfig", str(kubeconfig), "--wait", "--timeout", "1s",
        "--poll", "0.2s",
    )  # fmt: skip
    assert code == 3
    assert "timed out after 1s" in out


def test_status_shows_the_canaries(cluster: KubeApiServer, kubeconfig: Path) -> None:
    code, out, _ = run("status", "--kubeconfig", str(kubeconfig))
    assert code == 0
    assert out.startswith(f"{NS}/checkout  Idle")
    code, out, _ = run("status", "checkout", "--kubeconfig", str(kubeconfig), "--json")
    assert code == 0
    assert json.loads(out)[0]["name"] == "checkout"


def test_a_missing_canary_is_one_clear_line(cluster: KubeApiServer, kubeconfig: Path) -> None:
    code, _, err = run("abort", "nope", "--kubeconfig", str(kubeconfig))
    assert code == 2
    assert err == f"canaryd: error: Canary {NS}/nope not found\n"


def test_no_kubeconfig_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, _, err = run("status")
    assert code == 2
    assert err.startswith("canaryd: error: no usable Kubernetes configuration")
    assert "Traceback" not in err


def test_the_api_server_down_is_one_clear_line(tmp_path: Path) -> None:
    with KubeApiServer() as server:
        path = server.write_kubeconfig(tmp_path / "kc")
    code, _, err = run("status", "--kubeconfig", str(path), "--request-timeout", "2s")
    assert code == 2
    assert err.startswith("canaryd: error: Kubernetes API: cannot reach the Kubernetes API")


def test_run_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("run", "--help")[0] == 0
    text = capsys.readouterr().out
    for flag in (
        "--kubeconfig",
        "--context",
        "--watch-namespace",
        "--leader-elect",
        "--lease-duration",
        "--slack-token-file",
        "--slack-signing-secret-file",
        "--webhook-secret-file",
        "--mqtt-url",
        "--mqtt-command-user",
    ):
        assert flag in text
    assert "SIGTERM" in text
    assert "--slack-api-url" not in text  # the tests' double only


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--slack-token-file", "/nonexistent/token"], "cannot read the Slack bot token"),
        (["--mqtt-url", "tcp://broker:1883"], "--mqtt-url"),
        (["--slack-signing-secret-file", "SECRET"], "needs --slack-token-file too"),
    ],
)
def test_run_says_what_is_wrong_with_its_notification_settings(
    kubeconfig: Path, tmp_path: Path, flags: list[str], error: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value\n")
    flags = [str(secret) if f == "SECRET" else f for f in flags]
    code, _, err = run(
        "run", "--kubeconfig", str(kubeconfig), "--listen", "off", "--simulate", "healthy", *flags
    )
    assert code == 2 and error in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "s3cr3t-value" not in err


def test_secrets_come_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from canaryd.cluster_cli import ClusterError, read_secret

    path = tmp_path / "token"
    path.write_text("  xoxb-1  \n")
    assert read_secret(str(path), "CANARYD_TEST_SECRET", "token") == "xoxb-1"
    monkeypatch.setenv("CANARYD_TEST_SECRET", "from-env")
    assert read_secret(None, "CANARYD_TEST_SECRET", "token") == "from-env"
    monkeypatch.delenv("CANARYD_TEST_SECRET")
    assert read_secret(None, "CANARYD_TEST_SECRET", "token") is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClusterError, match="is empty"):
        read_secret(str(tmp_path / "empty"), "CANARYD_TEST_SECRET", "token")
