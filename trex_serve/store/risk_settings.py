"""Risk settings stored under ``risk`` on a key and on an account (CONTRACT.md section 9)."""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Velocity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window_s: int = Field(ge=1)
    max_credits: float = Field(ge=0)


class RiskSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_ips: list[str] | None = None
    daily_spend_cap: float | None = Field(default=None, ge=0)
    monthly_spend_cap: float | None = Field(default=None, ge=0)
    alert_at: float = Field(default=0.8, ge=0, le=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    velocity: Velocity | None = None

    @field_validator("allowed_ips")
    @classmethod
    def _cidrs(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        out = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError("allowed_ips entries must be strings")
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError as exc:
                raise ValueError(f"invalid CIDR {item!r}") from exc
        return out

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
        if self.allowed_ips is None:
            return None
        return [ipaddress.ip_network(c, strict=False) for c in self.allowed_ips]


def normalize_risk(value: Any) -> dict[str, Any] | None:
    """Validate a risk object (raises pydantic.ValidationError) and return its storable form:
    only the fields the operator set, CIDRs normalised; ``None``/``{}`` -> ``None``."""
    if value is None:
        return None
    if isinstance(value, RiskSettings):
        model = value
    else:
        model = RiskSettings.model_validate(value)
    data = model.model_dump(exclude_unset=True, exclude_none=True)
    return data or None


def ip_allowed(address: str, allowed: list[str] | None) -> bool:
    """True when ``allowed`` is unset, or ``address`` falls in one of its CIDRs."""
    if allowed is None:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for cidr in allowed:
        try:
            if ip in ipaddress.ip_network(cidr, strict=False):
                return True
        except (ValueError, TypeError):
            continue
    return False
