"""Webhooks on both job backends: signed Standard Webhooks deliveries (verified with the `standardwebhooks`
package), retries, 410, restarts, the event filter, isolation from slow receivers, and the SSRF rules.

Receivers are real HTTP servers on 127.0.0.1 (tests/webhook_receiver.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imagen.webhooks.dispatcher import WebhookDispatcher
from imagen.webhooks.events import Delivery
from imagen.webhooks.sender import Result, Sender
from imagen.webhooks.signing import Signer
from imagen.webhooks.urls import TargetPolicy, UnsafeTarget
from tests.celery_support import shared_redis
from tests.conftest import free_port, submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_job_contract import job_system
from tests.webhook_receiver import SECRET, Answer, DrippingReceiver, Receiver

__all__ = ["job_system", "shared_redis"]  # fixtures

TERMINAL = {"SUCCESS", "FAILURE"}
# The receivers listen on loopback, which webhooks reach only when the settings open it.
WEBHOOKS = {"webhook_secret": SECRET, "webhook_allowed_hosts": "127.0.0.1"}
FAST_RETRIES = {**WEBHOOKS, "webhook_first_retry_s": 0.2}


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(port: int = 0, answer: Callable[[int], Answer] | None = None) -> Receiver:
        receiver = Receiver(port, answer)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def dispatcher(client: TestClient) -> WebhookDispatcher:
    webhooks = client.app.state.webhooks  # type: ignore[attr-defined]
    assert isinstance(webhooks, WebhookDispatcher)
    return webhooks


def wait_requests(receiver: Receiver, count: int, timeout: float = 20.0) -> list[Any]:
    return wait_for(lambda: receiver.requests if len(receiver.requests) >= count else None, timeout)


def test_completed_is_delivered_signed_with_the_status_json(
    job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    client = job_system(**WEBHOOKS)
    job_id = submit(client, "quick", webhook=receiver.url)
    done = wait_status(client, job_id, TERMINAL)
    (request,) = wait_requests(receiver, 1)
    payload = request.verified()
    assert payload["type"] == "job.completed"
    assert payload["data"] == done == client.get(f"/status/{job_id}").json()
    datetime.fromisoformat(payload["timestamp"])
    assert request.webhook_id == f"msg_{job_id}_completed"
    assert request.headers["webhook-signature"].startswith("v1,")
    assert request.headers["content-type"] == "application/json"
    # the default filter is ["completed"]: nothing else comes, and nothing is left to send
    wait_for(lambda: not dispatcher(client).outbox.pending() and not dispatcher(client).outbox.subscriptions())
    assert len(receiver.requests) == 1


def test_a_failed_job_is_delivered_too(
    job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    client = job_system(**WEBHOOKS)
    job_id = submit(client, "fatal", webhook=receiver.url)
    (request,) = wait_requests(receiver, 1)
    data = request.verified()["data"]
    assert data["status"] == "FAILURE" and "weight file missing" in data["error"]
    assert data == client.get(f"/status/{job_id}").json()


def test_receiver_down_at_completion_gets_it_when_it_comes_up(
    job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]
) -> None:
    port = free_port()
    client = job_system(**FAST_RETRIES)
    job_id = submit(client, "quick", webhook=f"http://127.0.0.1:{port}/hook")
    wait_status(client, job_id, TERMINAL)
    outbox = dispatcher(client).outbox
    wait_for(lambda: outbox.pending().get(f"msg_{job_id}_completed", 0) >= 2)  # two attempts refused
    receiver = receivers(port)
    (request,) = wait_requests(receiver, 1)
    assert request.verified()["type"] == "job.completed"
    assert request.webhook_id == f"msg_{job_id}_completed"
    wait_for(lambda: not outbox.pending())


def test_500_then_200_is_retried_with_the_same_id(
    job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(answer=lambda n: Answer(500 if n == 0 else 200))
    client = job_system(**FAST_RETRIES)
    job_id = submit(client, "quick", webhook=receiver.url)
    first, second = wait_requests(receiver, 2)
    assert first.webhook_id == second.webhook_id == f"msg_{job_id}_completed"
    assert first.body == second.body
    assert first.verified() == second.verified()
    wait_for(lambda: not dispatcher(client).outbox.pending())
    assert len(receiver.requests) == 2


def test_429_waits_for_retry_after(job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]) -> None:
    receiver = receivers(answer=lambda n: Answer(429, {"Retry-After": "1"}) if n == 0 else Answer(200))
    client = job_system(**FAST_RETRIES)
    submit(client, "quick", webhook=receiver.url)
    first, second = wait_requests(receiver, 2)
    assert second.at - first.at >= 0.95  # not the 0.1-0.2 s our own backoff would wait


def test_410_stops_the_retries(job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]) -> None:
    receiver = receivers(answer=lambda n: Answer(410))
    client = job_system(**FAST_RETRIES)
    submit(client, "quick", webhook=receiver.url)
    wait_requests(receiver, 1)
    wait_for(lambda: not dispatcher(client).outbox.pending())  # dropped: nothing left to retry
    assert len(receiver.requests) == 1


def test_a_delivery_pending_at_restart_is_made_after_it(
    job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]
) -> None:
    accepting = False
    receiver = receivers(answer=lambda n: Answer(200 if accepting else 503))
    before = job_system(**FAST_RETRIES)
    job_id = submit(before, "quick", webhook=receiver.url)
    wait_requests(receiver, 1)
    before.__exit__(None, None, None)  # the API stops with the delivery pending
    refused = len(receiver.requests)
    after = job_system(**FAST_RETRIES)
    accepting = True
    wait_for(lambda: receiver.answered > refused and receiver.requests[-1].webhook_id)
    delivered = receiver.requests[-1]
    assert delivered.webhook_id == f"msg_{job_id}_completed"
    assert delivered.verified()["data"]["status"] == "SUCCESS"
    wait_for(lambda: not dispatcher(after).outbox.pending())


def test_start_and_progress_events_when_asked(
    job_system: Callable[..., TestClient], receivers: Callable[..., Receiver], latches: Latches
) -> None:
    receiver = receivers()
    client = job_system(**WEBHOOKS)
    job_id = submit(
        client, "hold job", steps=20, webhook=receiver.url, webhook_events_filter=["start", "progress", "completed"]
    )
    # held, reporting progress, until three progress events have come: however long that takes here
    wait_for(lambda: receiver.types().count("job.progress") >= 3, timeout=60)
    latches.release("job")
    wait_status(client, job_id, TERMINAL)
    wait_for(lambda: "job.completed" in receiver.types())
    payloads = receiver.payloads()
    types = [payload["type"] for payload in payloads]
    assert types[0] == "job.started" and types[-1] == "job.completed"
    assert payloads[0]["data"]["status"] in {"STARTED", "PROGRESS"}
    progress = [payload for payload in payloads if payload["type"] == "job.progress"]
    assert len(progress) >= 3
    # at most one progress event a second, however often the job reports (a held job: every 0.5 s)
    times = [datetime.fromisoformat(payload["timestamp"]).timestamp() for payload in progress]
    assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(times))
    assert all(payload["data"]["meta"]["step"] == "generation_gpu" for payload in progress)
    ids = [request.webhook_id for request in receiver.requests]
    assert len(set(ids)) == len(ids)


def test_only_the_events_asked_for(job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]) -> None:
    receiver = receivers()
    client = job_system(**WEBHOOKS)
    job_id = submit(client, "sleep 1.5", steps=10, webhook=receiver.url, webhook_events_filter=["start"])
    wait_status(client, job_id, TERMINAL)
    outbox = dispatcher(client).outbox
    wait_for(lambda: not outbox.subscriptions() and not outbox.pending())
    assert receiver.types() == ["job.started"]


def test_a_slow_receiver_delays_nothing_else(
    job_system: Callable[..., TestClient], receivers: Callable[..., Receiver]
) -> None:
    slow = receivers(answer=lambda n: Answer(200, delay_s=6.0))
    fast = receivers()
    client = job_system(**WEBHOOKS)
    first = submit(client, "quick", webhook=slow.url)
    wait_requests(slow, 1)
    started = time.monotonic()
    second = submit(client, "quick", webhook=fast.url)
    (request,) = wait_requests(fast, 1, timeout=5)
    assert time.monotonic() - started < 3.0
    assert request.verified()["data"]["job_id"] == second
    assert slow.answered == 0  # still answering the first job's webhook
    health = time.monotonic()
    assert client.get("/health").status_code == 200 and time.monotonic() - health < 1.0
    assert client.get(f"/status/{first}").json()["status"] == "SUCCESS"


# --- submission rules (the same on both backends: checked before the job exists) -------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "https://169.254.1.1:8443/hook",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
    ],
)
def test_link_local_and_metadata_addresses_are_refused(make_client: Callable[..., TestClient], url: str) -> None:
    client = make_client(webhook_secret=SECRET)
    response = client.post("/generate", json={"prompt": "x", "webhook": url})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "webhook"]
    assert "never sent there" in error["msg"]


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "example.com/hook", "http:///hook", "http://x:99999/"])
def test_a_webhook_that_is_not_an_http_url_is_refused(make_client: Callable[..., TestClient], url: str) -> None:
    client = make_client(webhook_secret=SECRET)
    response = client.post("/generate", json={"prompt": "x", "webhook": url})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "webhook"]


def test_unknown_events_are_refused(make_client: Callable[..., TestClient]) -> None:
    client = make_client(webhook_secret=SECRET)
    for events in (["done"], []):
        response = client.post(
            "/generate", json={"prompt": "x", "webhook": "https://hooks.example/", "webhook_events_filter": events}
        )
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"][:2] == ["body", "webhook_events_filter"]


def test_a_server_without_a_secret_refuses_webhooks(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    response = client.post("/generate", json={"prompt": "x", "webhook": "http://127.0.0.1:9/hook"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "webhook"] and "IMAGEN_WEBHOOK_SECRET" in error["msg"]
    assert client.post("/generate", json={"prompt": "no webhook"}).status_code == 201
    document = client.get("/openapi.json").json()["components"]["schemas"]["GenerationRequest"]
    assert document["properties"]["webhook"]["anyOf"] == [{"type": "null"}]  # what the document says is valid


def test_the_allow_list_restricts_targets(make_client: Callable[..., TestClient]) -> None:
    client = make_client(webhook_secret=SECRET, webhook_allowed_hosts="hooks.example.com, 10.0.0.0/8")
    response = client.post("/generate", json={"prompt": "x", "webhook": "http://127.0.0.1:9/hook"})
    assert response.status_code == 422 and "IMAGEN_WEBHOOK_ALLOWED_HOSTS" in response.json()["detail"][0]["msg"]
    for url in ("https://hooks.example.com/hook", "http://10.1.2.3/hook"):
        assert client.post("/generate", json={"prompt": "x", "webhook": url}).status_code == 201
    # another name may resolve into 10.0.0.0/8: checked when connecting; with names only, refused at once
    assert TargetPolicy.parse("hooks.example.com").url_problem("http://other.example.com/hook") is not None


LOOPBACK_SPELLINGS = [
    "localhost", "LocalHost.", "app.localhost", "localhost6", "127.1", "2130706433", "0x7f.1", "0x7f000001",
    "127.0.0.1.", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::127.0.0.1]", "[64:ff9b::7f00:1]",
    "[2002:7f00:1::1]",
]  # fmt: skip
OPEN_LOOPBACK = "127.0.0.0/8, ::1, localhost, app.localhost"


def test_every_spelling_of_loopback_is_refused_by_default_and_accepted_when_opened(
    make_client: Callable[..., TestClient],
) -> None:
    """``httpx`` keeps ``127.1``, ``2130706433`` and ``0x7f.1`` as host names, which the system resolver then
    reads as 127.0.0.1: each spelling is judged as the address it means."""
    closed = make_client(webhook_secret=SECRET)
    opened = make_client(webhook_secret=SECRET, webhook_allowed_hosts=OPEN_LOOPBACK)
    port = free_port()  # nothing listens: the accepted jobs' deliveries are refused, and retried
    for host in LOOPBACK_SPELLINGS:
        url = f"http://{host}:{port}/p"
        response = closed.post("/generate", json={"prompt": "x", "webhook": url})
        assert response.status_code == 422, (url, response.text)
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "webhook"] and "IMAGEN_WEBHOOK_ALLOWED_HOSTS" in error["msg"], error
        assert "loopback" in error["msg"], error
        assert opened.post("/generate", json={"prompt": "x", "webhook": url}).status_code == 201, url


@pytest.mark.parametrize(
    "url",
    [
        "http://0177.0.0.1:18150/p",  # httpx refuses it (a dotted quad with a leading zero): it would never be sent
        "http://127.0.0.01/p",
        "http://%31%32%37.0.0.1/p",
        "http://[fe80::1%25eth0]/p",
        "http://127.0.0.1:0/p",
    ],
)
def test_a_url_the_sender_cannot_send_to_is_refused_whatever_the_settings(
    make_client: Callable[..., TestClient], url: str
) -> None:
    client = make_client(webhook_secret=SECRET, webhook_allowed_hosts=f"*, {OPEN_LOOPBACK}, fe80::/10")
    response = client.post("/generate", json={"prompt": "x", "webhook": url})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "webhook"]


@pytest.mark.parametrize(
    ("host", "what"),
    [
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("[fc00::1]", "private"),
        ("[fd12:3456::1]", "private"), ("100.64.0.1", "carrier-grade NAT"), ("100.127.255.254", "carrier-grade NAT"),
        ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.1", "documentation"),
        ("[2001:db8::1]", "documentation"), ("198.18.0.1", "benchmarking"), ("[::ffff:10.0.0.1]", "private"),
        ("[64:ff9b::a00:1]", "private"), ("[2002:c0a8:101::1]", "private"), ("[2001::1]", "reserved"),
    ],
)  # fmt: skip
def test_internal_addresses_are_refused_unless_listed(host: str, what: str) -> None:
    url = f"http://{host}/hook"
    problem = TargetPolicy.parse(None).url_problem(url)
    assert problem is not None and what in problem and "IMAGEN_WEBHOOK_ALLOWED_HOSTS" in problem
    listed = host.strip("[]")
    assert TargetPolicy.parse(f"hooks.example, {listed}").url_problem(url) is None
    assert TargetPolicy.parse("*").url_problem(url) == problem  # `*` opens public hosts, nothing internal


@pytest.mark.parametrize(
    "host",
    ["169.254.169.254", "[fd00:ec2::254]", "100.100.100.200", "168.63.129.16", "[::ffff:100.100.100.200]",
     "[64:ff9b::a9fe:a9fe]", "169.254.170.2", "[fe80::1]", "0.0.0.0", "[::]", "224.0.0.1", "[ff02::1]"],
)  # fmt: skip
def test_metadata_and_link_local_addresses_are_never_called(host: str) -> None:
    url = f"http://{host}/latest/meta-data/"
    listed = f"*, {host.strip('[]')}, 0.0.0.0/0, ::/0"
    for policy in (TargetPolicy.parse(None), TargetPolicy.parse(listed)):
        problem = policy.url_problem(url)
        assert problem is not None and "never sent there" in problem


def test_public_addresses_and_names_are_accepted_by_default() -> None:
    policy = TargetPolicy.parse(None)
    for url in ("https://hooks.example.com/x", "http://8.8.8.8/x", "http://[2606:4700::1111]/x",
                "http://[64:ff9b::808:808]/x", "http://[2002:808:808::1]/x", "https://bücher.example/x"):  # fmt: skip
        assert policy.url_problem(url) is None, url


def test_every_resolved_address_is_checked_when_connecting(receivers: Callable[..., Receiver]) -> None:
    """DNS rebinding: a name that resolved to a public address at submission may resolve to an internal one
    later. The check runs on the addresses of the connection, and the connection goes to a checked one."""
    receiver = receivers()
    port = int(receiver.url.split(":")[2].split("/")[0])
    url = f"http://hooks.example:{port}/hook"
    body = '{"type": "job.completed"}'
    delivery = Delivery(id="msg_rebind", job_id="j", url=url, body=body, retry=True, created_at=time.time())

    def rebinding(host: str, port: int) -> list[str]:
        return ["8.8.8.8", "127.0.0.1"] if host == "hooks.example" else []

    with pytest.raises(UnsafeTarget, match=r"hooks\.example resolves to 127\.0\.0\.1; .*loopback"):
        TargetPolicy.parse(None).addresses("hooks.example", port, resolver=rebinding)
    refusing = Sender(Signer(SECRET), TargetPolicy.parse(None), 5.0, resolver=lambda host, port: ["127.0.0.1"])
    outcome = refusing.send(delivery)
    refusing.close()
    assert outcome.result is Result.RETRY and "hooks.example resolves to 127.0.0.1" in outcome.reason
    assert receiver.requests == []
    # the name is listed: its addresses may be internal; the request goes to the checked address, and the
    # Host header still names the URL's host
    allowed = Sender(Signer(SECRET), TargetPolicy.parse("hooks.example"), 5.0, resolver=lambda h, p: ["127.0.0.1"])
    assert allowed.send(delivery).result is Result.DELIVERED
    allowed.close()
    (request,) = receiver.requests
    assert request.headers["host"] == f"hooks.example:{port}" and request.verified()["type"] == "job.completed"


# --- failures: any error is a failed attempt, bounded in time; bad deliveries never block the others ------


def test_a_dripping_receiver_fails_the_attempt_at_its_limit() -> None:
    """A receiver that answers one byte every half second never trips a per-read timeout: the attempt's limit
    covers the whole of it, and it ends while the receiver is still dripping."""
    dripping = DrippingReceiver(drips=120, interval_s=0.5)
    sender = Sender(Signer(SECRET), TargetPolicy.parse("127.0.0.1"), 1.0)
    try:
        delivery = Delivery(id="msg_drip", job_id="j", url=dripping.url, body="{}", retry=True, created_at=time.time())
        outcome = sender.send(delivery)
        assert outcome.result is Result.RETRY and "timed out" in outcome.reason, outcome
        wait_for(lambda: dripping.cut == 1)  # the sender hung up, before the end of the answer
        assert dripping.finished == 0 and dripping.connections == 1
    finally:
        sender.close()
        dripping.stop()


def test_dripping_receivers_neither_hold_the_pool_nor_are_retried_for_ever(
    make_client: Callable[..., TestClient], receivers: Callable[..., Receiver]
) -> None:
    """Ten deliveries to a dripping receiver (more than the pool's threads) and then a healthy one: the
    healthy one arrives while the dripping answers are far from done, and each dripping attempt is recorded
    as failed and retried."""
    dripping = DrippingReceiver(drips=120, interval_s=0.5)
    healthy = receivers()
    client = make_client(**FAST_RETRIES, webhook_attempt_timeout_s=1.0)
    outbox = dispatcher(client).outbox
    now = time.time()
    slow_ids = [f"msg_drip_{n}" for n in range(10)]
    try:
        for delivery_id in slow_ids:
            outbox.enqueue(Delivery(delivery_id, "j", dripping.url, "{}", retry=True, created_at=now, next_at=now))
        wait_for(lambda: dripping.connections >= 8)  # the pool's threads are all held by the dripping receiver
        submit(client, "quick", webhook=healthy.url)
        wait_requests(healthy, 1)
        assert dripping.finished == 0
        wait_for(lambda: all(outbox.pending().get(delivery_id, 0) >= 2 for delivery_id in slow_ids))
        wait_for(lambda: dripping.cut >= 20)  # the receiver's threads see each hang-up a moment after the sender
        assert dripping.finished == 0
    finally:
        dripping.stop()


# Accepted at submission before, as ``urlsplit`` reads them; ``httpx.URL`` refuses them when sending.
POISON_URLS = ["http://0177.0.0.1:18150/p", "http://127.0.0.01/p", "http://127.00.0.1/p", "http://0177.000.0.1/p"]


def test_poison_deliveries_are_dropped_after_their_deadline_and_block_nobody(
    job_system: Callable[..., TestClient], receivers: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    """Forty deliveries that no attempt can make (left in the outbox by an older version, whose submission
    check let them through) are older than a good one: the good one is delivered at once; each poison one
    is a failed attempt (a log line, no traceback), retried until its deadline, then dropped."""
    receiver = receivers()
    client = job_system(**FAST_RETRIES, webhook_retry_s=2.0)
    outbox = dispatcher(client).outbox
    now = time.time()
    poison = {f"msg_poison_{n}": POISON_URLS[n % len(POISON_URLS)] for n in range(40)}
    for delivery_id, url in poison.items():
        outbox.enqueue(Delivery(delivery_id, "poison", url, "{}", retry=True, created_at=now - 1, next_at=now - 1))
    job_id = submit(client, "quick", webhook=receiver.url)
    (request,) = wait_requests(receiver, 1)
    assert request.webhook_id == f"msg_{job_id}_completed"
    wait_for(lambda: not set(outbox.pending()) & set(poison))
    webhook_records = [record for record in caplog.records if record.name == "imagen.webhooks"]
    assert [record for record in webhook_records if record.exc_info] == []
    dropped = [record.getMessage() for record in webhook_records if "not delivered after" in record.getMessage()]
    assert all(any(f"webhook {delivery_id} to " in line for line in dropped) for delivery_id in poison)


def test_redirects_are_not_followed(make_client: Callable[..., TestClient], receivers: Callable[..., Receiver]) -> None:
    elsewhere = receivers()
    redirecting = receivers(answer=lambda n: Answer(307, {"Location": elsewhere.url}))
    client = make_client(**FAST_RETRIES)
    submit(client, "quick", webhook=redirecting.url)
    wait_requests(redirecting, 1)
    wait_for(lambda: not dispatcher(client).outbox.pending())
    assert elsewhere.requests == [] and len(redirecting.requests) == 1
