"""Stored responses and previous_response_id through the whole gateway in process (SQL store on
SQLite and PostgreSQL, real Redis, the relay hop, mock upstream processes), driven by the official
openai SDK: retrieve, delete, input_items, conversations continued across provider formats and
through fallback, and every id the gateway must not continue refused before anything is counted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
import sqlalchemy as sa

from tests.integration.gateway import OP, account, new_key

TOOLS = [{"type": "function", "name": "get_weather", "description": "weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def sdk(gw, key: str) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=gw._transport, base_url="http://gw/v1")
    return openai.AsyncOpenAI(api_key=key, base_url="http://gw/v1", http_client=http, max_retries=0)


async def _key(gw, acc=None, **body) -> str:
    return (await new_key(gw, acc or await account(gw), **body))["key"]


def _requests(gw) -> int:
    return sum(m.stats()["requests"] for m in gw.mocks.values())


def _contents(messages: list[dict]) -> list[str]:
    """The text of each chat message the upstream got (a string or typed parts)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append(content or "")
    return out


async def test_retrieve_input_items_and_delete_with_the_sdk(gw):
    client = sdk(gw, await _key(gw))
    first = await client.responses.create(model="gpt-4o-mini", input="remember the blue door",
                                          instructions="be brief")
    got = await client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text and "blue door" in got.output_text
    items = [i async for i in client.responses.input_items.list(first.id)]
    assert [(i.type, i.role, i.content[0].text) for i in items] == [("message", "user", "remember the blue door")]
    assert items[0].id.startswith("msg_")
    deleted = await client.responses.delete(first.id)  # the SDK returns None for a 200 delete
    assert deleted is None
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.retrieve(first.id)
    assert missing.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(first.id)
    raw = await gw.delete(f"/v1/responses/{first.id}", headers={"Authorization": f"Bearer {client.api_key}"})
    assert raw.status_code == 404 and raw.headers["x-trex-request-id"]


