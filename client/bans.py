"""Which peers a client avoids for a while after they failed it (pure: time is passed in)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BanList:
    base: float = 5.0      # seconds of the first ban
    limit: float = 300.0   # longest ban
    _strikes: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def ban(self, address: str, now: float) -> float:
        """Ban `address`, doubling the ban for each strike; returns when it ends."""
        strikes = self._strikes.get(address, 0) + 1
        self._strikes[address] = strikes
        self._until[address] = now + min(self.base * 2 ** (strikes - 1), self.limit)
        return self._until[address]

    def banned(self, now: float) -> set[str]:
        return {address for address, until in self._until.items() if until > now}

    def forgive(self, address: str) -> None:
        """Lift the ban (the strike count stays, so a relapse is banned longer)."""
        self._until.pop(address, None)
