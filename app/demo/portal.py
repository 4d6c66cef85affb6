"""The demo portal: a FakePortal that behaves as a real Bitrix24 portal, wired in as portal `demo` with
the built-in rules, and the lines that say where it runs."""
from __future__ import annotations

from contextlib import AsyncExitStack
from importlib import resources

from pydantic import SecretStr

from app.fakeportal import FakePortal
from app.portal_config import PortalConfig, RateLimit
from app.rules.loader import parse_rules
from app.rules.model import RuleSet

DEMO_DOMAIN = "demo.b24rebind.local"
# `demo --keep`: the demo portal's webhook, printed, so a person can call it too (on B24_DEMO_PORT).
DemoPortal = FakePortal  # what the service holds of the demo: the fake, answering as a real portal does
DEMO_WEBHOOK_CODE = "demo0secret0code"
DEMO_APP_TOKEN = "demo-application-token"


def demo_rules() -> RuleSet:
    """The demo always runs the built-in rules: a real rules file and its portals are left alone."""
    text = resources.files("app.rules").joinpath("default.yaml").read_text(encoding="utf-8")
    return parse_rules(text, "built-in default rules", {})


async def start_portal(stack: AsyncExitStack, port: int = 0, fake: FakePortal | None = None) -> FakePortal:
    """The demo portal, listening until `stack` closes."""
    fake = fake or FakePortal(webhook_code=DEMO_WEBHOOK_CODE)
    try:
        await fake.start(port=port)
    except OSError as exc:
        raise DemoError(f"the demo portal cannot listen on 127.0.0.1:{port}: {exc.strerror}. Is another "
                        "`b24rebind demo --keep` running? Stop it, or play on it with `b24rebind demo convert`.") \
            from None
    stack.push_async_callback(fake.close)
    return fake


class DemoError(Exception):
    """The demo cannot start or reach its portal; the message says what to do."""

    def __init__(self, message: str, portal_down: bool = False) -> None:
        super().__init__(message)
        self.portal_down = portal_down


def announce(fake: FakePortal, base_url: str, story: bool = False, keep: bool = False) -> None:
    lines = [f"\nThe built-in DEMO portal is running at {fake.base_url}" if story else
             f"\nNo portal is configured, so the built-in DEMO portal is running at {fake.base_url}",
             f"  dashboard:        {base_url}/", f"  events endpoint:  {base_url}/bitrix/events",
             f"  service status:   {base_url}/readyz", f"  job details:      {base_url}/api/jobs/<job_id>"]
    if keep:
        lines += [f"  demo webhook:     {fake.rest_url}  (fixed: B24_DEMO_PORT, code {DEMO_WEBHOOK_CODE})"]
    if not story:
        lines += ["Try `b24rebind demo` for a conversion played out on it; to use a real portal, see README.md,",
                  "'Connect your portal'."]
    print("\n".join(lines) + "\n", flush=True)


def demo_portal_config(portal: FakePortal) -> PortalConfig:
    return PortalConfig(name="demo", domain=DEMO_DOMAIN, rest_url=SecretStr(portal.rest_url),
                        application_token=SecretStr(DEMO_APP_TOKEN), rate_limit=RateLimit(per_second=2, burst=50))


def with_demo_portal(rules: RuleSet, config: PortalConfig) -> RuleSet:
    """Rules without portals get the demo portal; a file that names its own portals is left alone."""
    return rules if rules.portals else rules.model_copy(update={"portals": {"demo": config}})