async def test_delete_answers_openai_shape(gw):
    key = await _key(gw)
    client = sdk(gw, key)
    first = await client.responses.create(model="gpt-4o-mini", input="hi")
    r = await gw.delete(f"/v1/responses/{first.id}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json() == {"id": first.id, "object": "response", "deleted": True}


async def test_any_key_of_the_account_sees_it_another_account_gets_404(gw):
    acc = await account(gw)
    mine, sibling, stranger = sdk(gw, await _key(gw, acc)), sdk(gw, await _key(gw, acc)), sdk(gw, await _key(gw))
    first = await mine.responses.create(model="gpt-4o-mini", input="shared within the account")
    assert (await sibling.responses.retrieve(first.id)).id == first.id
    with pytest.raises(openai.NotFoundError) as foreign:
        await stranger.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as unknown:
        await stranger.responses.retrieve("resp_" + "0" * 32)
    # No leak: a foreign id and an unknown one get the same answer, but for the id itself.
    assert foreign.value.body["message"].replace(first.id, "X") == unknown.value.body["message"].replace(
        "resp_" + "0" * 32, "X")
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.delete(first.id)
    assert (await mine.responses.retrieve(first.id)).id == first.id  # still there


async def test_chain_across_openai_anthropic_and_native_formats(gw):
    client = sdk(gw, await _key(gw))
    one = await client.responses.create(model="gpt-4o-mini", input="my name is Ada", instructions="SYSTEM-ONE")
    raw = await client.responses.with_raw_response.create(model="claude-sonnet", input="what is my name?",
                                                          previous_response_id=one.id)
    two = raw.parse()
    assert raw.headers["x-trex-upstream-provider"] == "claude" and two.previous_response_id == one.id
    sent = gw.mocks["alpha"].stats()["last_body"]  # Anthropic's Messages shape, from the translation
    texts = _contents(sent["messages"])
    assert texts[0] == "my name is Ada" and one.output_text in texts[1] and texts[2] == "what is my name?"
    assert "SYSTEM-ONE" not in str(sent)  # instructions are not carried over
    three = await client.responses.create(model="native-model", input="and again?", previous_response_id=two.id)
    native = gw.mocks["beta"].stats()["last_body"]
    assert "previous_response_id" not in native  # the gateway's id means nothing upstream
    roles = [(i.get("role"), _contents([i])[0]) for i in native["input"]]
    assert roles[0] == ("user", "my name is Ada") and roles[-1] == ("user", "and again?")
    assert ("assistant", two.output_text) in roles and len(roles) == 5
    assert three.previous_response_id == two.id
    stored = await client.responses.retrieve(three.id)
    assert stored.previous_response_id == two.id and stored.output_text == three.output_text
    # The input items of the third response: the conversation it was generated from, newest first.
    listed = [i async for i in client.responses.input_items.list(three.id)]
    assert [getattr(i, "role", None) for i in listed][:2] == ["user", "assistant"]
    assert len(listed) == 5
    asc = [i async for i in client.responses.input_items.list(three.id, order="asc")]
    assert [i.id for i in asc] == [i.id for i in reversed(listed)]


async def test_chain_continues_through_fallback_and_bills_the_history(gw):
    client = sdk(gw, await _key(gw))
    one = await client.responses.with_raw_response.create(model="gpt-4o-mini", input="first turn " * 20)
    first = one.parse()
    gw.mocks["alpha"].control(fail_next=1, error_status=503)
    raw = await client.responses.with_raw_response.create(model="gpt-4o-mini", input="second",
                                                          previous_response_id=first.id)
    second = raw.parse()
    assert raw.headers["x-trex-attempts"] == "2" and raw.headers["x-trex-upstream-provider"] == "beta"
    texts = _contents(gw.mocks["beta"].stats()["last_body"]["messages"])
    assert texts == [("first turn " * 20), first.output_text, "second"]
    # Billing counts what was sent: the history's tokens are in the second turn's prompt.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.previous_response_id == first.id


async def test_function_calls_continue_with_their_outputs(gw):
    client = sdk(gw, await _key(gw))
    call_turn = await client.responses.create(model="gpt-4o-mini", input="weather in Paris?", tools=TOOLS,
                                              tool_choice="required")
    call = next(i for i in call_turn.output if i.type == "function_call")
    answer = await client.responses.create(model="claude-sonnet", tools=TOOLS, previous_response_id=call_turn.id,
                                           input=[{"type": "function_call_output", "call_id": call.call_id,
                                                   "output": "sunny, 21C"}])
    sent = gw.mocks["alpha"].stats()["last_body"]["messages"]
    kinds = [[b.get("type") for b in m["content"]] if isinstance(m["content"], list) else ["text"] for m in sent]
    assert kinds[1] == ["tool_use"] and kinds[2] == ["tool_result"]
    assert sent[2]["content"][0]["tool_use_id"] == call.call_id
    assert "sunny, 21C" in answer.output_text


async def test_streamed_response_is_stored_when_the_stream_ends(gw):
    client = sdk(gw, await _key(gw))
    stream = await client.responses.create(model="gpt-4o-mini", input="stream me", stream=True)
    final = None
    async for event in stream:
        if event.type == "response.completed":
            final = event.response
    assert final is not None
    got = await client.responses.retrieve(final.id)  # right after the stream: no waiting
    assert got.output_text == final.output_text
    follow = await client.responses.create(model="native-model", input="next", previous_response_id=final.id,
                                           stream=True)
    completed = [e async for e in follow if e.type == "response.completed"][0].response
    assert completed.previous_response_id == final.id  # echoed in the stream too
    assert _contents(gw.mocks["beta"].stats()["last_body"]["input"])[:2] == ["stream me", final.output_text]


async def test_ids_that_cannot_be_continued_are_refused_before_anything(gw):
    acc = await account(gw)
    key = await _key(gw, acc)
    client = sdk(gw, key)
    kept = await client.responses.create(model="gpt-4o-mini", input="kept")
    unstored = await client.responses.create(model="gpt-4o-mini", input="not kept", store=False)
    deleted = await client.responses.create(model="gpt-4o-mini", input="to delete")
    await client.responses.delete(deleted.id)
    foreign = await sdk(gw, await _key(gw)).responses.create(model="gpt-4o-mini", input="other account")
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    before_usage = (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()["quota"]
    before = _requests(gw)
    for rid in ("resp_unknown", unstored.id, deleted.id, foreign.id):
        r = await gw.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "gpt-4o-mini", "input": "go on", "previous_response_id": rid})
        err = r.json()["error"]
        assert (r.status_code, err["code"], err["param"]) == (400, "previous_response_not_found",
                                                              "previous_response_id"), r.text
        assert rid in err["message"] and "x-ratelimit-remaining-requests" not in r.headers
    assert _requests(gw) == before  # nothing reached a provider
    after_usage = (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()["quota"]
    assert after_usage["requests_used"] == before_usage["requests_used"]  # nothing counted
    assert (await client.responses.retrieve(kept.id)).id == kept.id
    with pytest.raises(openai.BadRequestError) as sdk_err:
        await client.responses.create(model="gpt-4o-mini", input="x", previous_response_id=deleted.id)
    assert sdk_err.value.code == "previous_response_not_found"


async def test_a_chain_with_a_deleted_ancestor_is_refused(gw):
    client = sdk(gw, await _key(gw))
    one = await client.responses.create(model="gpt-4o-mini", input="one")
    two = await client.responses.create(model="gpt-4o-mini", input="two", previous_response_id=one.id)
    await client.responses.delete(one.id)
    before = _requests(gw)
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(model="gpt-4o-mini", input="three", previous_response_id=two.id)
    assert err.value.code == "previous_response_not_found" and one.id in err.value.message
    assert _requests(gw) == before
    # The second response itself is still there, and lists its own input.
    assert [i.content[0].text async for i in client.responses.input_items.list(two.id)] == ["two"]


async def test_bad_store_and_list_parameters_are_400s(gw):
    key = await _key(gw)
    client = sdk(gw, key)
    r = await gw.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "gpt-4o-mini", "input": "x", "store": "yes"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "store")
    first = await client.responses.create(model="gpt-4o-mini", input="x")
    for query, param in (("limit=0", "limit"), ("limit=abc", "limit"), ("order=up", "order"), ("after=nope", "after")):
        r = await gw.get(f"/v1/responses/{first.id}/input_items?{query}", headers={"Authorization": f"Bearer {key}"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), query
    r = await gw.get(f"/v1/responses/{first.id}")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_input_items_paginate_like_openai(gw):
    client = sdk(gw, await _key(gw))
    given = [{"role": "user", "content": f"part {i}"} for i in range(5)]
    first = await client.responses.create(model="gpt-4o-mini", input=given)
    page = await client.responses.input_items.list(first.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["part 0", "part 1"] and page.has_more
    everything = [i.content[0].text async for i in client.responses.input_items.list(first.id, limit=2, order="asc")]
    assert everything == [f"part {i}" for i in range(5)]
    newest = await client.responses.input_items.list(first.id, limit=3)
    assert [i.content[0].text for i in newest.data] == ["part 4", "part 3", "part 2"]


async def test_expired_responses_are_gone_and_purged(gw):
    client = sdk(gw, await _key(gw))
    first = await client.responses.create(model="gpt-4o-mini", input="short-lived")
    store = gw.runtime.stored.store
    later = datetime.now(UTC) + timedelta(days=gw.runtime.settings.response_retention_days, minutes=1)
    assert (await client.responses.retrieve(first.id)).id == first.id
    with gw.runtime.repo.engine.connect() as conn:
        acc = conn.execute(sa.text("SELECT account_id FROM stored_responses WHERE id = :i"), {"i": first.id}).scalar()
    assert store.get(acc, first.id, later) is None and store.chain(acc, first.id, later) is None
    assert store.purge(later) >= 1
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)


async def test_content_is_encrypted_at_rest(gw):
    client = sdk(gw, await _key(gw))
    first = await client.responses.create(model="gpt-4o-mini", input="the secret recipe is cardamom")
    with gw.runtime.repo.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT content FROM stored_responses WHERE id = :i"), {"i": first.id}).one()
    assert "cardamom" not in row.content and first.output_text not in row.content
    assert "cardamom" in gw.runtime.stored.store.box.decrypt(row.content)
