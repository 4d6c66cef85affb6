"""The built-in demo: a FakePortal that behaves as a real Bitrix24 portal, wired in as portal `demo`,
and the real sequence played on it.

Read it in this order:
- `portal`: the demo portal, its fixed webhook and the rules it runs;
- `stage`: what a scene needs, the events posted as a portal posts them, and the story's output;
- `story`: the scenes (a conversion, late e-mails, a repeat lead);
- `remote`: `demo --keep`'s control route and `b24rebind demo convert`, another scene on a kept demo;
- `playground`: the kept demo's profile, which every other command finds, and `b24rebind demo stop`.

The service (`app.service`) and the command line (`app.cli`) use the demo through the names below.
"""
from app.demo.playground import (
    find_playground,
    keep_playground,
    playground_dir,
    playground_ready,
    playground_rules,
    stop_command,
)
from app.demo.portal import DemoError, DemoPortal, announce, demo_portal_config, demo_rules, start_portal, with_demo_portal
from app.demo.remote import convert_command, start_stage
from app.demo.stage import Stage
from app.demo.story import play

__all__ = [
    "DemoError",
    "DemoPortal",
    "announce",
    "convert_command",
    "demo_portal_config",
    "demo_rules",
    "find_playground",
    "keep_playground",
    "play",
    "playground_dir",
    "playground_ready",
    "playground_rules",
    "Stage",
    "start_portal",
    "start_stage",
    "stop_command",
    "with_demo_portal",
]
