"""The playground: where a running `b24rebind demo --keep` keeps its things, so that every other command
finds it, and `b24rebind demo stop`."""
from __future__ import annotations

import json
import os
import signal
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from app.demo.portal import DEMO_WEBHOOK_CODE, DemoError
from app.portal_config import PortalConfig
from app.settings import Settings

# The playground: while `demo --keep` runs, every other command (jobs, stats, rules, backfill, undo,
# doctor, audit, watch) reaches it. The kept demo writes a profile in its data directory; a command run
# where no rules file exists finds the profile, says so in one line, and uses the demo's data and rules.
PROFILE = "playground.json"
PLAYGROUND_RULES = "rules.yaml"


@dataclass(frozen=True)
class Playground:
    """Where a running `demo --keep` keeps its things: what a command needs to reach it."""

    pid: int
    data_dir: str  # the demo's data directory (its bundled Redis, its rules file)
    key_prefix: str
    rules: str  # the demo's rules file: the built-in rules and the demo portal, reloaded when edited
    dashboard: str = ""  # the demo's web process, once it listens
    portal: str = ""  # the demo portal's address (its webhook's base URL)

    def write(self) -> None:
        path = Path(self.data_dir) / PROFILE
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(asdict(self)), encoding="utf-8")
        staged.replace(path)  # a reader sees the old profile or the new, never half of one

    def settings_for(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"data_dir": Path(self.data_dir), "key_prefix": self.key_prefix,
                                           "rules": Path(self.rules)})

    @property
    def notice(self) -> str:
        rules = Path(self.rules)
        if rules.is_relative_to(Path.cwd()):
            rules = rules.relative_to(Path.cwd())
        return f"using the demo kept running (pid {self.pid}): its jobs, portal 'demo' and rules {rules}"


def playground_dir(settings: Settings) -> Path:
    """Where the kept demo of an installation with these settings keeps its data."""
    return settings.data_dir / "demo"


def find_playground(demo_data_dir: Path) -> Playground | None:
    """The running kept demo of this data directory, or None (none was started, or it has stopped)."""
    try:
        found = Playground(**json.loads((demo_data_dir / PROFILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    return found if _alive(found.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, though not ours to reach
        return True
    return True


def forget_playground(settings: Settings) -> None:
    """The kept demo is stopping: commands go back to the installation's own data."""
    profile = settings.data_dir / PROFILE
    try:
        if Playground(**json.loads(profile.read_text(encoding="utf-8"))).pid == os.getpid():
            profile.unlink()
    except (OSError, ValueError, TypeError):
        pass


def playground_rules(settings: Settings, portal: PortalConfig) -> Path:
    """The kept demo's rules file: the built-in rules with the demo portal, for a person to edit and try."""
    path = (settings.data_dir / PLAYGROUND_RULES).resolve()
    text = resources.files("app.rules").joinpath("default.yaml").read_text(encoding="utf-8")
    token = portal.application_token.get_secret_value() if portal.application_token else ""
    rest_url = portal.rest_url.get_secret_value() if portal.rest_url else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# The demo playground's rules (`b24rebind demo --keep` wrote them, and writes them again when it\n"
                    "# starts): the built-in rules and the demo portal. Edit them while the demo runs: it reloads\n"
                    "# them, and `b24rebind rules check|explain|test`, `backfill` and `undo` read them.\n"
                    f"portals:\n  demo:\n    domain: {portal.domain}\n    rest_url: {rest_url}\n"
                    f"    application_token: {token}\n    rate_limit: {{per_second: 2, burst: 50}}\n"
                    + text.split("\n", 1)[1], encoding="utf-8")
    return path


def keep_playground(stack: AsyncExitStack, settings: Settings) -> None:
    """Write the kept demo's profile as it starts, so other commands find it (and `demo convert` waits for
    it), and remove it when the demo stops; `playground_ready` adds the dashboard's address."""
    running = find_playground(settings.data_dir)
    if running is not None and running.pid != os.getpid():
        raise DemoError(f"a demo is kept running already (pid {running.pid}): play on it with `b24rebind demo "
                        "convert`, or stop it with `b24rebind demo stop`")
    rules = (settings.data_dir / PLAYGROUND_RULES).resolve()
    Playground(pid=os.getpid(), data_dir=str(settings.data_dir.resolve()), key_prefix=settings.key_prefix,
               rules=str(rules), portal=f"http://127.0.0.1:{settings.demo_port}/rest/1/{DEMO_WEBHOOK_CODE}/").write()
    stack.callback(forget_playground, settings)


def playground_ready(settings: Settings, dashboard: str) -> None:
    kept = find_playground(settings.data_dir)
    if kept is not None and kept.pid == os.getpid():
        replace(kept, dashboard=dashboard).write()


def stop_command(settings: Settings) -> int:
    """`b24rebind demo stop`: ask the kept demo to stop (SIGTERM), and wait until it has."""
    found = find_playground(settings.data_dir)  # the demo's settings: its own data directory
    if found is None:
        print("no demo is kept running here (nothing to stop)")
        return 0
    os.kill(found.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    # The demo removes its profile last thing as it stops (its parent may not have reaped it yet).
    while find_playground(settings.data_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    if find_playground(settings.data_dir) is not None:
        raise DemoError(f"the demo (pid {found.pid}) did not stop within 60 s; stop it with `kill {found.pid}`")
    print(f"the demo (pid {found.pid}) has stopped")
    return 0
