"""MQTT through the whole daemon: a real Mosquitto stopped mid-rollout does not slow
the rollout, and on its return every event the daemon told arrives, in order, with the
final state retained.

The Kubernetes API double over real HTTP, simulated traffic on compressed real time
(as tests/test_daemon.py).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import aiomqtt

from canaryd.mqtt import MqttSettings, MqttSink
from canaryd.outbox import Notifier
from canaryd.rollout import CommandKind
from kubedouble.apiserver import KubeApiServer
from simulator import get_scenario
from tests.mosquitto import MosquittoServer, require_mosquitto
from tests.test_daemon import Harness, canary_weight, phase
from tests.test_mqtt import Subscriber, as_bytes, running, subscribed, wait_until

Obj = dict[str, Any]


def test_a_broker_outage_mid_rollout_delays_no_step_and_loses_no_event(
    cluster: KubeApiServer,
) -> None:
    require_mosquitto()

    async def scenario(broker: MosquittoServer) -> tuple[Obj, list[str], list[str], Obj]:
        sink = MqttSink(
            MqttSettings(
                url=broker.url, client_id="daemon-flow", timeout_s=3.0, reconnect_max_s=2.0
            )
        )
        sub = Subscriber(broker, "canaryd/shop/checkout/events", "flow-sub", persistent=True)
        async with (
            running(sub.run()),
            Harness(cluster, get_scenario("healthy"), notifier=Notifier([sink])) as h,
        ):
            await subscribed(sub)
            await wait_until(lambda: sink.connected, "the sink to connect")
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: canary_weight(cluster) == 10)
            await asyncio.to_thread(broker.stop)  # mid-rollout, in the first step
            done = await h.until(lambda o: phase(o) == "Succeeded")
            assert not sink.connected
            told = [e.id for e in h.daemon.told]
            assert len(sink.outbox) > 0  # the events of the outage wait for the broker
            await asyncio.to_thread(broker.start)
            await wait_until(lambda: sub.event_ids() == told, "every event, in order", 30.0)
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="late") as late:
                await late.subscribe("canaryd/shop/checkout/state", qos=1)
                message = await asyncio.wait_for(anext(aiter(late.messages)), 10)
                assert message.retain
                state = json.loads(as_bytes(message))
            return done, told, sub.event_ids(), state

    with MosquittoServer(persistence=True) as broker:
        done, told, received, state = asyncio.run(scenario(broker))
    assert received == told and len(told) >= 8
    history = done["status"]["history"]
    assert [s["weight"] for s in history] == [10, 50, 100]
    for step in history:  # on time: no step took longer for the outage
        took_s = (
            datetime.fromisoformat(step["endedAt"]) - datetime.fromisoformat(step["startedAt"])
        ).total_seconds()
        assert took_s <= 6.0 + 3.0, f"the {step['weight']}% step took {took_s:.1f} s"
    assert state["reason"] == "Promoted" and state["phase"] == "Succeeded"
    assert state["id"] == told[-1]
