"""``canaryd status|promote|abort|approve|skip --server URL``: the CLI through a running
daemon's status API (the playground in a thread), same output and exit codes."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator

import pytest

from canaryd.cli import main
from canaryd.playground import Playground, Sample
from canaryd.status import Phase


@pytest.fixture(scope="module")
def playground() -> Iterator[Playground]:
    pg = Playground(
        host="127.0.0.1", port=0, speed=60, interval_s=1.0, restart_after_s=3600,
        samples=(Sample("checkout", "healthy", "x", (50,)), Sample("payments", "error-spike", "x")),
        token="operator-token-for-the-cli-test",
    )  # fmt: skip
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(pg.run(stop),), daemon=True)
    thread.start()
    for _ in range(200):  # the daemon lists the seeded canaries first
        if len(pg.hub.refs()) == 2:
            break
        threading.Event().wait(0.05)
    assert len(pg.hub.refs()) == 2, "the playground never listed its canaries"
    try:
        yield pg
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        loop.close()


def run(pg: Playground, *argv: str, token: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    extra = ["--server", pg.url]
    if token is not None:
        path = f"/tmp/canaryd-test-token-{threading.get_ident()}"
        with open(path, "w") as f:
            f.write(token + "\n")
        extra += ["--token-file", path]
    code = main([*argv, *extra], out, err)
    return code, out.getvalue(), err.getvalue()


def test_status_lists_through_the_api(playground: Playground) -> None:
    code, out, _ = run(playground, "status", "-n", "shop")
    assert code == 0
    assert "shop/checkout" in out and "shop/payments" in out
    code, _, err = run(playground, "status", "nope", "-n", "shop")
    assert code == 2 and "Canary shop/nope not found" in err and "Traceback" not in err


def test_promote_wait_exits_1_on_rollback_and_commands_need_a_token(playground: Playground) -> None:
    token = playground.token
    code, _, err = run(playground, "abort", "payments", "-n", "shop")
    assert code == 2 and "operator bearer token" in err
    code, _, err = run(playground, "abort", "payments", "-n", "shop", token="x" * 20)
    assert code == 2 and "unknown token" in err
    code, out, _ = run(
        playground, "promote", "payments", "-n", "shop", "--revision", "v5", "--wait",
        "--timeout", "60s", token=token,
    )  # fmt: skip
    assert code == 1, out
    assert "promote of revision v5 requested on shop/payments" in out and "rolled back:" in out
    code, _, err = run(playground, "abort", "payments", "-n", "shop", token=token)
    assert code == 2 and "nothing to abort" in err


def test_approve_through_the_api_moves_a_waiting_canary_on(playground: Playground) -> None:
    token = playground.token
    code, out, _ = run(
        playground, "promote", "checkout", "-n", "shop", "--revision", "v3", token=token
    )
    assert code == 0 and "(command promote-" in out
    ref = next(r for r in playground.hub.refs() if r.name == "checkout")

    def phase() -> Phase | None:
        canary = playground.hub.get(ref)
        return canary.status.phase if canary else None

    for _ in range(300):
        if phase() is Phase.WAITING_APPROVAL:
            break
        threading.Event().wait(0.1)
    assert phase() is Phase.WAITING_APPROVAL
    code, out, _ = run(playground, "approve", "checkout", "-n", "shop", token=token)
    assert code == 0 and "approve requested on shop/checkout" in out
    for _ in range(100):
        if phase() is not Phase.WAITING_APPROVAL:
            break
        threading.Event().wait(0.1)
    canary = playground.hub.get(ref)
    assert canary is not None and canary.status.phase is Phase.PROGRESSING
    assert [a.by for a in canary.status.approvals] == ["playground"]  # the token's name
