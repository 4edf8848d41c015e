"""The provider/model catalog and plans, loaded from YAML with errors naming file and field."""

from __future__ import annotations

import datetime
import fnmatch
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class CatalogError(ValueError):
    pass


# An HTTP field name (RFC 9110 token): anything else would be refused by the HTTP client mid-request,
# or worse, split into a second header.
_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$"
# Headers the HTTP client or the adapter owns: a key sent in one of them would break the request.
_RESERVED_HEADERS = frozenset({"host", "content-type", "content-length", "transfer-encoding", "connection",
                               "traceparent", "tracestate", "anthropic-version"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolSizing(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: int = Field(default=256, ge=1)
    max_concurrency: int = Field(default=1024, ge=1)


class UpstreamKey(_Strict):
    """One of the operator's keys at a provider. The secret stays in the environment of the pool
    that sends it; ``id`` (default: the variable's name) is what logs, errors and metrics show."""

    env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    weight: float = Field(default=1.0, gt=0)
    rpm: int | None = Field(default=None, ge=1)  # the key's request budget at the provider, per minute
    tpm: int | None = Field(default=None, ge=1)  # its token budget per minute

    @property
    def key_id(self) -> str:
        return self.id or self.env

    def secret(self) -> str | None:
        return os.environ.get(self.env) or None


class Provider(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")
    base_url: str
    format: Literal["openai", "anthropic"] = "openai"
    api_key_env: str | None = None
    # "none": a self-hosted upstream (vLLM, Ollama, TGI) that takes no key, called without one when
    # no binding exists. "key" (default): a managed key (api_key_env) or a bound key is required.
    auth: Literal["key", "none"] = "key"
    timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_byte_timeout_s: float | None = Field(default=None, gt=0)
    supports_responses: bool = False
    # An openai-format provider that honours Anthropic-style cache_control marks on content parts
    # (OpenRouter, LiteLLM-fronted Anthropic): the marks of a /v1/messages request are kept for it.
    cache_control: bool = False
    max_stream_s: float | None = Field(default=None, gt=0)  # a stream longer than this is cut
    headers: dict[str, str] = Field(default_factory=dict)
    # The provider's id in the price database (genai-prices: openai, anthropic, google, azure, ...);
    # unset: this provider's name, else the model is looked up by its name alone.
    prices_provider: str | None = None
    # Where the key goes (docs/PROVIDERS.md). Unset: the format's own (openai: Authorization with
    # scheme Bearer, anthropic: x-api-key). A header named here takes the bare key unless
    # ``auth_scheme`` names a scheme. ``query`` is added to every upstream URL (Azure's api-version).
    auth_header: str | None = Field(default=None, pattern=_HEADER_NAME)
    auth_scheme: str | None = Field(default=None, pattern=_HEADER_NAME)
    query: dict[str, str] = Field(default_factory=dict)
    pool: PoolSizing = Field(default_factory=PoolSizing)
    # Several managed keys (docs/KEYS.md): accounts stick to one, a key answering 429 cools alone
    # (``key_cooldown_s`` when the upstream names no Retry-After), one answering 401/403 is out
    # for ``key_out_s`` before it is tried again.
    keys: list[UpstreamKey] = Field(default_factory=list)
    key_cooldown_s: float = Field(default=30.0, gt=0)
    key_out_s: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _check_keys(self) -> Provider:
        if self.keys and self.api_key_env:
            raise ValueError("api_key_env and keys are exclusive: list the single key under keys")
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError(f"keys: duplicate key id in {ids}")
        return self

    def model_post_init(self, _ctx: Any) -> None:
        self._keys = {k.key_id: k for k in self.keys}

    def upstream_key(self, key_id: str) -> UpstreamKey | None:
        return self._keys.get(key_id)

    @field_validator("query", mode="before")
    @classmethod
    def _query_scalars(cls, value: Any) -> Any:
        # YAML reads an unquoted ``api-version: 2024-10-21`` as a date: it means the same string.
        if not isinstance(value, dict):
            return value
        out = {}
        for k, v in value.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, datetime.date | int | float):
                v = v.isoformat() if isinstance(v, datetime.date) else str(v)
            out[k] = v
        return out

    @model_validator(mode="after")
    def _auth_consistent(self) -> Provider:
        if self.auth == "none" and self.api_key_env:
            raise ValueError("auth: none takes no api_key_env (a keyless upstream has no managed key)")
        if self.auth_header and self.auth_header.lower() in _RESERVED_HEADERS:
            raise ValueError(f"auth_header: {self.auth_header!r} is not a header a key can travel in")
        for name in self.query:
            if not name:
                raise ValueError("query: a parameter needs a name")
        return self

    @property
    def first_byte_timeout(self) -> float:
        return self.first_byte_timeout_s or self.timeout_s

    def managed_key(self) -> str | None:
        """The operator's own key for this provider, when the catalog names one and it is set."""
        if self.keys:
            # Some key of the pool is set: which one a request uses is chosen per request.
            return next((k.secret() for k in self.keys if k.secret()), None)
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def callable_without_binding(self) -> bool:
        """True when a request may reach this provider with no key of the account's own."""
        return self.auth == "none" or self.managed_key() is not None


class Price(_Strict):
    """Compute Credits per 1M tokens of each class (docs/BILLING.md). A class left out comes from
    the price database for the provider model that served the request (with the markup), else
    from the input price (cache classes) or the output price (reasoning)."""

    input_per_mtok: float | None = Field(default=None, ge=0)
    output_per_mtok: float | None = Field(default=None, ge=0)
    cache_read_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)  # 5-minute (or unspecified) writes
    cache_write_1h_per_mtok: float | None = Field(default=None, ge=0)
    reasoning_per_mtok: float | None = Field(default=None, ge=0)


class Candidate(_Strict):
    provider: str
    model: str
    # How an anthropic-format upstream model takes reasoning (docs/REASONING.md): "budget" —
    # thinking {type: enabled, budget_tokens} (Claude 3.7 to the 4.5 family) — or "adaptive" —
    # thinking {type: adaptive} with output_config {effort} (newer models, which refuse budgets).
    # "effort", on an openai-format candidate: the model takes reasoning_effort, so a /v1/messages
    # client's thinking reaches it as one (docs/CLIENTS.md); without it thinking is dropped there.
    thinking: Literal["budget", "adaptive", "effort"] = "budget"


class Model(_Strict):
    id: str = Field(min_length=1)
    tier: Literal["standard", "premium"] = "standard"
    context_window: int = Field(default=128000, ge=1)
    price: Price = Field(default_factory=Price)
    candidates: list[Candidate] = Field(min_length=1)


class DailyQuota(_Strict):
    requests: int | None = Field(default=None, ge=0)
    tokens: int | None = Field(default=None, ge=0)


class Plan(_Strict):
    name: str
    rpm: int = Field(default=60, ge=0)
    tpm: int = Field(default=100000, ge=0)
    concurrency: int = Field(default=4, ge=0)
    burst_concurrency: int | None = Field(default=None, ge=0)
    daily_quota: DailyQuota = Field(default_factory=DailyQuota)
    long_context_tokens: int | None = Field(default=None, ge=1)
    premium: bool = False
    standard_uses_quota: bool = True
    # Percent added to prices taken from the price database (never to the catalog's own prices);
    # unset: the catalog-wide price_markup_pct.
    price_markup_pct: float | None = Field(default=None, ge=0)
    # What the daily token quota (and TPM) count: every input and output token ("all"), or all but
    # cache reads ("uncached"), for plans that pass prompt caching's savings on to the quota.
    quota_tokens: Literal["all", "uncached"] = "all"

    @property
    def max_concurrency(self) -> int:
        return max(self.concurrency, self.burst_concurrency or 0)


class HealthSettings(_Strict):
    """Circuit-breaker tuning (trex_serve.routing.health.HealthPolicy)."""

    failure_threshold: int = Field(default=5, ge=1)
    error_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    min_window: int = Field(default=10, ge=1)
    window_s: float = Field(default=60.0, gt=0)
    cooldown_s: float = Field(default=10.0, gt=0)
    max_cooldown_s: float = Field(default=300.0, gt=0)
    probe_interval_s: float = Field(default=1.0, gt=0)
    panic_probe_interval_s: float = Field(default=1.0, gt=0)
    recovered_hold_s: float = Field(default=5.0, ge=0)


class Catalog(_Strict):
    providers: list[Provider] = Field(min_length=1)
    models: list[Model] = Field(min_length=1)
    smart_auto: list[str] = Field(default_factory=list)
    plans: list[Plan] = Field(default_factory=lambda: [Plan(name="free")])
    health: HealthSettings = Field(default_factory=HealthSettings)
    price_markup_pct: float = Field(default=0.0, ge=0)  # on prices from the price database
    # Names clients hard-code (Claude Code's dated model names, "sonnet", ...) → a catalog model id
    # or smart-auto. A key may be a glob ("claude-sonnet-4*"); exact names win, then globs in order.
    aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_check(self) -> Catalog:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"providers: duplicate provider name in {names}")
        known = set(names)
        formats = {p.name: p.format for p in self.providers}
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"models: duplicate model id in {ids}")
        if "smart-auto" in ids:
            raise ValueError("models: 'smart-auto' is reserved")
        for i, model in enumerate(self.models):
            for j, cand in enumerate(model.candidates):
                if cand.provider not in known:
                    raise ValueError(
                        f"models.{i}.candidates.{j}.provider: unknown provider {cand.provider!r}"
                    )
                if cand.thinking == "effort" and formats[cand.provider] == "anthropic":
                    raise ValueError(f"models.{i}.candidates.{j}.thinking: 'effort' is for openai-format "
                                     f"providers; an anthropic-format model takes 'budget' or 'adaptive'")
        for i, mid in enumerate(self.smart_auto):
            if mid not in ids:
                raise ValueError(f"smart_auto.{i}: unknown model {mid!r}")
        for name, target in self.aliases.items():
            if target != "smart-auto" and target not in ids:
                raise ValueError(f"aliases.{name}: unknown model {target!r}")
        plan_names = [p.name for p in self.plans]
        if len(set(plan_names)) != len(plan_names):
            raise ValueError(f"plans: duplicate plan name in {plan_names}")
        return self

    # Lookups used on the hot path are built once.
    def model_post_init(self, _ctx: Any) -> None:
        self._providers = {p.name: p for p in self.providers}
        self._models = {m.id: m for m in self.models}
        self._plans = {p.name: p for p in self.plans}

    def alias(self, name: str) -> str | None:
        """The model id an alias names, or None."""
        if name in self.aliases:
            return self.aliases[name]
        return next((target for pattern, target in self.aliases.items()
                     if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern)), None)

    def provider(self, name: str) -> Provider | None:
        return self._providers.get(name)

    def model(self, model_id: str) -> Model | None:
        return self._models.get(model_id)

    def plan(self, name: str) -> Plan | None:
        return self._plans.get(name)


def parse_catalog(data: Any, source: str = "<catalog>") -> Catalog:
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: the catalog must be a mapping with providers and models")
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise CatalogError(f"{source}: {loc or 'catalog'}: {err.get('msg')}") from None


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: invalid YAML: {exc}") from None
    return parse_catalog(data, str(path))
