"""Accounts: tiers, users and API keys, and every change to them.

:class:`AccountsService` is the one way to change them (CLI, stream agents);
:mod:`~metering.accounts.store` holds the SQL steps and
:mod:`~metering.accounts.cache` the edges' shared identity cache.
"""

from metering.accounts.cache import IdentityCache
from metering.accounts.model import Identity, KeyInfo, Tier, User
from metering.accounts.service import AccountsService

__all__ = ["AccountsService", "Identity", "IdentityCache", "KeyInfo", "Tier", "User"]
