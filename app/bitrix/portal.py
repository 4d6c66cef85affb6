"""Moved to `app.portal_config` (issue 23: the rules import a portal's settings from below, not from
the portal client). A re-export until the modules of issue 22 import from there; then delete it."""
from app.portal_config import PLAN_LIMITS as PLAN_LIMITS
from app.portal_config import PortalConfig as PortalConfig
from app.portal_config import RateLimit as RateLimit
