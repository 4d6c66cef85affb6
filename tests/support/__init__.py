"""Helpers tests share: real processes, waiting on conditions, the chaos tests' checks. Test modules import
these, never each other."""
