"""/metrics after real events and jobs: counted in Redis by the web process and the worker."""
from __future__ import annotations

from typing import Any

from arq import Worker
from prometheus_client.parser import text_string_to_metric_families

from app.fakeportal import LEAD, FakePortal
from tests.conftest import post_event


async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(await response.text()) for sample in family.samples}


async def test_events_jobs_requests_and_durations_are_counted(client: Any, worker: Worker,
                                                               portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    await post_event(client, "ONCRMACTIVITYADD", activity)
    await post_event(client, "ONCRMACTIVITYADD", activity)  # a duplicate delivery
    await post_event(client, "ONCRMACTIVITYADD", activity, token="guessed")
    await post_event(client, "ONCRMDEALUPDATE", 5)  # no rule listens
    await worker.run_check()
    await post_event(client, "ONCRMACTIVITYADD", activity, ts=1766047999)  # stays queued

    metrics = await scrape(client)

    def events(outcome: str, portal: str = "acme", event: str = "ONCRMACTIVITYADD") -> float:
        return metrics.get(("b24rebind_events_received_total",
                            (("event", event), ("outcome", outcome), ("portal", portal))), 0)

    assert (events("queued"), events("duplicate")) == (2, 1)
    assert events("refused", "-", "-") >= 1  # refusals carry no portal: any test's refusals add up here
    assert events("ignored", event="ONCRMDEALUPDATE") == 1
    assert metrics[("b24rebind_jobs", (("state", "succeeded"),))] == 1
    assert metrics[("b24rebind_jobs", (("state", "queued"),))] == 1
    assert metrics[("b24rebind_queue_depth", (("queue", "live"),))] == 1
    assert metrics[("b24rebind_job_duration_seconds_count", (("state", "succeeded"),))] == 1
    requests = sum(v for (name, labels), v in metrics.items()
                   if name == "b24rebind_rest_requests_total" and ("via", "request") in labels)
    assert requests == portal.request_count
    assert metrics[("b24rebind_rest_requests_total", (("method", "crm.activity.binding.add"), ("outcome", "ok"),
                                                      ("portal", "acme"), ("via", "batch")))] == 2


async def test_a_refused_request_is_counted_with_the_portals_error_code(client: Any, worker: Worker,
                                                                         portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
    await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    metrics = await scrape(client)

    refused = [labels for (name, labels), v in metrics.items()
               if name == "b24rebind_rest_requests_total" and ("outcome", "ACCESS_DENIED") in labels and v == 1]
    assert refused, metrics
    assert metrics[("b24rebind_jobs", (("state", "failed"),))] == 1


async def test_the_grafana_dashboard_uses_only_metrics_the_service_exposes(client: Any) -> None:
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[3] / "deploy/grafana/b24rebind.json").read_text())
    exposed = await (await client.get("/metrics")).text()
    names = {re.sub(r"_bucket$", "", m) for panel in dashboard["panels"] for target in panel["targets"]
             for m in re.findall(r"b24rebind_\w+", target["expr"])}

    assert names and all(f"# TYPE {name} " in exposed for name in names), names - set(exposed.split())


async def test_intake_is_summed_up_in_one_log_line_a_minute_not_one_per_event(
        client: Any, redis: Any, portal: FakePortal, caplog: Any, monkeypatch: Any) -> None:
    import logging

    from app.api import metrics

    caplog.set_level(logging.INFO)
    await post_event(client, "ONCRMACTIVITYADD", 11)
    await post_event(client, "ONCRMACTIVITYADD", 11)  # a duplicate delivery
    await post_event(client, "ONCRMACTIVITYADD", 12, token="guessed")
    assert not [r for r in caplog.records if r.levelno == logging.INFO and "queued job" in r.getMessage()]

    monkeypatch.setattr(metrics, "SUMMARY_EVERY", 0.0)
    await client.server.app[metrics.event_counts_key].flush(redis)

    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("events in the last")]
    assert "1 queued" in summary and "1 duplicate" in summary and "1 refused" in summary
    assert "by portal: 2 acme" in summary  # refusals name no portal
    await client.server.app[metrics.event_counts_key].flush(redis)
    assert len([r for r in caplog.records if r.getMessage().startswith("events in the last")]) == 1, \
        "nothing new, no line"


async def test_while_redis_is_away_metrics_still_answer_that_it_is(
        aiohttp_client: Any, private_redis: Any, rules: Any, tmp_path: Any) -> None:
    from app.settings import Settings
    from app.web import create_app

    settings = Settings(_env_file=None, redis_url=private_redis.url, data_dir=tmp_path, rules=tmp_path / "rules.yaml")
    client = await aiohttp_client(create_app(settings, rules))
    assert (await scrape(client))[("b24rebind_redis_up", ())] == 1

    private_redis.stop()
    metrics = await scrape(client)

    assert metrics[("b24rebind_redis_up", ())] == 0
    assert ("b24rebind_redis_down_seconds", ()) in metrics
    assert not [name for name, _ in metrics if name.startswith("b24rebind_jobs")]  # nothing made up
